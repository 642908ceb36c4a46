"""Heartbeats on a lab, with real agents and real packets: an agent dies -> its VM is isolated within
`misses` intervals; it comes back -> released. The demo narrates it; a kernel test asserts every check."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from hyperfence.errors import BugError
from hyperfence.lab.agents import LabAgents
from hyperfence.lab.experiment import Observation
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.agents import AgentMonitor

PING = {"id": "ping-1-2", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}


def _wait(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Seconds until `cond` held, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def _row(mon: AgentMonitor, name: str) -> dict[str, Any]:
    return next(r for r in mon.snapshot() if r["name"] == name)


def run_agent_experiment(
    s: LabSession, say: Callable[[str], None] = lambda _: None, *, interval: float = 1.0, misses: int = 3
) -> list[Observation]:
    if s.engine is None:
        raise BugError("run_agent_experiment outside the session's `with` block")
    obs: list[Observation] = []

    def check(step: str, what: str, expected: str, got: str) -> None:
        o = Observation(step, what, expected, got)
        obs.append(o)
        say(f"   {'ok ' if o.ok else 'BAD'} {what}: {got}" + ("" if o.ok else f" (expected {expected})"))

    doc = s.document([PING])
    doc["heartbeats"] = [{"id": "lab", "vms": "vms", "interval": interval, "misses": misses}]
    s.engine.store_policy(doc, source="agent experiment")
    s.engine.converge()
    agents = LabAgents(s.engine, s.plan, interval=interval)
    monitor = AgentMonitor(s.engine, startup_grace=2 * interval)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), name="agent-monitor", daemon=True)
    thread.start()
    try:
        say(
            f"\n[bold]Agents[/bold]: a real agent in every VM, one signed message every {interval:g} s over "
            f"its own channel; policy: {misses} missed beats -> isolate, release when beats resume."
        )
        agents.start_all()
        # Steady state: every agent has reported resources, and the monitor's start-up grace is over.
        up = _wait(lambda: all(r["status"] == "ok" and r["metrics"] for r in monitor.snapshot()), 15)
        time.sleep(max(0.0, monitor.tracker.started + monitor.tracker.startup_grace - time.time()))
        check("agents", "every agent beats", "ok", "ok" if up is not None else _statuses(monitor))
        row = _row(monitor, "vm2")
        say(f"   vm2 reports: {_metrics_line(row['metrics'])}")
        check("agents", "vm1 pings vm2 (allowed)", "2", str(s.ping("vm1", "vm2")[0]))

        _kill_and_watch(monitor, agents, check, say, interval=interval, misses=misses)
        check("isolate", "vm1 pings vm2 while vm2 is isolated", "0", str(s.ping("vm1", "vm2")[0]))
        check(
            "isolate",
            "vm1 (still beating) is not isolated",
            "no",
            "yes" if _row(monitor, "vm1")["isolated"] else "no",
        )

        say("\n[bold]vm2's agent comes back[/bold]")
        agents.start("vm2")
        back = _wait(lambda: _row(monitor, "vm2")["isolated"] is None, 20)
        check("release", "vm2 released when its beats resume", "yes", "yes" if back is not None else "no")
        if back is not None:
            say(f"   released {back:.1f} s after the agent restarted")
        check("release", "vm1 pings vm2 again", "2", str(s.ping("vm1", "vm2")[0]))
        monitor.save()
        events = [e["kind"] for e in s.engine.store.events(vm=_row(monitor, "vm2")["vm"], limit=200)]
        check(
            "release",
            "events recorded: isolated, released",
            "yes",
            "yes" if {"isolated", "released"} <= set(events) else str(events[-8:]),
        )
        return obs
    finally:
        agents.close()
        stop.set()
        thread.join(timeout=5)


Check = Callable[[str, str, str, str], None]


def _kill_and_watch(
    monitor: AgentMonitor,
    agents: LabAgents,
    check: Check,
    say: Callable[[str], None],
    *,
    interval: float,
    misses: int,
) -> None:
    say("\n[bold]vm2's agent is killed[/bold] (SIGKILL: no goodbye)")
    last_seen = _row(monitor, "vm2")["last_seen"]
    agents.kill("vm2")
    killed = time.time()
    took = _wait(lambda: _row(monitor, "vm2")["isolated"] is not None, misses * interval + 5, 0.05)
    row = _row(monitor, "vm2")
    since_last = (row["isolated_since"] or time.time()) - (row["last_seen"] or last_seen)
    check(
        "isolate",
        f"vm2 isolated within {misses} intervals of its last message (+1 s to decide and apply)",
        "yes",
        "yes" if took is not None and since_last <= misses * interval + 1.0 else f"no ({since_last:.1f} s)",
    )
    if took is not None:
        say(
            f"   isolated {row['isolated_since'] - killed:.1f} s after the kill, {since_last:.1f} s after its "
            f"last message: {row['isolated']}"
        )


def _statuses(monitor: AgentMonitor) -> str:
    return ", ".join(f"{r['name']}={r['status']}" for r in monitor.snapshot())


def _metrics_line(m: dict[str, float]) -> str:
    keys = [k for k in sorted(m) if not k.startswith("net.")][:6]
    return ", ".join(f"{k}={m[k]:g}" for k in keys) or "(no metrics yet)"
