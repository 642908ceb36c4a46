"""Overlay requests (from the CLI or the control socket) -> `Overlay`, every problem located.

A request is plain data: ``{"vm": ID, "kind": "isolate" | "rate-limit" | "shield", "reason": TEXT,
"for": DURATION (optional), "rate": N (rate-limit only)}``. The VM is checked by the caller (it knows the
VMs); everything else here, before anything is stored or applied. Pure: `now` is an argument.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from hyperfence.errors import InvalidInputError, Problem
from hyperfence.model.overlay import MAX_RATE, MAX_REASON, MIN_RATE, PRODUCERS, Merged, Overlay, OverlayKind
from hyperfence.model.policy import Direction, FloodLimit
from hyperfence.model.text import printable
from hyperfence.policy.resolve import OVERLAY_LIMIT_ID, Resolved

DURATION_RE = re.compile(r"(\d{1,9})([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 366 * 86400  # a year: longer is "until released" (leave --for out)
KINDS = {k.value: k for k in OverlayKind}


def parse_duration(text: object) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d` -> seconds; ValueError saying what was expected."""
    m = DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text
    elif m is not None:
        seconds = int(m.group(1)) * UNITS[m.group(2)]
    else:
        raise ValueError(
            f"{str(text)[:40]!r} is not a duration (expected a number with s, m, h or d: 90s, 15m, 2h)"
        )
    if not 1 <= seconds <= MAX_DURATION:
        raise ValueError(
            f"{str(text)[:40]!r} is out of range (expected 1 s to 366 d; leave it out for 'until released')"
        )
    return float(seconds)


def parse_rate(value: object) -> int:
    """New flows a second: an integer 1 to 10,000,000 (given as a number or its text)."""
    rate: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        rate = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        rate = int(value)
    if rate is None or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(
            f"{str(value)[:40]!r} is not a rate (expected new flows a second, {MIN_RATE} to {MAX_RATE:,})"
        )
    return rate


def parse_producer(value: object) -> str:
    if not isinstance(value, str) or value not in PRODUCERS:
        raise ValueError(f"{str(value)[:40]!r} is not a producer (expected one of {', '.join(PRODUCERS)})")
    return value


def parse_overlay(data: Any, *, producer: str, now: float) -> Overlay:
    """A request of `producer` made at `now` -> the overlay; `InvalidInputError` listing every problem."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise InvalidInputError("overlay request", [Problem("", "expected a mapping")])
    vm = data.get("vm")
    if not isinstance(vm, str) or not vm or len(vm) > 128:
        problems.append(Problem("vm", f"{str(vm)[:40]!r} is not a VM id"))
    raw_kind = data.get("kind")
    kind = KINDS.get(raw_kind) if isinstance(raw_kind, str) else None
    if kind is None:
        problems.append(
            Problem(
                "kind", f"{str(data.get('kind'))[:40]!r} is not an overlay kind (expected {', '.join(KINDS)})"
            )
        )
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        problems.append(Problem("reason", "a reason is required (why: it shows in `vm list` and the events)"))
        reason = ""
    elif len(reason) > MAX_REASON:
        problems.append(Problem("reason", f"is {len(reason)} characters (expected at most {MAX_REASON})"))
    until = None
    if data.get("for") is not None:
        try:
            until = now + parse_duration(data["for"])
        except ValueError as e:
            problems.append(Problem("for", str(e)))
    rate = None
    if kind is OverlayKind.RATE_LIMIT:
        try:
            rate = parse_rate(data.get("rate"))
        except ValueError as e:
            problems.append(Problem("rate", str(e)))
    elif data.get("rate") is not None:
        problems.append(Problem("rate", f"only a rate-limit has a rate (this is {data.get('kind')!r})"))
    if problems or kind is None or not isinstance(vm, str):
        raise InvalidInputError("overlay request refused", problems)
    return Overlay(
        producer=producer,
        vm=vm,
        kind=kind,
        reason=printable(reason.strip()),
        since=now,
        until=until,
        rate=rate,
    )


def overlay_limit(rate: int) -> FloodLimit:
    """A rate-limit overlay as a flood limit on what the VM sends (docs/policy.md, `limits`): new flows
    beyond `rate` a second (bursts of twice that, as a policy limit's default) are dropped and logged."""
    return FloodLimit(id=OVERLAY_LIMIT_ID, vms=(), directions=(Direction.OUT,), rate=rate, burst=2 * rate)


def with_overlays(resolved: Resolved, merged: Merged) -> Resolved:
    """`resolved` (the policy alone) with the merged overlays on it: the isolated VMs in `quarantine`, a
    rate-limited VM with one more flood limit on what it sends (after the policy's: each applies, so the
    stricter decides), a shielded VM marked `shielded`. VMs without an overlay keep their very objects (the
    compiler's cache and its incremental path key on them); an overlay on a VM the policy does not hold
    does nothing."""
    rates = dict(merged.rate_limits)
    vms = resolved.vms
    if rates or merged.shielded:
        vms = tuple(
            dataclasses.replace(
                vp,
                limits_out=vp.limits_out + ((overlay_limit(rates[vp.vm.id]),) if vp.vm.id in rates else ()),
                shielded=vp.vm.id in merged.shielded,
            )
            if vp.vm.id in rates or vp.vm.id in merged.shielded
            else vp
            for vp in resolved.vms
        )
    if vms is resolved.vms:
        return dataclasses.replace(resolved, quarantine=merged.isolated)
    # (what changed since the resolve's `base` is not known any more: the compiler looks at every VM)
    return dataclasses.replace(resolved, vms=vms, quarantine=merged.isolated, base=None, changed=None)
