"""Connection caps against the real kernel: a VM flooding new 5-tuples (a new UDP source port per datagram)
to an allowed destination holds at most its cap of conntrack entries, its drops are counted and logged, and
a neighbour's established UDP flow and new TCP connections (and the flooding VM's own established flow)
keep working. A flood from the outside at a VM is capped on that VM the same way. Without a cap in reach,
the same flood creates many more entries (the control).

Entries are counted with the `conntrack` tool in the lab's host namespace (independent of hyperfence's own
reader, which `vm list` uses and which is checked against it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from typer.testing import CliRunner

from hyperfence.cli.main import app
from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.traffic import TRAFFIC_FILE
from tests.netns.firewall.test_firewall import counter, traffic_log

pytestmark = pytest.mark.kernel

CAP = 200
# 6 s at one datagram per millisecond: long enough for 10 samples of the entries (a `conntrack` process each)
# while it runs, even under QEMU TCG (tests/guest/), where a sample takes ~0.4 s
SENT = 6000
RULES = [
    {"id": "flood", "from": "vm:vm1", "to": "outside", "protocol": "udp", "ports": [5000, 5001]},
    {"id": "nb-udp", "from": "vm:vm3", "to": "outside", "protocol": "udp", "ports": [5001]},
    {"id": "nb-tcp", "from": "vm:vm3", "to": "outside", "protocol": "tcp", "ports": [80]},
    {"id": "to-vm2", "from": "outside", "to": "vm:vm2", "protocol": "udp", "ports": [5002]},
]
# argv: address, port, count, first source port. Datagram i leaves from source port `first` + i, at one per
# millisecond: every datagram is a new 5-tuple, i.e. a new conntrack entry (nobody answers on this port).
FLOOD = """
import socket, sys, time
addr, port, count, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.monotonic()
for i in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", first + i))
        s.sendto(b"x" * 18, (addr, port))
    time.sleep(max(0.0, t0 + (i + 1) * 0.001 - time.monotonic()))
"""
# argv: address, udp port, tcp port (0: none). One UDP flow (one socket, one source port) is established
# first ("ready"); then, until a line arrives on stdin, a datagram every 20 ms on that flow (each answer
# awaited) and, with a TCP port, a new TCP connection every 100 ms (each must get the server's "OK").
CLIENT = """
import json, socket, sys, threading, time
addr, uport, tport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(1.0)
for _ in range(20):
    u.sendto(b"hello", (addr, uport))
    try:
        u.recv(16)
        break
    except TimeoutError:
        pass
else:
    sys.exit("no answer on the UDP flow")
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
print("ready", flush=True)
r = {"udp_sent": 0, "udp_answered": 0, "tcp_tried": 0, "tcp_ok": 0}
next_tcp = time.monotonic()
while not stop.is_set():
    u.sendto(b"ping", (addr, uport))
    r["udp_sent"] += 1
    try:
        r["udp_answered"] += u.recv(16).startswith(b"OK")
    except TimeoutError:
        pass
    if tport and time.monotonic() >= next_tcp:
        next_tcp += 0.1
        r["tcp_tried"] += 1
        try:
            with socket.create_connection((addr, tport), timeout=3) as t:
                t.settimeout(3)
                r["tcp_ok"] += t.recv(16).startswith(b"OK")
        except OSError:
            pass
    time.sleep(0.02)
