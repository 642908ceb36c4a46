"""The daemon's housekeeping between changes (no kernel needed: the engine's nft context is never opened)."""

from __future__ import annotations

import gc
import itertools
import threading
import time
from pathlib import Path

import pytest

from hyperfence.daemon import CHECKPOINT_IDLE, Daemon
from hyperfence.reconcile.engine import Engine
from hyperfence.testing import FailingTicker


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return Daemon(Engine(netns=None, state_dir=str(tmp_path)), traffic_log=False)


def test_the_store_is_checkpointed_only_after_an_idle_period(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    monkeypatch.setattr(daemon.engine.store, "checkpoint", lambda: calls.append(time.monotonic()))
    daemon._checkpoint_when_idle()
    assert calls == []  # nothing changed yet
    daemon._last_change = time.monotonic()
    daemon._checkpoint_when_idle()
    assert calls == []  # a change just now: a checkpoint's fsync could stall the next apply
    daemon._last_change = time.monotonic() - CHECKPOINT_IDLE - 0.1
    daemon._checkpoint_when_idle()
    daemon._checkpoint_when_idle()
    assert len(calls) == 1  # once per quiet period


def test_a_real_checkpoint_folds_the_write_ahead_log(daemon: Daemon) -> None:
    store = daemon.engine.store
    store.put_policy({"networks": [], "blob": "x" * 200_000}, source="test")
    db = Path(store.path)
    assert db.stat().st_size < 100_000  # the new generation is still in the write-ahead log only
    daemon._last_change = time.monotonic() - CHECKPOINT_IDLE - 0.1
    daemon._checkpoint_when_idle()
    assert db.stat().st_size > 200_000  # folded into the database file
    stored = store.get_policy()
    assert stored is not None and stored.document["blob"] == "x" * 200_000


def test_tidy_freezes_what_exists_and_a_full_tidy_collects_first(daemon: Daemon) -> None:
    gc.unfreeze()
    try:
        daemon._tidy(full=False)
        assert gc.get_freeze_count() > 0
        daemon._tidy(full=True)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_failing_loop_is_restarted_reported_and_named_in_the_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from hyperfence.daemon import request
    from hyperfence.reconcile import supervisor
    from hyperfence.reconcile.agents import AgentMonitor

    monkeypatch.setattr(supervisor, "BACKOFF_MIN", 0.3)
    engine = Engine(netns=None, state_dir=str(tmp_path))
    monitor = AgentMonitor(engine)
    failures = [2]
    real_round = monitor.round

    def round_that_fails_twice(timeout: float = 0.2) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("a bug in a round")
        real_round(timeout)

    monkeypatch.setattr(monitor, "round", round_that_fails_twice)
    d = Daemon(
        engine,
        traffic_log=False,
        agents=monitor,
        watch_drift=False,
        watch_addresses=False,
        learn_leases=False,
        watch_ports=False,
    )
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = request(str(tmp_path), {"op": "status"}, timeout=2)
            if status and status["loops"].get("agents", {}).get("state") == "down":
                break
            time.sleep(0.02)
        assert status is not None and status["healthy"] is False and status["down"] == ["agents"], status
        assert status["loops"]["agents"]["last_error"] == "RuntimeError: a bug in a round"
        while time.monotonic() < deadline:  # restarted: healthy again once the bug stops
            status = request(str(tmp_path), {"op": "status"}, timeout=2)
            if status and status["healthy"] and status["loops"]["agents"]["failures"] == 2:
                break
            time.sleep(0.05)
        assert status is not None and status["healthy"] is True, status
        assert {name for name, loop in status["loops"].items() if loop["state"] == "running"} == {
            "control",
            "reconcile",
            "agents",
        }
        events = engine.store.events(kind="loop-failed")
        assert [(e["loop"], e["failures"]) for e in events] == [("agents", 1), ("agents", 2)]
    finally:
        d.stop()
        t.join(timeout=5)
        engine.close()


def test_log_lines_cannot_be_forged_from_a_message() -> None:
    import logging

    from hyperfence.daemon import PrintableFormatter

    fmt = PrintableFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "VM %s said %s", ("vm1", "hi\nERROR forged\x1b[2J"), None
    )
    assert fmt.format(record) == "WARNING VM vm1 said hi\\x0aERROR forged\\x1b[2J"


