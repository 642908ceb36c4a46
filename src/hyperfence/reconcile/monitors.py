"""The monitors the daemon runs: one list, in start order.

Adding a monitor is one class (a `Monitor`, or a `Ticker` wrapped in `Ticking`; `reconcile/monitor.py`) and
one line in `monitors()` below. The daemon (`daemon.py:Daemon.run`) primes the `Primed` ones, converges once,
then starts each under its supervisor, which restarts one that fails with backoff and reports it; nothing in
the daemon names a monitor.

Every monitor here starts after the daemon's first converge: the compiled policy names what several of them
watch (the NFLOG groups of the traffic log and the lease learner, the managed bridges of the inventory), and
the agent monitor's first round must find the isolations that converge put in place. The control socket and
the reconcile loop are the daemon's own loops, not monitors: the control socket runs before that converge,
the reconcile loop right after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.bridge_ports import BridgePortWatcher
from hyperfence.reconcile.drift import DriftWatcher
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.host_addresses import HostAddressWatcher
from hyperfence.reconcile.inventory import InventoryWatcher
from hyperfence.reconcile.leases import LeaseLearner
from hyperfence.reconcile.monitor import Monitor, Ticking
from hyperfence.reconcile.preconditions import Preconditions
from hyperfence.reconcile.traffic import TrafficLog
from hyperfence.ruleset.compile import TABLES

Repair = Callable[[str], None]  # the daemon's `repair_now`: a full converge as soon as it can, with a cause


@dataclass(frozen=True)
class MonitorOptions:
    """Which monitors run (the daemon's flags; `hyperfence daemon` runs them all), and the ones built
    before the daemon because something else needs them first (the preconditions are ensured before the
    engine applies anything; the agent monitor and the inventory are asked by the control socket's ops)."""

    watch_drift: bool = True
    watch_addresses: bool = True
    watch_ports: bool = True
    traffic_log: bool = True
    learn_leases: bool = True
    preconditions: Preconditions | None = None
    inventory: InventoryWatcher | None = None
    agents: AgentMonitor | None = None


def monitors(engine: Engine, options: MonitorOptions, *, repair: Repair) -> list[Monitor]:
    """Every monitor `options` asks for, in start order; the ones the daemon builds are new objects (a
    monitor holds its run's state: build the list once per daemon)."""
    tables = [(t.family, t.name) for t in TABLES]
    listed: list[Monitor | None] = [
        Ticking(options.preconditions)
        if options.preconditions is not None
        else None,  # br_netfilter and its sysctl
        DriftWatcher(
            netns=engine.netns,
            tables=tables,
            is_own=engine.owns_commit,
            repair=repair,
            untouched=engine.note_untouched,  # commits elsewhere keep the firewall's record of the kernel
        )
        if options.watch_drift
        else None,  # the kernel's nftables events: someone else's commit to hyperfence's tables
        HostAddressWatcher(engine) if options.watch_addresses else None,  # what `host` and `outside` cover
        BridgePortWatcher(engine, on_change=repair) if options.watch_ports else None,  # undeclared devices
        TrafficLog(engine) if options.traffic_log else None,  # NFLOG -> <state>/traffic.jsonl
        LeaseLearner(engine) if options.learn_leases else None,  # DHCP leases teach VMs' addresses
        options.inventory,  # libvirt's VMs
        options.agents,  # the agents' channels, heartbeats and isolation
    ]
    return [m for m in listed if m is not None]