print(json.dumps(r), flush=True)
"""


def apply(lab: LabSession, caps: dict[str, int]) -> None:
    assert lab.engine is not None
    doc = lab.document(RULES)
    doc["limits"] = [{"id": f"cap-{vm}", "vms": f"vm:{vm}", "connections": n} for vm, n in caps.items()]
    lab.engine.store_policy(doc, source="test")
    _, result = lab.engine.converge()
    assert result is not None and result.drift == []


def tracked(lab: LabSession, flag: str, vm: str) -> int:
    """Conntrack entries whose original source (`-s`) or destination (`-d`) is the VM."""
    r = lab.run("host", ["conntrack", "-L", flag, lab.ip(vm)])
    assert r.returncode == 0, r.stderr
    return len(r.stdout.splitlines())


def flood_and_sample(
    lab: LabSession, where: str, dst: str, port: int, *, first_port: int, sample: tuple[str, str]
) -> tuple[list[int], float]:
    """Run the flood (SENT datagrams, ~6 s) and count the sampled VM's entries while it runs and after; and
    how long the flood process ran (seconds)."""
    argv = [sys.executable, "-c", FLOOD, lab.ip(dst), str(port), str(SENT), str(first_port)]
    t0 = time.monotonic()
    if where == "outside":
        proc = topology.popen_in_outside(lab.plan, argv, stderr=subprocess.PIPE)
    else:
        proc = topology.popen_in_vm(lab.plan, where, argv, stderr=subprocess.PIPE)
    samples = []
    try:
        while proc.poll() is None:
            samples.append(tracked(lab, *sample))
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        topology.stop_process(proc)
    time.sleep(0.3)
    samples.append(tracked(lab, *sample))
    return samples, seconds


class Client:
    """The CLIENT script in a VM: started, flow established, stopped on `result()`."""

    def __init__(self, lab: LabSession, vm: str, udp: int, tcp: int = 0) -> None:
        argv = [sys.executable, "-c", CLIENT, lab.ip("outside"), str(udp), str(tcp)]
        self.proc = topology.popen_in_vm(
            lab.plan, vm, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def result(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        topology.stop_process(self.proc)
        result: dict[str, int] = json.loads(line)
        return result


def traffic_events(lab: LabSession) -> list[dict[str, Any]]:
    with open(os.path.join(lab.state_dir, TRAFFIC_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def vm_list(lab: LabSession) -> dict[str, dict[str, Any]]:
    r = CliRunner().invoke(
        app, ["--netns", lab.plan.host_netns, "--state-dir", lab.state_dir, "vm", "list", "--json"]
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    return {row["name"]: row for row in rows}


def test_a_flooding_vm_holds_at_most_its_cap_and_its_neighbour_keeps_working(lab: LabSession) -> None:
    apply(lab, {"vm1": CAP})
    lab.serve("outside", tcp=[80], udp=[5001])
    with traffic_log(lab):
        neighbour = Client(lab, "vm3", udp=5001, tcp=80)
        own = Client(lab, "vm1", udp=5001)  # the flooding VM's own established flow
        samples, seconds = flood_and_sample(
            lab, "vm1", "outside", 5000, first_port=20000, sample=("-s", "vm1")
        )
        nb, mine = neighbour.result(), own.result()
        time.sleep(1.5)
    dropped = counter(lab, "_cap_drop", "sys:ct-cap")
    print(
        f"vm1 entries during/after the flood: {samples}; dropped {dropped}; vm3 {nb}; vm1's own flow {mine}"
    )
    assert len(samples) >= 10  # sampled while the flood ran
    assert max(samples) <= CAP
    assert samples[-1] >= CAP - 5  # the flood did reach the cap
    assert dropped >= SENT - CAP
    # The neighbour: its established UDP flow answered throughout, its new TCP connections all succeeded.
    assert nb["udp_sent"] >= 50 and nb["udp_answered"] >= 0.95 * nb["udp_sent"], nb
    assert nb["tcp_tried"] >= 10 and nb["tcp_ok"] == nb["tcp_tried"], nb
    # The capped VM's own established flow is never touched by its cap.
    assert mine["udp_sent"] >= 50 and mine["udp_answered"] >= 0.95 * mine["udp_sent"], mine
    # Logged within the log rate (10/s, burst 20; drops happen only while the flood runs): a few dozen
    # events for ~5,800 drops.
    capped = [e for e in traffic_events(lab) if e["verdict"] == "cap"]
    assert 1 <= len(capped) <= 20 + 10 * seconds + 1, (len(capped), seconds)
    assert {(e["vm"], e["direction"], e["rule"]) for e in capped} == {("vm1", "out", "sys:ct-cap")}
    assert capped[0]["dport"] == 5000 and capped[0]["src"] == lab.ip("vm1")
    # `vm list` shows it, read from the kernel (no agent, no daemon).
    rows = vm_list(lab)
    conn = rows["vm1"]["connections"]
    assert (
        conn["cap"] == CAP and conn["tracked"] == tracked(lab, "-s", "vm1") and conn["cap_drops"] == dropped
    )
    assert rows["vm2"]["connections"]["cap"] == 16384 and rows["vm2"]["status"] == "no agent"


def test_without_a_cap_in_reach_the_same_flood_creates_many_more_entries(lab: LabSession) -> None:
    apply(lab, {})  # the default cap (16,384) is far above the flood
    samples, _ = flood_and_sample(lab, "vm1", "outside", 5000, first_port=20000, sample=("-s", "vm1"))
    print(f"vm1 entries without a cap in reach: {samples}")
    assert samples[-1] >= 0.9 * SENT
    assert counter(lab, "_cap_drop", "sys:ct-cap") == 0


def test_a_flood_from_outside_at_a_vm_is_capped_on_that_vm(lab: LabSession) -> None:
    apply(lab, {"vm2": CAP})
    with traffic_log(lab):
        samples, _ = flood_and_sample(lab, "outside", "vm2", 5002, first_port=20000, sample=("-d", "vm2"))
        time.sleep(1.5)
    print(f"vm2 entries during/after the flood from outside: {samples}")
    assert len(samples) >= 10 and max(samples) <= CAP and samples[-1] >= CAP - 5
    assert counter(lab, "_cap_drop", "sys:ct-cap") >= SENT - CAP
    capped = [e for e in traffic_events(lab) if e["verdict"] == "cap"]
    assert capped and {(e["vm"], e["direction"]) for e in capped} == {("vm2", "in")}