def test_repair_requests_are_coalesced_into_one_full_converge_with_their_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Daemon(
        Engine(netns=None, state_dir=str(tmp_path)),
        traffic_log=False,
        watch_drift=False,
        learn_leases=False,
        poll=60,
        resync=3600,
    )
    calls: list[tuple[bool, str | None]] = []
    done = threading.Event()

    def converge(*, full: bool, cause: str | None = None) -> dict[str, object]:
        calls.append((full, cause))
        if len(calls) == 2:
            done.set()
        return {"ok": True}

    monkeypatch.setattr(d, "_converge", converge)
    monkeypatch.setattr(d.engine, "policy_key", lambda: None)
    d.repair_now("generation 5 by process 7 (nft)")
    d.repair_now("generation 6 by process 7 (nft)")
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        assert done.wait(10)
    finally:
        d.stop()
        t.join(5)
        d.engine.close()  # the address watcher may have opened the kernel (a socket) meanwhile
    assert calls == [
        (True, "daemon start"),
        (True, "generation 5 by process 7 (nft); generation 6 by process 7 (nft)"),
    ]


@pytest.mark.parametrize("backend", ["sqlite", "fake"])
def test_a_stored_version_wakes_the_reconcile_loop_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The loop sleeps on the store's change feed: a new generation (from another process for SQLite, a
    second connection standing in for it; from another thread for the fake) is converged long before `poll`
    (60 s here) would have looked, and a stop ends the sleep at once."""
    from hyperfence.adapters.store import Store
    from hyperfence.testing import FakeStore

    engine = Engine(netns=None, state_dir=str(tmp_path))
    if backend == "fake":
        engine.store.close()
        engine.store = FakeStore()  # type: ignore[assignment]
    d = Daemon(
        engine,
        traffic_log=False,
        watch_drift=False,
        watch_addresses=False,
        learn_leases=False,
        watch_ports=False,
        poll=60,
        resync=3600,
    )
    converged: list[tuple[float, str | None]] = []
    monkeypatch.setattr(
        d,
        "_converge",
        lambda *, full, cause=None: converged.append((time.monotonic(), engine.policy_key())) or {"ok": True},
    )
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not converged and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the loop is asleep on the feed now
        assert [key for _, key in converged] == [None]  # the start's converge; no policy yet
        other = Store(str(tmp_path)) if backend == "sqlite" else engine.store
        t0 = time.monotonic()
        other.put_policy({"networks": []}, source="another writer")
        while len(converged) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [key for _, key in converged] == [None, "gen:1"]
        assert converged[1][0] - t0 < 5  # woken by the feed, not by the 60 s poll
        if other is not engine.store:
            other.close()
    finally:
        t1 = time.monotonic()
        d.stop()
        t.join(5)
        stopped = time.monotonic() - t1
        engine.close()
    assert not t.is_alive() and stopped < 2


def test_overlay_ops_keep_the_error_kind_and_converge_only_on_a_change(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.unit.policy.test_parse import doc

    daemon.engine.store_policy(doc(), source="test")
    converges: list[bool] = []
    monkeypatch.setattr(daemon, "_converge", lambda *, full: converges.append(full) or {"ok": True})
    bad = daemon._dispatch({"op": "overlay-set", "overlay": {"vm": "ghost", "kind": "isolate"}})
    assert bad["ok"] is False and bad["error_kind"] == "InvalidInputError"
    assert "vm: 'ghost' is not a VM of the policy" in bad["error"] and "reason:" in bad["error"]
    req = {"op": "overlay-set", "overlay": {"vm": "vm1", "kind": "isolate", "reason": "r", "for": "1h"}}
    ok = daemon._dispatch(req)
    assert ok["ok"] and ok["changed"] and ok["overlay"]["producer"] == "operator"
    assert converges == [False]
    released = daemon._dispatch({"op": "overlay-release", "vm": "vm1", "producer": "heartbeat"})
    assert released["ok"] and not released["changed"] and released["isolated"]  # the operator's stays
    assert converges == [False]
    released = daemon._dispatch({"op": "overlay-release", "vm": "vm1", "producer": "operator"})
    assert released["ok"] and released["changed"] and not released["isolated"]
    assert [o["kind"] for o in released["released"]] == ["isolate"]
    assert converges == [False, False]
    nobody = daemon._dispatch({"op": "overlay-release", "vm": "vm1", "producer": "nobody"})
    assert nobody["error_kind"] == "InvalidInputError" and "producer: 'nobody'" in nobody["error"]


def test_the_loop_wakes_when_an_overlay_runs_out(daemon: Daemon) -> None:
    """An operator's `--for 90s` is released on time, not at the feed's safety-net timeout (`poll`)."""
    from hyperfence.model.overlay import Overlay, OverlayKind

    daemon.poll = 60
    far = time.monotonic() + 3600
    assert daemon._wait_time(far) == 60
    now = daemon.engine.clock()
    daemon.engine.overlays = (
        Overlay("operator", "vm1", OverlayKind.ISOLATE, "r", now, until=now + 2),
        Overlay("operator", "vm2", OverlayKind.SHIELD, "r", now),  # until released: no end
    )
    assert 1.5 < daemon._wait_time(far) <= 2.1


class Counting:
    """A healthy periodic monitor: counts its ticks."""

    name = "counting"
    interval = 0.01

    def __init__(self) -> None:
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1


def test_a_monitor_that_raises_on_every_tick_is_restarted_with_backoff_reported_and_the_others_keep_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acceptance of issue 13's monitors: the daemon's real composition (its list of monitors, the agent
    monitor among them, the control socket and the reconcile loop) on an in-memory store, with one more
    monitor that raises on every tick and one that is healthy."""
    from hyperfence.daemon import request
    from hyperfence.reconcile import supervisor
    from hyperfence.reconcile.agents import AgentMonitor
    from hyperfence.reconcile.monitor import Ticking
    from hyperfence.testing import FakeStore

    monkeypatch.setattr(supervisor, "BACKOFF_MIN", 0.1)
    monkeypatch.setattr(supervisor, "BACKOFF_MAX", 0.8)
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store.close()
    store = engine.store = FakeStore()  # type: ignore[assignment]
    d = Daemon(
        engine,
        traffic_log=False,
        agents=AgentMonitor(engine),
        watch_drift=False,
        watch_addresses=False,
        learn_leases=False,
        watch_ports=False,
        poll=60,
        resync=3600,
    )
    assert [m.name for m in d.monitors] == ["agents"]
    failing, counting = FailingTicker(), Counting()
    d.monitors += [Ticking(failing), Ticking(counting)]  # a monitor is one more entry in the list
    converged: list[str | None] = []
    monkeypatch.setattr(
        d, "_converge", lambda *, full, cause=None: converged.append(engine.policy_key()) or {"ok": True}
    )
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while len(failing.ticks) < 5:
            assert time.monotonic() < deadline, failing.ticks
            time.sleep(0.01)
        # restarted after 0.1, 0.2, 0.4, 0.8 s (the backoff doubles up to its maximum); a loaded machine
        # only makes a gap longer, by less than a second
        gaps = [b - a for a, b in itertools.pairwise(failing.ticks[:5])]
        for gap, backoff in zip(gaps, [0.1, 0.2, 0.4, 0.8], strict=True):
            assert backoff <= gap < backoff + 1.0, gaps
        status = request(str(tmp_path), {"op": "status"}, timeout=5)
        assert status is not None and status["healthy"] is False, status
        loop = status["loops"]["failing"]
        assert loop["failures"] >= 4 and loop["last_error"] == "RuntimeError: a bug in a tick", loop
        assert status["down"] in ([], ["failing"])  # down between its runs; running for a tick
        events = store.events(kind="loop-failed")
        assert [(e["loop"], e["failures"]) for e in events][:4] == [("failing", n) for n in range(1, 5)]
        assert events[0]["error"] == "RuntimeError: a bug in a tick"
        # meanwhile the others keep working: the healthy monitor ticks, the agents' and the control
        # socket run, and a stored version is converged by the reconcile loop
        ticked = counting.ticks
        store.put_policy({"networks": []}, source="test")
        while "gen:1" not in converged or counting.ticks < ticked + 10:
            assert time.monotonic() < deadline, (converged, counting.ticks)
            time.sleep(0.01)
        states = {name: loop["state"] for name, loop in d.supervisor.status().items()}
        assert {n: s for n, s in states.items() if n != "failing"} == dict.fromkeys(
            ["control", "reconcile", "agents", "counting"], "running"
        )
        assert all(loop["failures"] == 0 for n, loop in d.supervisor.status().items() if n != "failing")
    finally:
        d.stop()
        t.join(5)
        engine.close()
    assert not t.is_alive()


