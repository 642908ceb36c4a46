"""The last few values a pure function made, found by the identity of what each was made from (pure).

What lets a one-rule change at 10,000 VMs skip a pass over them all: the policy's VMs, its rules, a section's
items are the very same objects from one version to the next while they do not change, so what was worked
out from them last (names, positions, ids) is found again by `is`. The entries are replaced whole (one
assignment), so a reader on another thread sees the old list or the new one, never half of one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The last `keep` values put, each under the object (by identity) it was made from."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._entries: list[tuple[K, V]] = []

    def get(self, key: K) -> V | None:
        return next((value for k, value in self._entries if k is key), None)

    def put(self, key: K, value: V) -> None:
        # (an older entry of `key` is never found again: the newest is first, and it goes first)
        self._entries = [(key, value), *self._entries][: self.keep]
