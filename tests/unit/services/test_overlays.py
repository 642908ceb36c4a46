"""Overlays keyed by producer in the engine: one producer never undoes another's isolation (the
acceptance test of issue 13), persistence across a restart, events, expiry. No kernel: converge is
replaced by a recorder, and the compiled ruleset is read instead."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hyperfence.health.tracker import AgentRecord, Decision
from hyperfence.model.kernel import Flavour
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import BRIDGE
from tests.unit.policy.test_parse import doc

ISO = OverlayKind.ISOLATE


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    clock = Clock()
    e = Engine(
        netns=None,
        state_dir=str(tmp_path),
        flavour=Flavour.BR_NETFILTER,
        read_addresses=lambda _ns: (),
        clock=clock,
    )
    e.store.put_policy(doc(), source="test")
    converges: list[frozenset[str]] = []
    e.converge = lambda **_: converges.append(e.quarantine) or (None, None)  # type: ignore[method-assign]
    e.test_clock, e.test_converges = clock, converges  # type: ignore[attr-defined]
    yield e
    e.close()


def vm1(engine: Engine) -> str:
    compiled = engine.compiled()
    assert compiled is not None
    return next(v.id for v in compiled.policy.vms if v.name == "vm1")


def isolated_in_ruleset(engine: Engine) -> set[str]:
    """The ports in the compiled ruleset's quarantine set (what the kernel would hold)."""
    compiled = engine.compiled()
    assert compiled is not None
    qset = [s for s in compiled.ruleset.sets if (s.table, s.name) == (BRIDGE, "quarantine")]
    return {e.strip('"') for e in qset[0].elements} if qset else set()


def operator(engine: Engine, vm: str, *, isolate: bool) -> bool:
    overlays = (Overlay("operator", vm, ISO, "operator: suspicious", time.time()),) if isolate else ()
    return engine.set_overlays("operator", overlays)


def monitor_for(engine: Engine, vm: str) -> AgentMonitor:
    engine.store.enroll_agent(AgentRecord(vm, b"k" * 32, {"type": "unix", "path": "/nonexistent"}))
    return AgentMonitor(engine, startup_grace=0, clock=engine.test_clock)  # type: ignore[attr-defined]


def test_operator_isolates_heartbeat_recovers_vm_stays_isolated(engine: Engine) -> None:
    vm = vm1(engine)
    mon = monitor_for(engine, vm)
    try:
        assert operator(engine, vm, isolate=True)
        mon._carry_out(Decision(vm, "isolate", "silent for 30 s"), engine.test_clock())  # type: ignore[attr-defined]
        assert engine.quarantine == {vm} and isolated_in_ruleset(engine) == {"vp1"}
        # the heartbeat recovers: the heartbeat producer releases its own isolation
        mon._carry_out(Decision(vm, "release", "heard again"), engine.test_clock())  # type: ignore[attr-defined]
        assert not mon.tracker.records[vm].isolated
        assert engine.quarantine == {vm}, "the operator's isolation was undone by the heartbeat's release"
        assert isolated_in_ruleset(engine) == {"vp1"}
        assert operator(engine, vm, isolate=False)  # only the operator's release frees it
        assert engine.quarantine == frozenset() and isolated_in_ruleset(engine) == set()
    finally:
        mon.hub.close()


def test_heartbeat_isolates_operator_isolates_and_releases_vm_stays_isolated(engine: Engine) -> None:
    vm = vm1(engine)
    mon = monitor_for(engine, vm)
    try:
        mon._carry_out(Decision(vm, "isolate", "silent for 30 s"), engine.test_clock())  # type: ignore[attr-defined]
        assert engine.test_converges[-1] == {vm}  # type: ignore[attr-defined]
        assert not operator(engine, vm, isolate=True)  # already isolated: nothing to converge
        assert not operator(engine, vm, isolate=False)
        assert engine.quarantine == {vm}, "the operator's release undid the heartbeat's isolation"
        assert isolated_in_ruleset(engine) == {"vp1"}
        mon._carry_out(Decision(vm, "release", "heard again"), engine.test_clock())  # type: ignore[attr-defined]
        assert engine.quarantine == frozenset() and isolated_in_ruleset(engine) == set()
        assert engine.test_converges[-1] == frozenset()  # type: ignore[attr-defined]
    finally:
        mon.hub.close()


def test_overlays_survive_a_restart_and_are_in_place_before_the_first_converge(
    engine: Engine, tmp_path: Path
) -> None:
    vm = vm1(engine)
    operator(engine, vm, isolate=True)
    engine.set_overlays(
        "detector", (Overlay("detector", vm, OverlayKind.RATE_LIMIT, "scan", 5.0, until=None, rate=9),)
    )
    again = Engine(
        netns=None, state_dir=str(tmp_path), flavour=Flavour.BR_NETFILTER, read_addresses=lambda _: ()
    )
    try:
        assert again.overlays == engine.overlays
        assert again.quarantine == {vm}
        compiled = again.compiled()
        assert compiled is not None and compiled.overlays.rate_limits == ((vm, 9),)
    finally:
        again.close()
    assert (tmp_path / "hyperfence.db").stat().st_mode & 0o777 == 0o600


def test_events_name_the_producer(engine: Engine) -> None:
    vm = vm1(engine)
    operator(engine, vm, isolate=True)
    operator(engine, vm, isolate=False)
    events = [(e["kind"], e["producer"], e["overlay"]) for e in engine.store.events(vm=vm)]
    assert events == [("overlay-set", "operator", "isolate"), ("overlay-released", "operator", "isolate")]


def test_an_expired_overlay_counts_for_nothing_and_is_dropped(engine: Engine) -> None:
    vm = vm1(engine)
    clock: Clock = engine.test_clock  # type: ignore[attr-defined]
    engine.set_overlays("operator", (Overlay("operator", vm, ISO, "r", clock.now, until=clock.now + 60),))
    assert isolated_in_ruleset(engine) == {"vp1"}
    assert not engine.expire_overlays()
    clock.now += 60
    assert isolated_in_ruleset(engine) == set()  # counts for nothing even before it is dropped
    assert engine.expire_overlays()
    assert engine.overlays == () and engine.store.overlays() == ()
    (ev,) = engine.store.events(vm=vm, kind="overlay-released")
    assert ev["why"] == "expired"


def test_a_rate_limit_and_a_shield_reach_the_vms_chains(engine: Engine) -> None:
    vm = vm1(engine)
    engine.set_overlays(
        "operator",
        (
            Overlay("operator", vm, OverlayKind.RATE_LIMIT, "r", 0.0, rate=4),
            Overlay("operator", vm, OverlayKind.SHIELD, "s", 0.0),
        ),
    )
    compiled = engine.compiled()
    assert compiled is not None
    rules = [r.comment for r in compiled.ruleset.rules]
    assert "sys:flood:overlay:rate" in rules and "sys:shield" in rules
    engine.set_overlays("operator", ())
    compiled = engine.compiled()
    assert compiled is not None
    assert not {"sys:flood:overlay:rate", "sys:shield"} & {r.comment for r in compiled.ruleset.rules}
