"""The real daemon process stops promptly on SIGTERM: every loop wakes on the stop signal instead of finishing
a sleep or a poll, with all of them running (control socket, reconcile, drift and address watches, traffic
log, agent channels, and the libvirt inventory, which waits up to 30 s for an event)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hyperfence.daemon import Daemon, request
from hyperfence.lab.agents import lab_vms as planned_vms
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.agents import AgentMonitor, enroll
from hyperfence.reconcile.inventory import InventoryWatcher
from hyperfence.reconcile.preconditions import Preconditions

pytestmark = pytest.mark.kernel

BOUND = 2.0  # seconds; measured ~0.05 s (the loops used to take 2-4 s: a 30 s queue wait cut by a 2 s join)
# A libvirtd nobody runs: the inventory loop runs all the same (it retries and waits for events), and the
# test does not depend on, or read, a libvirtd another test may have started on this machine.
# Every loop a daemon with the libvirt inventory runs (the process test waits until all of them run).
LOOPS = {
    "control",
    "reconcile",
    "kernel",
    "drift",
    "addresses",
    "ports",
    "traffic",
    "leases",
    "inventory",
    "agents",
}
NO_LIBVIRTD = "qemu:///system?socket=/nonexistent/hyperfence-test/libvirt-sock"


@pytest.fixture
def lab_vms() -> int:
    return 2


@pytest.fixture
def lab(lab: LabSession) -> LabSession:
    """The shared lab (tests/netns/conftest.py), set up for this module."""
    lab.apply([])
    assert lab.engine is not None
    for vm in planned_vms(lab.plan):  # each agent channel is a listening socket in the daemon
        enroll(lab.engine, vm, "unix", interval=1.0)
    return lab


def start_daemon(lab: LabSession, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    with open(log, "wb") as err:
        daemon = subprocess.Popen([*argv, "daemon", "--libvirt", NO_LIBVIRTD], stderr=err)
    deadline = time.monotonic() + 30
    try:
        while True:
            assert daemon.poll() is None, log.read_text()
            reply = request(lab.state_dir, {"op": "status"}, timeout=5)
            loops = (reply or {}).get("loops") or {}
            if set(loops) == LOOPS and all(loop["state"] == "running" for loop in loops.values()):
                return daemon
            assert time.monotonic() < deadline, (reply, log.read_text())
            time.sleep(0.1)
    except BaseException:  # never leave the daemon running
        daemon.kill()
        daemon.wait()
        raise


def test_sigterm_stops_the_daemon_within_the_bound(lab: LabSession, tmp_path: Path) -> None:
    took, runs = [], []
    for i in range(3):
        log = tmp_path / f"daemon{i}.log"
        daemon = start_daemon(lab, log)
        time.sleep(0.5)  # every loop is inside its wait now
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        took.append(time.monotonic() - t0)
        runs.append((code, log.read_text(), os.path.exists(os.path.join(lab.state_dir, "daemon.sock"))))
    print(f"SIGTERM -> exit: {', '.join(f'{t:.3f}' for t in took)} s (median {statistics.median(took):.3f})")
    assert max(took) < BOUND, took
    for code, text, socket_left in runs:
        assert code == 0, text
        assert "Traceback" not in text and "failed" not in text, text  # no loop died of the stop
        assert not socket_left


def test_every_loop_wakes_on_the_stop_signal_not_on_its_timeout(
    lab: LabSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loops in this process, each with a 30 s wait (instead of 0.2-0.5 s): a loop that does not
    wake on the stop signal is still inside its wait when the stop's join (2 s) gives up on it."""
    for where, name in [
        ("hyperfence.daemon", "ACCEPT_TIMEOUT"),
        ("hyperfence.reconcile.drift", "READ_TIMEOUT"),
        ("hyperfence.reconcile.host_addresses", "READ_TIMEOUT"),
        ("hyperfence.reconcile.traffic", "READ_TIMEOUT"),
        ("hyperfence.reconcile.agents", "ROUND"),
        ("hyperfence.reconcile.leases", "READ_TIMEOUT"),
        ("hyperfence.reconcile.bridge_ports", "READ_TIMEOUT"),
    ]:
        monkeypatch.setattr(f"{where}.{name}", 30.0)
    assert lab.engine is not None
    inventory = InventoryWatcher(lab.engine, NO_LIBVIRTD)  # waits up to RESYNC_EVERY (30 s) for an event
    daemon = Daemon(
        lab.engine,
        poll=30.0,
        resync=30.0,
        agents=AgentMonitor(lab.engine),
        inventory=inventory,
        preconditions=Preconditions(lab.engine, interval=30.0),
    )
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while set(daemon.supervisor.loops) != LOOPS or daemon.supervisor.running() != sorted(
        daemon.supervisor.loops
    ):
        assert time.monotonic() < deadline, daemon.supervisor.status()
        time.sleep(0.05)
    time.sleep(0.5)  # every loop is inside its 30 s wait now
    t0 = time.monotonic()
    daemon.stop()
    thread.join(timeout=10)
    took = time.monotonic() - t0
    assert not thread.is_alive()
    assert daemon.supervisor.running() == []  # none was left behind by the join
    assert {loop["state"] for loop in daemon.supervisor.status().values()} == {"stopped"}
    assert took < BOUND, took
