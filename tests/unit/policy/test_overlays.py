"""Overlay requests, every problem located; overlays on a resolved policy."""

from __future__ import annotations

import dataclasses

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.overlay import Merged, OverlayKind
from hyperfence.model.policy import Direction
from hyperfence.policy.overlays import parse_duration, parse_overlay, parse_rate, with_overlays
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from tests.unit.policy.test_parse import doc


def problems(data: object) -> list[str]:
    with pytest.raises(InvalidInputError) as e:
        parse_overlay(data, producer="operator", now=1000.0)
    return [str(p) for p in e.value.problems]


def test_a_rate_limit_for_a_while() -> None:
    o = parse_overlay(
        {"vm": "x", "kind": "rate-limit", "reason": " scanning ", "rate": "20", "for": "15m"},
        producer="operator",
        now=1000.0,
    )
    assert (o.producer, o.vm, o.kind, o.reason, o.since, o.until, o.rate) == (
        "operator",
        "x",
        OverlayKind.RATE_LIMIT,
        "scanning",
        1000.0,
        1900.0,
        20,
    )


def test_an_isolation_until_released() -> None:
    o = parse_overlay({"vm": "x", "kind": "isolate", "reason": "r"}, producer="operator", now=5.0)
    assert o.until is None and o.rate is None


def test_every_problem_is_located() -> None:
    assert problems({"vm": "", "kind": "nuke", "reason": "", "for": "soon", "rate": 5}) == [
        "vm: '' is not a VM id",
        "kind: 'nuke' is not an overlay kind (expected isolate, rate-limit, shield)",
        "reason: a reason is required (why: it shows in `vm list` and the events)",
        "for: 'soon' is not a duration (expected a number with s, m, h or d: 90s, 15m, 2h)",
        "rate: only a rate-limit has a rate (this is 'nuke')",
    ]
    assert problems({"vm": "x", "kind": "rate-limit", "reason": "r", "rate": "0"}) == [
        "rate: '0' is not a rate (expected new flows a second, 1 to 10,000,000)"
    ]
    assert problems({"vm": "x", "kind": "isolate", "reason": "r" * 201}) == [
        "reason: is 201 characters (expected at most 200)"
    ]
    assert problems([]) == ["expected a mapping"]


def test_a_reason_cannot_forge_a_log_line() -> None:
    o = parse_overlay({"vm": "x", "kind": "shield", "reason": "a\nb"}, producer="operator", now=0.0)
    assert o.reason == "a\\x0ab"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), (30, 30)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-5m", "1w", "400d", "", "1.5h", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match=r"duration|range"):
        parse_duration(text)


@pytest.mark.parametrize("value", ["0", "10000001", "x", "-1", 2.5, None, True])
def test_bad_rates(value: object) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(value)


def test_overlays_on_a_resolved_policy() -> None:
    r = resolve_policy(parse_policy(doc(limits=[{"vms": "vm:vm1", "new_flows": 100}])))
    ids = {vp.vm.name: vp.vm.id for vp in r.vms}
    merged = Merged(frozenset({ids["vm2"]}), ((ids["vm1"], 7),), frozenset({ids["vm1"]}))
    out = with_overlays(r, merged)
    vm1, vm2 = out.vms
    assert out.quarantine == {ids["vm2"]}
    assert [lim.id for lim in vm1.limits_out] == ["l0", "overlay:rate"]  # the policy's limit stays
    assert (vm1.limits_out[-1].rate, vm1.limits_out[-1].directions) == (7, (Direction.OUT,))
    assert vm1.shielded and not vm2.shielded
    assert vm2 is r.vms[1]  # a VM without a rate limit or shield keeps its very object
    assert with_overlays(r, Merged()) == dataclasses.replace(r, quarantine=frozenset())
