"""The errors hyperfence raises, and what the caller should do next.

    HyperfenceError                 base; `str()` is a sentence for a person
    ├── InvalidInputError           the input is wrong: fix it and retry. Carries every problem found.
    ├── NotFoundError               the thing named does not exist: check the name
    ├── ConflictError               the request contradicts the current state: re-read and retry
    ├── PermissionDeniedError       not allowed: use another role or run as root
    ├── TemporaryError              try again later; `retry_after` seconds is a hint
    ├── KernelError                 the kernel refused a change; nothing was applied (batches are atomic)
    ├── DriftError                  the kernel does not hold what was applied: a resync repairs it
    └── BugError                    hyperfence is wrong: report it

Foreign errors (nft's stderr, OSError, NetlinkError, libvirtError) are translated inside the adapter that
met them. The CLI maps these classes to exit codes in one place (`cli/main.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class HyperfenceError(Exception):
    """Base of every error hyperfence raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One located problem in some input: `rules[2].ports: range 80-70 is reversed`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidInputError(HyperfenceError):
    """The input is wrong. `problems` lists every problem found, each with its path and value."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        self.problems = tuple(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class NotFoundError(HyperfenceError):
    """The named object does not exist."""


class ConflictError(HyperfenceError):
    """The request contradicts the current state."""


class PermissionDeniedError(HyperfenceError):
    """Not allowed for this caller."""


class TemporaryError(HyperfenceError):
    """Try again later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KernelError(HyperfenceError):
    """The kernel refused a change. Because every change is one atomic batch, nothing was applied."""


class DriftError(HyperfenceError):
    """What the kernel holds differs from what hyperfence applied."""


class BugError(HyperfenceError):
    """An internal invariant broke."""
