"""Reject rules and connections: a reject answers only the first packet of a new flow it matches, never a
packet of a flow the policy allows (a reply, or a flow that was established before the rule came), and it
answers each protocol the way a sender understands. Real namespaces, real packets, real nftables; `can`
is asked the same questions."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.policy.whatif import Flow, can

pytestmark = pytest.mark.kernel

QUICK = 0.9  # below TCP's first SYN retransmission (1 s): REFUSED within it means the first SYN was answered

# vm1 and vm2 may always resolve each other: these tests are about IP, whatever rules imply ARP.
ARP = [
    {"id": "arp12", "from": "vm:vm1", "to": "vm:vm2", "services": ["arp"]},
    {"id": "arp21", "from": "vm:vm2", "to": "vm:vm1", "services": ["arp"]},
]


def can_open(s: LabSession, src: str, dst: str, flow: Flow) -> tuple[bool, str]:
    assert s.engine is not None
    compiled = s.engine.compiled()
    assert compiled is not None
    answer = can(compiled.resolved, src, dst, flow, flavour=compiled.flavour)
    return answer.allowed, answer.reason


def test_a_reject_in_the_receivers_egress_never_answers_its_replies_to_allowed_flows(lab: LabSession) -> None:
    """vm2 may open tcp/80, udp/5000 and ping to vm1; vm1 rejects everything it would open to vm2. vm1's
    SYN-ACKs, UDP answers and echo replies belong to vm2's flows: the reject must not touch them."""
    lab.serve("vm1", tcp=[80], udp=[5000])
    lab.apply(
        [
            {
                "id": "to-vm1",
                "from": "vm:vm2",
                "to": "vm:vm1",
                "services": ["tcp/80", "udp/5000", "icmp/echo-request"],
            },
            {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "action": "reject"},
        ]
    )
    assert lab.tcp("vm2", "vm1", 80) == "OK"
    assert lab.udp("vm2", "vm1", 5000) == "OK"
    assert lab.ping("vm2", "vm1")[0] == 2
    assert can_open(lab, "vm2", "vm1", Flow("tcp", 80))[0]
    assert can_open(lab, "vm2", "vm1", Flow("udp", 5000))[0]
    assert can_open(lab, "vm2", "vm1", Flow("icmp", icmp_type=8))[0]
    # The control: what vm1 itself opens to vm2 is rejected (answered at once), and `can` names the rule.
    lab.serve("vm2", tcp=[80])
    assert lab.tcp("vm1", "vm2", 80, timeout=QUICK) == "REFUSED"
    allowed, reason = can_open(lab, "vm1", "vm2", Flow("tcp", 80))
    assert not allowed and "reject by rej" in reason


def test_replies_to_a_flow_the_host_started_pass_a_reject(lab: LabSession) -> None:
    """The same with the host as the one who opens: vm2's replies to the host pass vm2's reject-all."""
    lab.serve("vm2", tcp=[80], udp=[5000])
    lab.apply(
        [
            {"id": "from-host", "from": "host", "to": "vm:vm2", "services": ["tcp/80", "udp/5000", "icmp"]},
            {"id": "rej", "from": "vm:vm2", "to": "host", "action": "reject"},
        ]
    )
    assert lab.tcp("host", "vm2", 80) == "OK"
    assert lab.udp("host", "vm2", 5000) == "OK"
    assert lab.ping("host", "vm2")[0] == 2
    assert lab.tcp("vm2", "host", 80, timeout=QUICK) == "REFUSED"  # the control: vm2's own flows are rejected


def test_a_later_reject_never_eats_the_answer_of_an_allowed_dhcp_exchange(lab: LabSession) -> None:
    """The server's offer is no conntrack reply of the client's request (that went to the broadcast
    address): it is a new flow, which the reject chains must pass by the `dhcp` rule's other half, ordered
    before the reject (found by the differential test: the offer met the reject, the lease never came)."""
    lab.serve("host", tcp=[80])
    lab.apply(
        [
            {"id": "lease", "from": "vms", "to": "host", "services": ["dhcp"]},
            {"id": "rej", "from": "host", "to": "vm:vm1", "action": "reject"},
            {"id": "rej-out", "from": "vm:vm1", "to": "host", "action": "reject"},
        ]
    )
    assert lab.dhcp("vm1")
    assert can_open(lab, "vm1", "10.77.0.1", Flow("dhcp"))[0]
    # the control: the rejects do answer what they match
    assert lab.tcp("vm1", "host", 80, timeout=QUICK) == "REFUSED"


