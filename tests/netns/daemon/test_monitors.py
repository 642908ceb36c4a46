"""Issue 13's acceptance for monitors, on the real kernel: a monitor that raises on every tick, registered next
to the daemon's real ones (the same composition as `hyperfence daemon`, run on a thread of this process), is
restarted with a doubling backoff and reported (`hyperfence status`, `loop-failed` events), while the others
keep working: a policy change by `hyperfence policy apply` still reaches the kernel (real packets), and a rule
deleted by hand is still repaired by the drift watch."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hyperfence.daemon import Daemon, request
from hyperfence.lab.session import LabSession
from hyperfence.reconcile import supervisor
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.monitor import Ticking
from hyperfence.reconcile.preconditions import Preconditions
from hyperfence.ruleset.compile import vm_sid
from hyperfence.testing import FailingTicker

pytestmark = pytest.mark.kernel

PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
BACKOFFS = [0.2, 0.4, 0.8, 1.6]  # BACKOFF_MIN doubling up to BACKOFF_MAX (set below)
REAL = ["kernel", "drift", "addresses", "ports", "traffic", "leases", "agents"]  # `hyperfence daemon`'s


@pytest.fixture
def lab_vms() -> int:
    return 2


def hf(lab: LabSession, *argv: str) -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run([*base, *argv], capture_output=True, text=True, timeout=60, check=False)


def rules_of(lab: LabSession, chain: str) -> dict[str, int]:
    r = lab.run("host", ["nft", "-j", "-a", "list", "chain", "bridge", "hyperfence", chain])
    assert r.returncode == 0, r.stderr
    objs: list[dict[str, Any]] = json.loads(r.stdout)["nftables"]
    return {o["rule"].get("comment", ""): o["rule"]["handle"] for o in objs if "rule" in o}


def wait_for(pred: Any, what: str, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def check_reported(lab: LabSession) -> None:
    """`hyperfence status` (exit 1: a loop is not healthy) names the failing monitor and its error; the store
    holds a `loop-failed` event for each failure."""
    assert lab.engine is not None
    shown = hf(lab, "status")
    assert shown.returncode == 1, shown
    line = next(ln for ln in shown.stdout.splitlines() if "failing" in ln)
    assert "RuntimeError: a bug in a tick" in line, shown.stdout
    status = json.loads(hf(lab, "status", "--json").stdout)
    assert status["healthy"] is False and status["loops"]["failing"]["failures"] >= 4, status
    events = lab.engine.store.events(kind="loop-failed")
    assert [(e["loop"], e["failures"]) for e in events][:4] == [("failing", n) for n in range(1, 5)]
    assert {e["error"] for e in events} == {"RuntimeError: a bug in a tick"}


def check_others_work(lab: LabSession, tmp_path: Path) -> None:
    """A policy change by `hyperfence policy apply` reaches the kernel (real pings), and a rule deleted by
    hand is repaired by the drift watch."""
    assert lab.engine is not None
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(lab.document([PING_1_2])))
    applied = hf(lab, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied
    assert "applied by the daemon" in applied.stdout and "no change" not in applied.stdout, applied.stdout
    assert lab.ping("vm1", "vm2")[0] == 2
    bare = request(lab.state_dir, {"op": "reconcile"})  # who did not store a version hears of none
    assert bare is not None and bare["ok"] and bare["changed"] is False, bare
    assert lab.engine.current is not None
    vm2 = next(v for v in lab.engine.current.policy.vms if v.name == "vm2")
    chain = f"{vm_sid(vm2.id)}_in"
    handle = rules_of(lab, chain)["rule:ping#1"]
    r = lab.run("host", ["nft", "delete", "rule", "bridge", "hyperfence", chain, "handle", str(handle)])
    assert r.returncode == 0, r.stderr
    took = wait_for(lambda: "rule:ping#1" in rules_of(lab, chain), "the deleted rule repaired")
    print(f"a deleted rule repaired in {took:.3f} s while the failing monitor kept failing")
    assert lab.ping("vm1", "vm2")[0] == 2


def test_a_monitor_that_raises_on_every_tick_is_restarted_reported_and_the_others_keep_working(
    lab: LabSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_MIN", BACKOFFS[0])
    monkeypatch.setattr(supervisor, "BACKOFF_MAX", BACKOFFS[-1])
    lab.apply([])  # no rule: vm1 cannot ping vm2
    engine = lab.engine
    assert engine is not None
    assert lab.ping("vm1", "vm2")[0] == 0
    daemon = Daemon(engine, resync=3600, agents=AgentMonitor(engine), preconditions=Preconditions(engine))
    assert [m.name for m in daemon.monitors] == REAL  # the daemon's own list
    failing = FailingTicker()
    daemon.monitors.append(Ticking(failing))  # next to the real ones
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(failing.ticks) >= 5, "five runs of the failing monitor")
        gaps = [b - a for a, b in itertools.pairwise(failing.ticks[:5])]
        print("gaps between its runs (s):", ", ".join(f"{g:.3f}" for g in gaps))
        for gap, backoff in zip(gaps, BACKOFFS, strict=True):
            assert backoff <= gap < backoff + 1.0, gaps  # doubling; a loaded machine adds a little
        check_reported(lab)
        check_others_work(lab, tmp_path)
        loops = daemon.supervisor.status()
        assert loops["failing"]["failures"] > 4  # still failing, still restarted
        others = {n: (s["state"], s["failures"]) for n, s in loops.items() if n != "failing"}
        assert others == dict.fromkeys(["control", "reconcile", *REAL], ("running", 0))
    finally:
        daemon.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