def test_a_change_feed_that_fails_fails_the_reconcile_loop_which_is_reported_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's change-feed watcher is no unsupervised thread: its death fails the reconcile loop that
    waits on it (a `loop-failed` event naming it, the status), the supervisor restarts that loop, whose
    next wait starts a new watcher: another writer's version is converged at once again, not at `poll`."""
    from hyperfence.adapters.store import Store
    from hyperfence.adapters.store import feed as store_feed
    from hyperfence.reconcile import supervisor

    monkeypatch.setattr(supervisor, "BACKOFF_MIN", 0.3)
    broken = [1]

    class FailingWatch(store_feed.DirectoryWatch):
        def read(self) -> set[str]:
            if broken[0]:
                broken[0] -= 1
                raise OSError(9, "Bad file descriptor")
            return super().read()

    monkeypatch.setattr(store_feed, "DirectoryWatch", FailingWatch)
    engine = Engine(netns=None, state_dir=str(tmp_path))
    d = Daemon(
        engine,
        traffic_log=False,
        watch_drift=False,
        watch_addresses=False,
        learn_leases=False,
        watch_ports=False,
        poll=60,
        resync=3600,
    )
    converged: list[str | None] = []
    monkeypatch.setattr(
        d, "_converge", lambda *, full, cause=None: converged.append(engine.policy_key()) or {"ok": True}
    )
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    other = Store(str(tmp_path))  # another writer (as `hyperfence policy apply` is)
    try:
        deadline = time.monotonic() + 20
        while not converged:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # the reconcile loop is asleep on the feed now
        other.add_event("x", {})  # a write: the watcher reads its events, and fails
        while not engine.store.events(kind="loop-failed"):
            assert time.monotonic() < deadline, d.supervisor.status()
            time.sleep(0.01)
        (event,) = engine.store.events(kind="loop-failed")
        assert event["loop"] == "reconcile" and event["failures"] == 1
        assert "change feed failed (OSError: [Errno 9] Bad file descriptor)" in event["error"]
        assert d.health()["loops"]["reconcile"]["failures"] == 1
        while d.supervisor.status()["reconcile"]["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # asleep on the feed again, with a new watcher
        t0 = time.monotonic()
        other.put_policy({"networks": []}, source="another writer")
        while "gen:1" not in converged:
            assert time.monotonic() < deadline, converged
            time.sleep(0.01)
        assert time.monotonic() - t0 < 10  # the feed, not the 60 s safety net
        assert engine.store._feed.restarts == 1
    finally:
        d.stop()
        t.join(5)
        other.close()
        engine.close()


def test_a_reconcile_request_gets_the_loop_s_answer_only_for_the_version_it_says_it_stored(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`policy apply` stores generation N, then asks the daemon; when the reconcile loop (woken by the
    store) applied N first, the caller is told what applying N changed. A bare `reconcile`, or one for
    another version, is answered for its own converge: it must not be told of a change it did not cause."""
    applied = {"ok": True, "policy": "gen:1", "changed": True, "summary": "+1 rule", "ms": 3.0}
    daemon._last_applied = ("gen:1", applied)
    monkeypatch.setattr(
        daemon, "_converge", lambda *, full: {"ok": True, "policy": "gen:1", "changed": False, "summary": ""}
    )
    assert daemon._dispatch({"op": "reconcile", "policy": "gen:1"}) == applied
    bare = daemon._dispatch({"op": "reconcile"})
    assert bare["ok"] and bare["changed"] is False and bare["summary"] == ""
    other = daemon._dispatch({"op": "reconcile", "policy": "gen:2"})
    assert other["changed"] is False
    assert daemon._dispatch({"op": "reconcile", "policy": 1})["changed"] is False