# A client that keeps one TCP connection, one UDP flow and one ping flow (one ICMP id) open to a peer and,
# for every line on stdin, sends one round on each and prints what came back.
CLIENT = r"""
import os, socket, struct, sys
peer, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = socket.create_connection((peer, tcp_port), timeout=2)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1.5); u.connect((peer, udp_port))
i = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); i.settimeout(1.5)
ident = os.getpid() & 0xFFFF

def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF

def ping(seq):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"hyperfence"
    i.sendto(struct.pack("!BBHHH", 8, 0, csum(body), ident, seq) + b"hyperfence", (peer, 0))
    while True:
        data = i.recv(2048)
        typ, code = data[20], data[21]
        if typ == 0 and struct.unpack("!HH", data[24:28]) == (ident, seq):
            return "OK"
        inner = data[28 + (data[28] & 15) * 4:]
        if typ == 3 and data[28 + 9] == 1 and struct.unpack("!HH", inner[4:8]) == (ident, seq):
            return "ICMP3/%d" % code

def result(f):
    try:
        return f()
    except TimeoutError:
        return "TIMEOUT"
    except OSError as e:
        return e.__class__.__name__

def tcp_round():
    t.sendall(b"ping\n")
    return "OK" if t.recv(16).startswith(b"ping") else "CLOSED"

def udp_round():
    u.send(b"ping")
    return "OK" if u.recv(16) else "EMPTY"

seq = 0
for line in sys.stdin:
    seq += 1
    print("tcp=%s udp=%s icmp=%s" % (result(tcp_round), result(udp_round), result(lambda: ping(seq))), flush=True)
"""

# Echo servers for the client: TCP (lines, on a kept connection) and UDP.
ECHO = r"""
import socket, sys, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(64), b"")], daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", int(sys.argv[2])))
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = u.recvfrom(64); u.sendto(d, a)
"""

TCP_PORT, UDP_PORT = 7000, 5000
SERVICES = [f"tcp/{TCP_PORT}", f"udp/{UDP_PORT}", "icmp/echo-request"]


class Client:
    """The long-lived flows of `CLIENT`, one round per `round()`."""

    def __init__(self, s: LabSession, src: str, dst: str) -> None:
        self.proc = topology.popen_in_vm(
            s.plan,
            src,
            [sys.executable, "-c", CLIENT, s.ip(dst), str(TCP_PORT), str(UDP_PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def round(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def close(self) -> None:
        topology.stop_process(self.proc)


@pytest.mark.parametrize("action", ["deny", "reject"])
def test_a_new_deny_or_reject_never_cuts_established_flows(lab: LabSession, action: str) -> None:
    """vm1 has a TCP connection, a UDP flow and a ping flow open to vm2 while an allow rule lets them; the
    allow becomes a deny or a reject. Conntrack keeps what is established, whichever: the open flows go on,
    only new ones meet the new rule, until the operator deletes the flows from conntrack."""
    server = topology.popen_in_vm(
        lab.plan, "vm2", [sys.executable, "-c", ECHO, str(TCP_PORT), str(UDP_PORT)], stdout=subprocess.PIPE
    )
    rule: dict[str, Any] = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": SERVICES}
    client = None
    try:
        assert server.stdout is not None and server.stdout.readline().startswith(b"ready")
        lab.apply([*ARP, rule])
        client = Client(lab, "vm1", "vm2")
        assert client.round() == "tcp=OK udp=OK icmp=OK"
        lab.apply([*ARP, {**rule, "action": action}])
        assert client.round() == "tcp=OK udp=OK icmp=OK"
        assert client.round() == "tcp=OK udp=OK icmp=OK"
        # An operator who wants them cut deletes them from conntrack: their next packets are new flows and
        # meet the rule (a TCP segment that is not a SYN is dropped, not reset, by either).
        flushed = lab.run("host", ["conntrack", "-D", "-s", lab.ip("vm1"), "-d", lab.ip("vm2")])
        assert flushed.returncode == 0, flushed.stderr
        cut = "udp=ConnectionRefusedError icmp=ICMP3/13" if action == "reject" else "udp=TIMEOUT icmp=TIMEOUT"
        assert client.round() == f"tcp=TIMEOUT {cut}"
    finally:
        if client is not None:
            client.close()
        topology.stop_process(server)
    # The control: a new flow meets the rule (a reject answers it at once, a deny stays silent).
    new = lab.tcp("vm1", "vm2", TCP_PORT, timeout=QUICK)
    assert new == ("REFUSED" if action == "reject" else "TIMEOUT")
    allowed, reason = can_open(lab, "vm1", "vm2", Flow("tcp", TCP_PORT))
    assert not allowed and f"{action} by web" in reason


def test_a_reject_of_any_protocol_answers_each_the_way_its_sender_understands(lab: LabSession) -> None:
    """`protocol: any`: a TCP SYN gets a reset (REFUSED, not the "host unreachable" of an ICMP error), a UDP
    datagram ICMP port unreachable, a ping ICMP administratively prohibited ("Packet filtered")."""
    lab.serve("vm2", tcp=[22], udp=[53])
    rules = [
        {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "action": "reject"},
        {
            "id": "rej-out",
            "from": "vm:vm1",
            "to": "outside",
            "services": ["tcp/22", "udp/53"],
            "action": "reject",
        },
    ]
    lab.apply([*ARP, *rules])
    assert lab.tcp("vm1", "vm2", 22, timeout=QUICK) == "REFUSED"
    assert lab.udp("vm1", "vm2", 53, timeout=QUICK) == "REFUSED"
    received, text = lab.ping("vm1", "vm2", count=1)
    assert received == 0 and "Packet filtered" in text, text
    # routed: the same answers to what vm1 sends to the outside (through the gateway)
    assert lab.tcp("vm1", "outside", 22, timeout=QUICK) == "REFUSED"
    assert lab.udp("vm1", "outside", 53, timeout=QUICK) == "REFUSED"
