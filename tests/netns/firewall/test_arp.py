"""ARP under policy against the real kernel: which rules let a VM resolve its peers (and be resolved by
them), checked with real packets and the neighbour tables (`ip neigh`) of the VMs and the host, and
compared with `can`'s answer.

* An allow of everything (no protocol, or `services: [any]`) implies ARP like any IP allow.
* A reject implies ARP: the sender can resolve the peer, so its packet leaves and is answered.
* `services: [arp]` works both ways (a VM asking and being answered; a peer asking and the VM answering).
* Flood limits count new IP flows only: a flood against a limited VM does not starve ARP, so an established
  flow that has to resolve its peer again keeps working.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.model.kernel import Flavour
from hyperfence.policy.whatif import Answer, Flow, can
from tests.netns.firewall.test_firewall import counter

pytestmark = pytest.mark.kernel


def mac(lab: LabSession, who: str) -> str:
    if who == "host":
        return lab.plan.bridge_mac
    return lab.plan.vm(who).mac


def flush_neighbours(lab: LabSession, where: str) -> None:
    dev = lab.plan.bridge if where == "host" else "eth0"
    r = lab.run(where, ["ip", "neigh", "flush", "dev", dev])
    assert r.returncode == 0, r.stderr


def neighbour(lab: LabSession, where: str, peer: str) -> str:
    """`where`'s neighbour entry for `peer` (a VM name or host), e.g. `10.77.0.12 lladdr 02:... REACHABLE`."""
    dev = lab.plan.bridge if where == "host" else "eth0"
    r = lab.run(where, ["ip", "neigh", "show", lab.ip(peer), "dev", dev])
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def resolves(lab: LabSession, where: str, peer: str) -> bool:
    """Does `where` learn `peer`'s MAC when it sends it a packet? Its neighbour table is flushed first, and
    the packet (a ping) need not be allowed: the kernel resolves the address before it sends anything."""
    flush_neighbours(lab, where)
    lab.ping(where, peer, count=1, wait=2)
    entry = neighbour(lab, where, peer)
    return f"lladdr {mac(lab, peer)}" in entry and "FAILED" not in entry and "INCOMPLETE" not in entry


def ask(lab: LabSession, src: str, dst: str, flow: Flow) -> Answer:
    """`hyperfence can` on the policy the lab runs (addresses for the host and the outside)."""
    assert lab.engine is not None
    compiled = lab.engine.compiled()
    assert compiled is not None
    name = {"host": lab.ip("host"), "outside": lab.ip("outside")}
    return can(compiled.resolved, name.get(src, src), name.get(dst, dst), flow, flavour=compiled.flavour)


def assert_reads_back(lab: LabSession) -> None:
    """The kernel holds exactly what was compiled: a full converge finds nothing to change."""
    assert lab.engine is not None
    _, again = lab.engine.converge(full=True)
    assert again is not None and not again.changed and again.drift == []


ARP = Flow("arp")
PING = Flow("icmp", icmp_type=8)


def test_an_allow_of_everything_implies_arp(lab: LabSession) -> None:
    """A rule without a protocol and a rule with `services: [any]` allow IP traffic, so they imply ARP with
    their peers (the gateway for routed ones) exactly as a tcp/udp/icmp rule does."""
    lab.apply(
        [
            {"id": "all-1-2", "from": "vm:vm1", "to": "vm:vm2"},
            {"id": "any-3-out", "from": "vm:vm3", "to": "outside", "services": ["any"]},
        ]
    )
    lab.serve("vm2", tcp=[80])
    lab.serve("outside", tcp=[80])
    got, text = lab.ping("vm1", "vm2")
    assert got == 2, text
    assert f"lladdr {mac(lab, 'vm2')}" in neighbour(lab, "vm1", "vm2")
    assert lab.tcp("vm1", "vm2", 80) == "OK"
    got, text = lab.ping("vm3", "outside")
    assert got == 2, text
    assert f"lladdr {mac(lab, 'host')}" in neighbour(lab, "vm3", "host")
    assert lab.tcp("vm3", "outside", 80) == "OK"
    # `can` answers the same
    for src, dst in (("vm1", "vm2"), ("vm3", "outside")):
        assert ask(lab, src, dst, PING).allowed
    assert ask(lab, "vm1", "vm2", ARP).allowed
    assert ask(lab, "vm2", "vm1", ARP).allowed
    assert ask(lab, "vm3", "host", ARP).allowed
    # the control: vm1 and vm3 share no rule, so they cannot even resolve each other
    assert not resolves(lab, "vm1", "vm3")
    assert not ask(lab, "vm1", "vm3", ARP).allowed


