"""The one list of monitors (reconcile/monitors.py): which run, in which order, built from the options."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.drift import DriftWatcher
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import InventoryWatcher
from hyperfence.reconcile.monitor import Monitor, Primed, Ticking
from hyperfence.reconcile.monitors import MonitorOptions, monitors
from hyperfence.reconcile.preconditions import Preconditions

# every monitor of `hyperfence daemon --libvirt`, in start order (tests/netns/daemon/test_stop.py has them)
ALL = ["kernel", "drift", "addresses", "ports", "traffic", "leases", "inventory", "agents"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(netns=None, state_dir=str(tmp_path))  # nothing here opens the kernel
    yield engine
    engine.close()


def test_the_daemon_s_monitors_in_their_order_each_a_monitor(engine: Engine) -> None:
    asked: list[str] = []
    agents, inventory = AgentMonitor(engine), InventoryWatcher(engine, "test:///nowhere")
    preconditions = Preconditions(engine)
    found = monitors(
        engine,
        MonitorOptions(preconditions=preconditions, inventory=inventory, agents=agents),
        repair=asked.append,
    )
    assert [m.name for m in found] == ALL
    for m in found:
        assert callable(m.run)
    assert found[-1] is agents and found[-2] is inventory  # given ones are the objects given
    assert isinstance(found[0], Ticking) and found[0].ticker is preconditions  # a Ticker, ticked
    assert [m.name for m in found if isinstance(m, Primed)] == ["inventory"]  # primed before a converge
    drift = found[1]
    assert isinstance(drift, DriftWatcher)
    drift.repair("a cause")
    assert asked == ["a cause"]  # the daemon's repair_now is what the drift watcher asks


def test_what_the_options_leave_out_is_not_built(engine: Engine) -> None:
    none = MonitorOptions(
        watch_drift=False, watch_addresses=False, watch_ports=False, traffic_log=False, learn_leases=False
    )
    assert monitors(engine, none, repair=lambda _: None) == []
    assert [m.name for m in monitors(engine, MonitorOptions(), repair=lambda _: None)] == [
        "drift",
        "addresses",
        "ports",
        "traffic",
        "leases",
    ]


def test_each_call_builds_new_monitors(engine: Engine) -> None:
    """A monitor holds its run's state: two daemons (or two lists) never share one."""
    first = monitors(engine, MonitorOptions(), repair=lambda _: None)
    second = monitors(engine, MonitorOptions(), repair=lambda _: None)
    assert all(a is not b for a, b in zip(first, second, strict=True))


def test_a_monitor_class_needs_only_a_name_and_run() -> None:
    class Quiet:
        name = "quiet"

        def run(self, stop: threading.Event) -> None:
            stop.wait()

    monitor: Monitor = Quiet()  # (mypy checks the Protocol here)
    assert monitor.name == "quiet"
