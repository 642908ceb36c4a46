"""Reject rules against senders that are not VMs on this host: a routed sender (the lab's outside namespace,
through the host's uplink) and the host itself. Real namespaces, real packets, real nftables."""

from __future__ import annotations

import sys

import pytest

from hyperfence.lab.session import LabSession
from hyperfence.model.kernel import Flavour
from hyperfence.ruleset.build import BRIDGE, INET
from hyperfence.ruleset.ir import TableId
from hyperfence.ruleset.readback import rule_counters

pytestmark = pytest.mark.kernel

QUICK = 0.9  # below TCP's first SYN retransmission (1 s): REFUSED within it means the first SYN was answered

RULES = [
    {
        "id": "rej-out",
        "from": "outside",
        "to": "vm:vm2",
        "services": ["tcp/22", "udp/53"],
        "action": "reject",
        "priority": 10,
    },
    {"id": "rej-host", "from": "host", "to": "vm:vm2", "services": ["tcp/22", "udp/53"], "action": "reject"},
    {"id": "rej-vm1", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/22"], "action": "reject"},
    # the control: the same rule with `deny`, on vm3
    {
        "id": "deny-out",
        "from": ["outside", "host"],
        "to": "vm:vm3",
        "services": ["tcp/22", "udp/53"],
        "action": "deny",
        "priority": 10,
    },
    {
        "id": "open",
        "from": ["outside", "host", "vm:vm1"],
        "to": ["vm:vm2", "vm:vm3"],
        "services": ["tcp/22", "tcp/80", "udp/53"],
        "priority": 2000,
    },
]


def counter(s: LabSession, table: TableId, chain_suffix: str, comment: str) -> int:
    assert s.engine is not None
    objs = s.engine.nft.list({"table": {"family": table.family, "name": table.name}})
    return sum(
        p
        for (t, chain, c), (p, _) in rule_counters(objs).items()
        if t == table and chain.endswith(chain_suffix) and c == comment
    )


def host_udp_errors(s: LabSession, dst: str, port: int) -> list[str]:
    """What a program on the host sees on a connected UDP socket: the error of `send`, then of `recv`."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
        f"s.connect(({dst!r}, {port}))\n"
        "for op in (lambda: s.send(b'hi'), lambda: s.recv(16)):\n"
        "    try:\n        op(); print('OK')\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
    )
    r = s.run("host", [sys.executable, "-c", code], timeout=10)
    return r.stdout.decode().split()


def test_reject_answers_routed_senders_and_the_host(lab: LabSession) -> None:
    lab.serve("vm2", tcp=[22, 80], udp=[53])
    lab.serve("vm3", tcp=[22], udp=[53])
    lab.apply(RULES)

    # A routed sender (outside -> up0 -> routing -> br0), answered at the inet forward hook.
    assert lab.tcp("outside", "vm2", 22, timeout=QUICK) == "REFUSED"  # a TCP reset, not a timeout
    assert lab.udp("outside", "vm2", 53, timeout=QUICK) == "REFUSED"  # ICMP port unreachable
    assert lab.tcp("outside", "vm2", 80) == "OK"  # an allowed port still works
    assert counter(lab, INET, "_rej_in", "rule:rej-out#1") >= 1
    assert counter(lab, INET, "_rej_in", "rule:rej-out#2") >= 1

    # The host's own packets, answered at the inet output hook.
    assert lab.tcp("host", "vm2", 22, timeout=QUICK) == "REFUSED"
    # The kernel reports a drop on the local output path to a UDP sender at once (EPERM); the ICMP port
    # unreachable reaches the socket too: the next call reports it.
    assert host_udp_errors(lab, lab.ip("vm2"), 53) == ["PermissionError", "ConnectionRefusedError"]
    assert lab.tcp("host", "vm2", 80) == "OK"
    assert counter(lab, INET, "_rej_in", "rule:rej-host#1") >= 1
    assert counter(lab, INET, "_rej_in", "rule:rej-host#2") >= 1

    # The control: `deny` instead of `reject` stays a silent drop.
    assert lab.tcp("outside", "vm3", 22, timeout=1.0) == "TIMEOUT"
    assert lab.tcp("host", "vm3", 22, timeout=1.0) == "TIMEOUT"
    assert host_udp_errors(lab, lab.ip("vm3"), 53) == ["OK", "TimeoutError"]

    # VM to VM: answered at prerouting, after conntrack, before the bridge decides. (Whether bridged packets
    # skip the forward chain, its `sys:bridged` shortcut, is not checked: that chain repeats the receiver's
    # rules, so no packet here is answered differently without it.)
    assert lab.tcp("vm1", "vm2", 22, timeout=QUICK) == "REFUSED"
    assert lab.tcp("vm1", "vm2", 80) == "OK"
    assert lab.engine is not None  # vm1's own egress rule, in the table of the data plane's flavour
    table = BRIDGE if lab.engine.flavour is Flavour.BRIDGE_NATIVE else INET
    assert counter(lab, table, "_rej_out", "rule:rej-vm1#1") >= 1

    # Exact readback: a full read of every table finds nothing to change.
    assert lab.engine is not None
    _, again = lab.engine.converge(full=True)
    assert again is not None and not again.changed and again.drift == []


def reply_to_port_53(s: LabSession, vm: str, peer: str) -> list[str]:
    """`vm` sends from its UDP port 53 to `peer`:5000 (a probe server that answers): what it gets back."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
        f"s.bind(('0.0.0.0', 53)); s.connect(({s.ip(peer)!r}, 5000)); s.send(b'hi')\n"
        "try:\n    print(s.recv(16).decode().strip())\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    return s.run(vm, [sys.executable, "-c", code], timeout=10).stdout.decode().split()


def test_replies_to_a_flow_the_vm_started_pass_a_reject(lab: LabSession) -> None:
    """vm2 talks from its UDP port 53 to the outside; the replies (to vm2:53, from the outside) match the
    reject rule, but they belong to vm2's own flow: the bridge lets them through, so no reject may answer."""
    lab.serve("outside", udp=[5000])
    lab.apply(
        [
            RULES[0],
            {"id": "out", "from": "vm:vm2", "to": "outside", "services": ["udp/5000"]},
        ]
    )
    assert reply_to_port_53(lab, "vm2", "outside") == ["OK"]
    assert lab.udp("outside", "vm2", 53, timeout=QUICK) == "REFUSED"  # the control: a new flow is answered


def test_replies_to_a_flow_the_vm_started_with_another_vm_pass_a_reject(lab: LabSession) -> None:
    """The same between two VMs: vm2 talks from its UDP port 53 to vm1; vm1's replies match vm1's reject
    rule to vm2:53, but they belong to vm2's own flow."""
    lab.serve("vm1", udp=[5000])
    lab.apply(
        [
            {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "services": ["udp/53"], "action": "reject"},
            {"id": "out", "from": "vm:vm2", "to": "vm:vm1", "services": ["udp/5000"]},
        ]
    )
    assert lab.udp("vm1", "vm2", 53, timeout=QUICK) == "REFUSED"  # the control: a new flow is answered
    assert reply_to_port_53(lab, "vm2", "vm1") == ["OK"]


def test_removing_every_reject_rule_is_applied(lab: LabSession) -> None:
    lab.serve("vm2", tcp=[22])
    lab.apply(RULES)
    lab.apply([r for r in RULES if r.get("action") != "reject"])
    assert lab.tcp("outside", "vm2", 22) == "OK"
