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
met them. Each class is mapped to a CLI exit code and an HTTP status in ONE table, `KINDS` below:

    kind                    exit  HTTP
    InvalidInputError         2   422  (the request was understood and is wrong; `problems` say where)
    NotFoundError             3   404
    ConflictError             4   409
    PermissionDeniedError     5   403
    TemporaryError            6   503  (+ `Retry-After: retry_after`)
    KernelError               7   502  (the kernel, behind us, refused: nothing was applied)
    DriftError                8   502  (the kernel does not hold what was applied; a resync repairs it)
    BugError                 70   500
    HyperfenceError (other)   1   500

An error crosses a process boundary (the daemon's control socket, and next the REST API's bodies) as a
dict made by `to_wire` and read back by `from_wire`, which keeps its class, its message, the `problems` of
an `InvalidInputError` and the `retry_after` of a `TemporaryError`: a refusal reaches the user with the
exit code and text it has without a daemon in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


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
        self.summary = message  # the message without the problems (`str()` has both)
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


@dataclass(frozen=True)
class ErrorKind:
    """One row of the table: an error class, the CLI's exit code for it and the REST API's HTTP status."""

    cls: type[HyperfenceError]
    exit_code: int
    http_status: int


KINDS: tuple[ErrorKind, ...] = (
    ErrorKind(InvalidInputError, 2, 422),
    ErrorKind(NotFoundError, 3, 404),
    ErrorKind(ConflictError, 4, 409),
    ErrorKind(PermissionDeniedError, 5, 403),
    ErrorKind(TemporaryError, 6, 503),
    ErrorKind(KernelError, 7, 502),
    ErrorKind(DriftError, 8, 502),
    ErrorKind(BugError, 70, 500),
)
OTHER = ErrorKind(HyperfenceError, 1, 500)  # a HyperfenceError of no class in the table
_BY_NAME = {k.cls.__name__: k for k in KINDS}
MAX_WIRE_TEXT = 64 * 1024  # what `from_wire` keeps of a message (a reply is bounded, so is what it prints)
MAX_WIRE_PROBLEMS = 1000


def kind_of(e: BaseException) -> ErrorKind:
    """The table's row for `e`: its own class's, or its nearest base class's in the table; `OTHER` else."""
    for cls in type(e).__mro__:
        found = _BY_NAME.get(cls.__name__)
        if found is not None and found.cls is cls:
            return found
    return OTHER


def exit_code(e: BaseException) -> int:
    return kind_of(e).exit_code


def http_status(e: BaseException) -> int:
    return kind_of(e).http_status


def to_wire(e: HyperfenceError) -> dict[str, Any]:
    """`e` as plain JSON data: `ok` False and `error` (its whole text: what a client that knows nothing
    else prints), `error_kind` (the class in the table it is, or `HyperfenceError`), `message` (the text
    without the problems), and `problems` / `retry_after` where the class has them."""
    kind = kind_of(e)
    wire: dict[str, Any] = {"ok": False, "error": str(e), "error_kind": kind.cls.__name__, "message": str(e)}
    if isinstance(e, InvalidInputError):
        wire["message"] = e.summary
        wire["problems"] = [{"path": p.path, "message": p.message} for p in e.problems]
    if isinstance(e, TemporaryError):
        wire["retry_after"] = e.retry_after
    return wire


def from_wire(
    wire: Mapping[str, Any], *, default: type[HyperfenceError] = HyperfenceError
) -> HyperfenceError:
    """The error a `to_wire` dict describes, of the same class with the same message, problems and
    retry_after. A reply from an older daemon (no `error_kind`) or naming a kind not in the table is a
    `default`; text is bounded and odd field types are ignored, so a garbled reply still makes an error."""
    error = _text(wire.get("error")) or "the daemon refused without saying why"
    name = wire.get("error_kind")
    cls = _BY_NAME[name].cls if isinstance(name, str) and name in _BY_NAME else default
    message = _text(wire.get("message")) or error
    if issubclass(cls, InvalidInputError):
        problems = _problems(wire.get("problems"))
        return cls(message if problems else error, problems)
    if issubclass(cls, TemporaryError):
        retry = wire.get("retry_after")
        if isinstance(retry, int | float) and not isinstance(retry, bool) and math.isfinite(retry):
            return cls(message, retry_after=max(0.0, float(retry)))
        return cls(message)
    return cls(message)


def prefixed(e: HyperfenceError, prefix: str) -> HyperfenceError:
    """The same error (class, problems, retry_after) with `prefix` before its message: context added on the
    way up without losing the kind."""
    wire = to_wire(e)
    wire["message"] = prefix + wire["message"]
    wire["error"] = prefix + wire["error"]
    return from_wire(wire)


def _text(v: object) -> str:
    return v[:MAX_WIRE_TEXT] if isinstance(v, str) else ""


def _problems(v: object) -> tuple[Problem, ...]:
    if not isinstance(v, list):
        return ()
    return tuple(
        Problem(_text(p.get("path")), _text(p.get("message")))
        for p in v[:MAX_WIRE_PROBLEMS]
        if isinstance(p, dict)
    )
