"""The TCP+TLS channel: a real agent in a lab VM reports to the host's agent endpoint over the lab network,
keeps reporting while its VM is isolated (the quarantine lets its own flow through, nothing else), and a
stranger that names the VM without its key is refused and counted as a stranger: the VM's own counts and its
live connection are untouched."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from hyperfence import wire
from hyperfence.agent.build import build_zipapp
from hyperfence.lab import topology
from hyperfence.lab.agents import agent_argv, zipapp_path
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.agents import AgentMonitor, enroll

pytestmark = pytest.mark.kernel

PING = {"id": "ping", "from": "vms", "to": "vms", "protocol": "icmp"}


def wait(cond: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_an_agent_over_tls_reports_even_while_its_vm_is_isolated(lab: LabSession) -> None:
    assert lab.engine is not None
    endpoint = f"{lab.ip('host')}:7474"
    doc = lab.document([PING])
    doc["settings"] = {"agent_endpoint": endpoint}
    doc["heartbeats"] = [{"vms": "vms", "interval": 1, "misses": 3, "release": "manual"}]
    lab.engine.store_policy(doc, source="test")
    lab.engine.converge()
    vm1 = next(v for v in lab.engine.current.policy.vms if v.name == "vm1")  # type: ignore[union-attr]
    _, config = enroll(lab.engine, vm1, "tls", interval=1.0)
    cfg = Path(lab.engine.state_dir) / "vm1-tls.json"
    cfg.write_text(json.dumps(config))
    build_zipapp(zipapp_path(lab.engine))
    monitor = AgentMonitor(lab.engine, startup_grace=30)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    agent = topology.popen_in_vm(lab.plan, "vm1", agent_argv(lab.engine, cfg))
    try:
        row = lambda: next(r for r in monitor.snapshot() if r["name"] == "vm1")  # noqa: E731
        assert wait(lambda: row()["status"] == "ok" and row()["metrics"]), monitor.snapshot()
        assert row()["channel"] == {"type": "tls"}

        # Isolate vm1: its traffic stops, its agent's TLS flow does not.
        with monitor.lock:
            monitor.tracker.isolate(vm1.id, "test", time.time())
        monitor._apply_quarantine()
        assert lab.ping("vm1", "vm2")[0] == 0
        lab.run("vm1", ["ip", "neigh", "flush", "all"])  # the endpoint must still resolve (ARP)
        seq = row()["seq"]
        assert wait(lambda: row()["seq"] > seq + 2, 6), "the agent stopped reporting while isolated"
        assert row()["isolated"] == "test"

        # A stranger (vm3) that names vm1 over TLS, without vm1's key: refused and counted as a stranger;
        # vm1's counts, its connection and its beats are untouched.
        forged = wire.encode(b"x" * 32, wire.message(vm1.id, 10**15, "beat", {"res": {}}, time.time()))
        script = (
            "import socket,ssl,sys;"
            f"c=ssl.create_default_context(cafile={config['channel']['ca']!r});"
            f"s=c.wrap_socket(socket.create_connection(({lab.ip('host')!r},7474)),server_hostname={lab.ip('host')!r});"
            f"s.sendall(bytes.fromhex({forged.hex()!r}));s.recv(1)"
        )
        counts_before, claimed_before = row()["counts"], monitor.hub.claimed
        lab.run("vm3", ["/usr/bin/python3", "-c", script], timeout=10)
        assert wait(lambda: monitor.channel_stats["refused"].get("unverified") == 1, 5), monitor.channel_stats
        seq = row()["seq"]
        assert wait(lambda: row()["seq"] > seq + 1, 6), "vm1's agent stopped reporting"
        counts = row()["counts"]
        assert {k: v for k, v in counts.items() if k != "accepted"} == {
            k: v for k, v in counts_before.items() if k != "accepted"
        }, (counts_before, counts)
        assert monitor.hub.claimed == claimed_before  # vm1's connection was never replaced
        assert row()["status"] == "ok"
    finally:
        topology.stop_process(agent)
        stop.set()
        thread.join(timeout=5)
