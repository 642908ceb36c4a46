"""`can` and reject rules: not allowed, naming the rule and what the sender gets, as the kernel answers."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.model.kernel import Flavour
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.policy.whatif import Flow, can
from tests.unit.policy.test_parse import doc

REJECT_ALL = {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "action": "reject"}
BACK = {
    "id": "back",
    "from": "vm:vm2",
    "to": "vm:vm1",
    "services": ["tcp/80", "udp/5000", "icmp/echo-request"],
}


@pytest.mark.parametrize(
    ("flow", "answer"),
    [
        (Flow("tcp", 80), "the sender gets a TCP reset"),  # protocol any: a reset for TCP
        (Flow("6"), "the sender gets a TCP reset"),
        (Flow("udp", 53), "the sender gets ICMP port unreachable"),
        (Flow("icmp", icmp_type=8), "the sender gets ICMP administratively prohibited"),
        (Flow("47"), "the sender gets ICMP administratively prohibited"),
    ],
)
def test_a_reject_is_not_allowed_and_says_what_the_sender_gets(flow: Flow, answer: str) -> None:
    resolved = resolve_policy(parse_policy(doc(rules=[REJECT_ALL, BACK])))
    a = can(resolved, "vm1", "vm2", flow)
    assert not a.allowed
    assert a.reason == f"vm1 egress: reject by rej ({answer})"


def test_the_reverse_flows_a_reject_would_not_let_start_are_still_allowed() -> None:
    """Only first packets are asked about: vm2's flows to vm1 are allowed although vm1 rejects all it
    opens to vm2 (vm1's replies to them are never judged, by `can` or by the kernel)."""
    resolved = resolve_policy(parse_policy(doc(rules=[REJECT_ALL, BACK])))
    for flow in (Flow("tcp", 80), Flow("udp", 5000), Flow("icmp", icmp_type=8)):
        assert can(resolved, "vm2", "vm1", flow).allowed, flow


def test_without_a_gateway_a_reject_gets_no_answer() -> None:
    data: dict[str, Any] = doc(rules=[REJECT_ALL])
    data["networks"] = [{k: v for k, v in data["networks"][0].items() if k != "gateway"}]
    a = can(resolve_policy(parse_policy(data)), "vm1", "vm2", Flow("udp", 53))
    assert not a.allowed
    assert (
        a.reason == "vm1 egress: reject by rej (no answer: the host has no address on the sender's network)"
    )


def test_under_bridge_native_the_bridge_answers_a_vm_without_a_gateway() -> None:
    """bridge_native rejects a VM's frame in the bridge, which answers it itself (addresses swapped): no
    host address is needed on the sender's network."""
    data: dict[str, Any] = doc(rules=[REJECT_ALL])
    data["networks"] = [{k: v for k, v in data["networks"][0].items() if k != "gateway"}]
    resolved = resolve_policy(parse_policy(data))
    for flow, answer in (
        (Flow("udp", 53), "the sender gets ICMP port unreachable"),
        (Flow("tcp", 80), "the sender gets a TCP reset"),
    ):
        a = can(resolved, "vm1", "vm2", flow, flavour=Flavour.BRIDGE_NATIVE)
        assert not a.allowed
        assert a.reason == f"vm1 egress: reject by rej ({answer})"
    # a sender that is no VM is answered by the host's IP stack in both flavours
    outside = {"id": "rej", "from": "outside", "to": "vm:vm2", "action": "reject"}
    a = can(resolve_policy(parse_policy(doc(rules=[outside]))), "192.0.2.1", "vm2", Flow("udp", 53))
    assert a.reason == "vm2 ingress: reject by rej (the sender gets ICMP port unreachable)"


def test_under_bridge_native_the_host_and_a_rejected_vm_do_not_arp_for_the_answer() -> None:
    """br_netfilter lets a VM whose rejects the host answers by ICMP and its gateway ARP each other
    (`sys:reject-arp`); bridge_native has no such rule (its `reject_arp` set stays empty): the VM's own
    rules decide."""
    rej = {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "services": ["udp"], "action": "reject"}
    resolved = resolve_policy(parse_policy(doc(rules=[rej])))
    gateway = str(resolved.vms[0].gateway)
    assert can(resolved, gateway, "vm1", Flow("arp")).allowed
    native = can(resolved, gateway, "vm1", Flow("arp"), flavour=Flavour.BRIDGE_NATIVE)
    assert not native.allowed and native.reason.startswith("vm1 ingress: deny by sys:default-deny;")
