"""Overlays: isolation, rate limits and shields that named producers put on VMs, on top of the policy.

A producer (the heartbeat policy, the operator, later the attacker/victim detector) owns its overlays and
only ever replaces its own (`Engine.set_overlays`). What the compiler sees is the merge of all producers'
overlays (`merge_overlays`): so one producer's release never undoes another's isolation (Kubernetes' field
managers; docs/overlays.md).

Pure: time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# The producers hyperfence knows. `detector` is reserved for the attacker/victim detector to come.
PRODUCERS = ("heartbeat", "operator", "detector")
MAX_REASON = 200  # characters of a reason kept (it reaches `vm list`, events and logs)
MIN_RATE = 1
MAX_RATE = 10_000_000  # the bounds of a policy flood limit's `new_flows` (docs/policy.md)


class OverlayKind(StrEnum):
    ISOLATE = "isolate"  # every packet to and from the VM dropped, established flows too
    RATE_LIMIT = "rate-limit"  # at most `rate` packets a second of new flows from the VM
    SHIELD = "shield"  # no new inbound flow reaches the VM; its established flows and its own outbound go on


@dataclass(frozen=True)
class Overlay:
    """One producer's request for one VM. `since`/`until` are Unix times; `until` None: until released.
    `rate` (packets a second of new flows the VM sends) only for a rate limit."""

    producer: str
    vm: str
    kind: OverlayKind
    reason: str
    since: float
    until: float | None = None
    rate: int | None = None

    def is_active(self, now: float) -> bool:
        """An overlay whose `until` has passed counts for nothing."""
        return self.until is None or now < self.until

    def key(self) -> tuple[str, str, str]:
        """What identifies it: one overlay per producer, VM and kind (a newer one replaces it)."""
        return (self.producer, self.vm, self.kind.value)

    def as_dict(self) -> dict[str, object]:
        return {
            "producer": self.producer,
            "vm": self.vm,
            "kind": self.kind.value,
            "reason": self.reason,
            "since": self.since,
            "until": self.until,
            "rate": self.rate,
        }


@dataclass(frozen=True)
class Merged:
    """What the compiler needs from all producers' overlays: the isolated VMs, per VM the strictest rate
    limit (VM id, packets a second; sorted by VM), and the shielded VMs."""

    isolated: frozenset[str] = frozenset()
    rate_limits: tuple[tuple[str, int], ...] = ()
    shielded: frozenset[str] = frozenset()

    def rate_of(self, vm: str) -> int | None:
        return dict(self.rate_limits).get(vm)

    def __bool__(self) -> bool:
        return bool(self.isolated or self.rate_limits or self.shielded)


NOTHING = Merged()


def merge_overlays(overlays: Iterable[Overlay], now: float) -> Merged:
    """All producers' overlays -> what the compiler needs. Expired overlays count for nothing; of several
    rate limits on a VM the lowest rate wins. Order-free."""
    isolated: set[str] = set()
    shielded: set[str] = set()
    rates: dict[str, int] = {}
    for o in overlays:
        if not o.is_active(now):
            continue
        if o.kind is OverlayKind.ISOLATE:
            isolated.add(o.vm)
        elif o.kind is OverlayKind.SHIELD:
            shielded.add(o.vm)
        elif o.rate is not None:
            rates[o.vm] = min(o.rate, rates.get(o.vm, o.rate))
    return Merged(frozenset(isolated), tuple(sorted(rates.items())), frozenset(shielded))


def replace_producer(
    current: Iterable[Overlay], producer: str, overlays: Iterable[Overlay]
) -> tuple[tuple[Overlay, ...], tuple[Overlay, ...], tuple[Overlay, ...]]:
    """`producer`'s overlays replaced by `overlays` (whose producer must be it), the others kept: (all
    overlays after, the ones set (new or changed), the ones released). Sorted by key."""
    new = {o.key(): o for o in overlays}
    for o in new.values():
        if o.producer != producer:
            raise ValueError(f"overlay of producer {o.producer!r} passed as {producer!r}'s")
    old = {o.key(): o for o in current if o.producer == producer}
    others = [o for o in current if o.producer != producer]
    set_ = [o for k, o in new.items() if old.get(k) != o]
    released = [o for k, o in old.items() if k not in new]
    after = sorted([*others, *new.values()], key=Overlay.key)
    return tuple(after), tuple(sorted(set_, key=Overlay.key)), tuple(sorted(released, key=Overlay.key))


def expired(overlays: Iterable[Overlay], now: float) -> tuple[Overlay, ...]:
    """The overlays whose `until` has passed."""
    return tuple(o for o in overlays if not o.is_active(now))


def next_expiry(overlays: Iterable[Overlay], now: float) -> float | None:
    """When the next active overlay ends (None: none has an end)."""
    ends = [o.until for o in overlays if o.until is not None and o.is_active(now)]
    return min(ends) if ends else None