REJECTS = [
    {"id": "rej-vm", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/22"], "action": "reject"},
    {"id": "rej-host", "from": "vm:vm1", "to": "host", "services": ["tcp/22"], "action": "reject"},
    {"id": "rej-out", "from": "vm:vm1", "to": "outside", "services": ["tcp/22"], "action": "reject"},
    # the control: deny implies nothing, its sender meets silence
    {"id": "deny-vm", "from": "vm:vm3", "to": "vm:vm2", "services": ["tcp/22"], "action": "deny"},
]


def test_a_reject_implies_arp_so_the_sender_gets_its_answer(lab: LabSession) -> None:
    """With reject rules alone (no allow that would happen to give ARP), a VM sender resolves the peer, its
    SYN leaves and is answered with a reset: towards another VM, the host and the outside."""
    lab.apply(REJECTS)
    lab.serve("vm2", tcp=[22])
    lab.serve("outside", tcp=[22])
    for dst in ("vm2", "host", "outside"):
        t0 = time.monotonic()
        got = lab.tcp("vm1", dst, 22, timeout=5)
        assert got == "REFUSED", (dst, got, f"{time.monotonic() - t0:.1f} s")
        assert not ask(lab, "vm1", dst, Flow("tcp", 22)).allowed
    for comment in ("rule:rej-vm#1", "rule:rej-host#1", "rule:rej-out#1"):
        assert counter(lab, "_rej_out", comment) >= 1, comment
    assert ask(lab, "vm1", "vm2", ARP).allowed and ask(lab, "vm2", "vm1", ARP).allowed
    assert ask(lab, "vm1", "host", ARP).allowed
    # deny: vm3 cannot resolve vm2, the connection gets no answer
    assert lab.tcp("vm3", "vm2", 22, timeout=5) in ("TIMEOUT", "UNREACHABLE")
    assert "lladdr" not in neighbour(lab, "vm3", "vm2")
    assert not ask(lab, "vm3", "vm2", ARP).allowed


def test_the_host_resolves_a_vm_for_its_icmp_answers_only_where_it_sends_them(lab: LabSession) -> None:
    """A UDP reject is answered by ICMP. Under br_netfilter the host's IP stack sends it, so the host and
    the rejected VM may ARP each other (`sys:reject-arp`, no rule of theirs needed); under bridge_native the
    bridge answers the frame itself and nothing lets them resolve each other. Either way the sender gets its
    answer, and `can`, asked for the lab's flavour, says what the kernel does."""
    assert lab.engine is not None
    lab.apply([{"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "services": ["udp/53"], "action": "reject"}])
    assert lab.udp("vm1", "vm2", 53, timeout=5) == "REFUSED"
    host_answers = lab.engine.flavour is Flavour.BR_NETFILTER
    assert resolves(lab, "host", "vm1") is host_answers, neighbour(lab, "host", "vm1")
    answer = ask(lab, "host", "vm1", ARP)
    assert answer.allowed is host_answers, answer.reason
    assert (answer.deciding is not None and answer.deciding.rule == "sys:reject-arp") is host_answers
    assert (counter(lab, "ingress", "sys:reject-arp") > 0) is host_answers


def test_an_arp_rule_works_both_ways(lab: LabSession) -> None:
    """`services: [arp]` lets the VM and its peers resolve each other: requests and replies both ways, for a
    VM and the host (a VM on one end) and for two VMs (a VM on both ends). IP stays denied."""
    lab.apply(
        [
            {"id": "arp-host", "from": "vm:vm1", "to": "host", "services": ["arp"]},
            {"id": "arp-vm", "from": "vm:vm2", "to": "vm:vm3", "services": ["arp"]},
        ]
    )
    assert_reads_back(lab)
    # Each asks with an empty neighbour table (a VM learns the asker's MAC from a request it receives).
    for where, peer in (("host", "vm1"), ("vm1", "host"), ("vm2", "vm3"), ("vm3", "vm2")):
        flush_neighbours(lab, peer)
        assert resolves(lab, where, peer), (where, peer, neighbour(lab, where, peer))
        assert ask(lab, where, peer, ARP).allowed, (where, peer)
    assert lab.ping("vm1", "host")[0] == 0  # ARP only
    assert lab.ping("vm2", "vm3")[0] == 0
    # the control: vm1 and vm2 share no rule
    assert not resolves(lab, "vm1", "vm2")
    assert not ask(lab, "vm1", "vm2", ARP).allowed


# argv: address, udp port, interval. One UDP flow (one socket, one source port) is established first
# ("ready"); then, until a line arrives on stdin, a datagram every `interval` seconds on that flow, each
# answer awaited for 0.3 s. Prints the counts.
CLIENT = """
import json, socket, sys, threading, time
addr, port, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect((addr, port))
u.settimeout(1.0)
for _ in range(20):
    u.send(b"hello")
    try:
        u.recv(16)
        break
    except OSError:
        pass
else:
    sys.exit("no answer on the UDP flow")
u.settimeout(0.3)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
print("ready", flush=True)
r = {"sent": 0, "answered": 0}
while not stop.is_set():
    r["sent"] += 1
    try:
        u.send(b"ping")
        r["answered"] += u.recv(16).startswith(b"OK")
    except OSError:
        pass
    time.sleep(interval)
print(json.dumps(r), flush=True)
"""
# argv: address, port, seconds. New UDP flows (a new source port each) at ~1,000 a second.
FLOOD = """
import socket, sys, time
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
i = 0
while time.monotonic() < t0 + seconds:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 20000 + i % 20000))
        s.sendto(b"x" * 18, (addr, port))
    i += 1
    time.sleep(max(0.0, t0 + i * 0.001 - time.monotonic()))
"""


def test_a_flood_limit_does_not_starve_arp(lab: LabSession) -> None:
    """vm2 is shielded by a flood limit (in) and flooded with new flows from vm3. vm1 holds an established
    UDP flow with vm2; its neighbour entry for vm2 is dropped (as it expires every ~30 s) and vm1 must
    resolve vm2 again during the flood. ARP does not count against the limit, so it resolves at once and
    the flow loses nothing; the flood itself is still cut to the limit."""
    assert lab.engine is not None
    doc = lab.document(
        [
            {"id": "udp", "from": "vm:vm1", "to": "vm:vm2", "services": ["udp/5000"]},
            {"id": "flood", "from": "vm:vm3", "to": "vm:vm2", "services": ["udp/7000"]},
        ]
    )
    doc["limits"] = [{"id": "f", "vms": "vm:vm2", "direction": "in", "new_flows": 10, "burst": 10}]
    lab.engine.store_policy(doc, source="test")
    lab.engine.converge()
    assert_reads_back(lab)
    lab.serve("vm2", udp=[5000])
    # The flooder never needs ARP during the flood: whatever happens to ARP, its flood goes on.
    vm2 = lab.plan.vm("vm2")
    pin = ["ip", "neigh", "replace", str(vm2.ip), "lladdr", vm2.mac, "dev", "eth0", "nud", "permanent"]
    assert lab.run("vm3", pin).returncode == 0
    client = topology.popen_in_vm(
        lab.plan,
        "vm1",
        [sys.executable, "-c", CLIENT, lab.ip("vm2"), "5000", "0.05"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    flood = topology.popen_in_vm(
        lab.plan, "vm3", [sys.executable, "-c", FLOOD, lab.ip("vm2"), "7000", "8"], stderr=subprocess.PIPE
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line == b"ready\n", (line, client.stderr.read() if client.stderr else b"")
        time.sleep(1.0)  # the flood is on and the limit is over
        flush_neighbours(lab, "vm1")  # vm1 forgets vm2's MAC: its next datagram needs ARP
        time.sleep(1.5)  # ARP tries 3 times, 1 s apart; resolving takes a millisecond when it passes
        entry = neighbour(lab, "vm1", "vm2")
        time.sleep(3.5)
        client.stdin.write(b"stop\n")
        client.stdin.flush()
        result: dict[str, Any] = json.loads(client.stdout.readline())
        assert flood.wait(timeout=30) == 0, flood.stderr.read() if flood.stderr else b""
    finally:
        topology.stop_process(client)
        topology.stop_process(flood)
    dropped = counter(lab, "_in", "sys:flood:f")
    print(f"flow during the flood: {result}; vm1's entry for vm2: {entry!r}; flood dropped {dropped}")
    assert dropped >= 3000, dropped  # the flood was on and cut to the limit
    assert f"lladdr {vm2.mac}" in entry and "FAILED" not in entry, entry
    assert result["sent"] >= 40, result
    assert result["answered"] >= result["sent"] - 1, result
