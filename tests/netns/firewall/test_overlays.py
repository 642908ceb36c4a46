"""Overlays against the real kernel: an operator's rate limit holds a flooding VM to its rate, a shield cuts
new inbound connections and keeps an established one, and (through the real CLI, without and with a
daemon) a VM stays cut off until every producer that isolated it has released it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.model.overlay import Overlay, OverlayKind
from tests.netns.firewall.daemon_process import start_daemon
from tests.netns.firewall.test_firewall import counter
from tests.netns.firewall.test_flood import FLOOD, SENT, UDP_1_2

pytestmark = pytest.mark.kernel

HF = [sys.executable, "-m", "hyperfence"]
PING = {"id": "ping", "from": "vms", "to": "vms", "protocol": "icmp"}
TCP = {"id": "tcp", "from": "vms", "to": "vms", "protocol": "tcp"}
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server(("", int(sys.argv[1])))
print("ready", flush=True)
def echo(c):
    with c:
        while data := c.recv(100):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""
# Connects, echoes once, waits for a line on stdin, echoes again on the same connection.
ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall(b"a"); print(c.recv(10).decode(), flush=True)
sys.stdin.readline()
c.sendall(b"b")
try:
    print(c.recv(10).decode() or "EOF", flush=True)
except OSError as e:
    print("ERR", e, flush=True)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabSession]:
    name = "ov" + secrets.token_hex(2)
    with LabSession(name, 2, state_dir=os.path.join(str(tmp_path), "state")) as s:
        yield s


def vm_id(lab: LabSession, name: str) -> str:
    assert lab.engine is not None and lab.engine.current is not None
    return next(v.id for v in lab.engine.current.policy.vms if v.name == name)


def overlay(lab: LabSession, *overlays: Overlay, producer: str = "operator") -> None:
    """`producer`'s overlays on the lab's engine, converged."""
    assert lab.engine is not None
    lab.engine.set_overlays(producer, overlays)
    _, result = lab.engine.converge()
    assert result is not None


def test_an_operator_rate_limit_holds_a_flooding_vm_to_its_rate(lab: LabSession) -> None:
    lab.apply([UDP_1_2])
    r = lab.run("vm1", [sys.executable, "-c", FLOOD, lab.ip("vm2"), str(SENT)])
    assert r.returncode == 0, r.stderr
    unlimited = counter(lab, "_in", "rule:udp#1")
    assert unlimited >= SENT * 0.95  # the control: without the overlay the flood arrives

    vm1 = vm_id(lab, "vm1")
    overlay(lab, Overlay("operator", vm1, OverlayKind.RATE_LIMIT, "flooding", time.time(), rate=10))
    t0 = time.monotonic()
    r = lab.run("vm1", [sys.executable, "-c", FLOOD, lab.ip("vm2"), str(SENT)])
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    passed = counter(lab, "_in", "rule:udp#1") - unlimited
    dropped = counter(lab, "_out", "sys:flood:overlay:rate")
    print(f"rate limit 10/s: passed {passed}, dropped {dropped} of {SENT} in {seconds:.2f} s")
    # the burst (2 x 10) plus 10 a second over the flood's time (~0.3 s; generous for a slow machine)
    assert passed <= 20 + 10 * seconds + 5
    assert passed + dropped >= SENT * 0.95

    overlay(lab)  # released: the flood arrives again
    before = counter(lab, "_in", "rule:udp#1")
    lab.run("vm1", [sys.executable, "-c", FLOOD, lab.ip("vm2"), str(SENT)])
    assert counter(lab, "_in", "rule:udp#1") - before >= SENT * 0.95


def test_a_shield_cuts_new_inbound_connections_and_keeps_an_established_one(lab: LabSession) -> None:
    lab.apply([PING, TCP])
    lab.serve("vm1", tcp=[7100])
    lab.serve("vm2", tcp=[7200])  # answers "OK" to every new connection
    server = topology.popen_in_vm(
        lab.plan, "vm2", [sys.executable, "-c", ECHO_SERVER, "7000"], stdout=subprocess.PIPE
    )
    client = None
    try:
        assert server.stdout is not None and server.stdout.readline().startswith(b"ready")
        client = topology.popen_in_vm(
            lab.plan,
            "vm1",
            [sys.executable, "-c", ECHO_CLIENT, lab.ip("vm2"), "7000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == b"a"  # established before the shield
        assert lab.tcp("vm1", "vm2", 7200) == "OK"  # the control: new connections reach it

        overlay(lab, Overlay("operator", vm_id(lab, "vm2"), OverlayKind.SHIELD, "attacked", time.time()))
        assert lab.tcp("vm1", "vm2", 7200) == "TIMEOUT"  # a new inbound connection: dropped
        assert lab.ping("vm1", "vm2")[0] == 0  # a new inbound ping flow too
        assert counter(lab, "_in", "sys:shield") >= 1
        client.stdin.write(b"go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == b"b"  # the established connection goes on
        assert lab.tcp("vm2", "vm1", 7100) == "OK"  # and the VM's own outbound connections
        assert lab.ping("vm2", "vm1")[0] == 2

        overlay(lab)  # released
        assert lab.tcp("vm1", "vm2", 7200) == "OK"
    finally:
        for p in (client, server):
            if p is not None:
                topology.stop_process(p)


# --- two producers, through the real CLI -----------------------------------------------------------


def hf(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI on the lab."""
    return subprocess.run(
        [*HF, "--lab", lab.plan.name, "--state-dir", lab.state_dir, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )


# The heartbeat producer in a process of its own (what the agent monitor does in the daemon): an engine on
# the lab's state, which reads every producer's overlays from the store, sets the heartbeat's and converges.
# (A process, not a second engine in this one: two stores of one database in one process break each
# other's SQLite locks, since `Store.__init__` opens and closes the file itself.)
HEARTBEAT = """
import os, sys, time
from hyperfence.model.kernel import FLAVOUR_ENV, parse_flavour
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.reconcile.engine import Engine
netns, state, vm, isolate = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
flavour = parse_flavour(os.environ.get(FLAVOUR_ENV), field=FLAVOUR_ENV)
engine = Engine(netns=netns, state_dir=state, flavour=flavour)
try:
    ov = (Overlay("heartbeat", vm, OverlayKind.ISOLATE, "silent", time.time()),)
    engine.set_overlays("heartbeat", ov if isolate else ())
    engine.converge()
finally:
    engine.close()
"""


def heartbeat(lab: LabSession, vm: str, *, isolate: bool) -> None:
    """The heartbeat producer isolates or releases `vm`."""
    args = [lab.plan.host_netns, lab.state_dir, vm_id(lab, vm), "1" if isolate else "0"]
    r = subprocess.run(
        [sys.executable, "-c", HEARTBEAT, *args], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr


def cut(lab: LabSession) -> bool:
    """vm1 and vm2 cannot reach each other either way."""
    return lab.ping("vm1", "vm2", wait=0.5)[0] == 0 and lab.ping("vm2", "vm1", wait=0.5)[0] == 0


def test_a_vm_stays_cut_until_both_producers_release_it(lab: LabSession) -> None:
    lab.apply([PING])
    assert not cut(lab)
    # operator first, then the heartbeat isolates and recovers: still cut until the operator releases
    r = hf(lab, "vm", "isolate", "vm1", "--reason", "suspicious", "--for", "1h")
    assert r.returncode == 0, r.stderr
    assert "isolate by operator" in r.stdout
    assert cut(lab)
    heartbeat(lab, "vm1", isolate=True)
    heartbeat(lab, "vm1", isolate=False)
    assert cut(lab), "the heartbeat's release undid the operator's isolation"
    listed = hf(lab, "vm", "list").stdout
    assert "isolate by operator" in listed and "suspicious" in listed
    r = hf(lab, "vm", "release", "vm1", "--producer", "operator")
    assert r.returncode == 0, r.stderr
    assert not cut(lab)
    # the reverse: heartbeat first, the operator isolates and releases: still cut by the heartbeat
    heartbeat(lab, "vm1", isolate=True)
    assert hf(lab, "vm", "isolate", "vm1", "--reason", "me too").returncode == 0
    r = hf(lab, "vm", "release", "vm1", "--producer", "operator")
    assert "still isolated by another producer" in r.stdout
    assert cut(lab), "the operator's release undid the heartbeat's isolation"
    heartbeat(lab, "vm1", isolate=False)
    assert not cut(lab)
    events = hf(lab, "vm", "events", "vm1").stdout
    assert events.count("overlay-set") == 4 and events.count("overlay-released") == 4
    # bad input: located, exit code 2, nothing changed
    r = hf(lab, "vm", "rate-limit", "vm1", "fast", "--reason", "x", "--for", "1y")
    assert r.returncode == 2
    assert "rate: 'fast' is not a rate" in r.stderr and "for: '1y' is not a duration" in r.stderr
    assert "Traceback" not in r.stderr


def test_with_a_daemon_the_operator_asks_it_and_another_producers_release_leaves_its_isolation(
    lab: LabSession,
) -> None:
    """The daemon path: the CLI asks the daemon (which stores, converges, answers); releasing the heartbeat
    producer (which holds nothing here) leaves the operator's isolation; bad input keeps exit code 2."""
    lab.apply([PING])
    daemon, _ = start_daemon(lab)
    try:
        r = hf(lab, "vm", "isolate", "vm1", "--reason", "suspicious")
        assert r.returncode == 0, r.stderr
        assert "applied by the daemon" in r.stdout
        assert cut(lab)
        r = hf(lab, "vm", "release", "vm1", "--producer", "heartbeat")
        assert r.returncode == 0, r.stderr
        assert cut(lab)
        r = hf(lab, "vm", "shield", "ghost", "--reason", "x")
        assert r.returncode == 2 and "vm: 'ghost' is not a VM of the policy" in r.stderr
        r = hf(lab, "vm", "release", "vm1")  # all producers
        assert r.returncode == 0, r.stderr
        assert "released isolate by operator" in r.stdout
        assert not cut(lab)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
