from __future__ import annotations

from typing import Any

from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.policy.whatif import Answer, Flow, can
from tests.unit.policy.test_parse import doc

ARP = Flow("arp")
HOST = "10.77.0.1"


def ask(rules: list[dict[str, Any]], src: str, dst: str, flow: Flow = ARP) -> Answer:
    return can(resolve_policy(parse_policy(doc(rules=rules))), src, dst, flow)


# --- ARP: `can` answers by the rules the compiler renders ------------------------------------------


def test_arp_is_implied_by_an_allow_of_everything_and_by_reject_not_by_deny() -> None:
    for rule in (
        {"from": "vm:vm1", "to": "vm:vm2"},
        {"from": "vm:vm1", "to": "vm:vm2", "services": ["any"]},
        {"from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "action": "reject"},
    ):
        for src, dst in (("vm1", "vm2"), ("vm2", "vm1")):
            answer = ask([rule], src, dst)
            assert answer.allowed, (rule, src, answer)
            assert [s.rule for s in answer.steps] == ["sys:arp", "sys:arp"]
    denied = ask([{"from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "action": "deny"}], "vm1", "vm2")
    assert not denied.allowed and denied.reason == "vm1 egress: deny by sys:default-deny"
    # routed peers: ARP with the gateway
    assert ask([{"from": "vm:vm1", "to": "outside"}], "vm1", HOST).allowed


def test_an_arp_rule_answers_both_ways() -> None:
    rules = [
        {"id": "a", "from": "vm:vm1", "to": "host", "services": ["arp"]},
        {"id": "b", "from": "vm:vm1", "to": "vm:vm2", "services": ["arp"]},
    ]
    for src, dst, rule in (("vm1", HOST, "a"), (HOST, "vm1", "a"), ("vm1", "vm2", "b"), ("vm2", "vm1", "b")):
        answer = ask(rules, src, dst)
        assert answer.allowed, (src, dst, answer)
        assert {s.rule for s in answer.steps} == {rule}
    # not for IP, and not for VMs it does not name
    assert not ask(rules, "vm1", HOST, Flow("icmp", icmp_type=8)).allowed
    assert not ask(rules, HOST, "vm2").allowed


def test_an_arp_rule_for_other_peers_does_not_decide() -> None:
    """A deny of ARP with one peer leaves the implied ARP with another (the kernel matches the rule's
    peers only)."""
    rules = [
        {"id": "no-arp", "from": "vm:vm1", "to": "10.77.0.50", "services": ["arp"], "action": "deny"},
        {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]},
    ]
    assert ask(rules, "vm1", "vm2").allowed
    answer = ask(rules, "vm1", "10.77.0.50")
    assert not answer.allowed and answer.reason == "vm1 egress: deny by no-arp"
    assert not ask(rules, "10.77.0.50", "vm1").allowed  # both ways


def test_an_ip_flow_needs_its_sender_to_resolve_the_next_hop() -> None:
    """Found by the differential test: an explicit ARP deny on the receiver breaks an allowed ping; `can`
    now walks the ARP exchange the first packet needs (request and reply, both VMs' rules)."""
    ping = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
    quiet = {
        "id": "quiet",
        "from": "vm:vm2",
        "to": "any",
        "services": ["arp"],
        "action": "deny",
        "priority": 10,
    }
    icmp = Flow("icmp", icmp_type=8, icmp_code=0)
    assert ask([ping], "vm1", "vm2", icmp).allowed
    answer = ask([ping, quiet], "vm1", "vm2", icmp)
    assert not answer.allowed
    # (`arp` works both ways: its deny already stops the request on its way into vm2)
    assert answer.reason.startswith("vm2 ingress: ARP deny by quiet: the sender cannot resolve its next hop")
    # to a routed peer the next hop is the gateway: an ARP deny towards it breaks the flow too
    out = {"id": "out", "from": "vm:vm1", "to": "outside", "protocol": "icmp"}
    gw = {"id": "gw", "from": "vm:vm1", "to": "host", "services": ["arp"], "action": "deny"}
    assert ask([out], "vm1", "10.78.0.2", icmp).allowed
    assert "ARP deny by gw" in ask([out, gw], "vm1", "10.78.0.2", icmp).reason


def test_the_host_may_resolve_a_vm_it_answers_for_a_reject() -> None:
    """Found by the differential test: a VM with a UDP reject (answered by ICMP from the host) and its
    gateway may ARP each other (`sys:reject-arp`, before the VM's own rules); `can` knows it too."""
    rej = {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "services": ["udp"], "action": "reject"}
    assert not ask([], HOST, "vm1").allowed
    answer = ask([rej], HOST, "vm1")
    assert answer.allowed and [s.rule for s in answer.steps] == ["sys:reject-arp"]
    tcp_only = {**rej, "services": ["tcp/80"]}  # a reset needs no ICMP from the host: no ARP with it
    assert not ask([tcp_only], HOST, "vm1").allowed


def test_a_lease_is_asked_as_the_whole_exchange() -> None:
    """`can VM SERVER --protocol dhcp`: the request from 0.0.0.0 to the broadcast address and the server's
    answer, each through the rules (found by the differential test: a reject from the host ordered before
    the dhcp rule drops the offer, which `can` did not see when asked about port 67 alone)."""
    dhcp = Flow("dhcp")
    lease = {"id": "lease", "from": "vms", "to": "host", "services": ["dhcp"], "priority": 1000}
    assert ask([lease], "vm1", HOST, dhcp).allowed
    no_host = {"id": "no-host", "from": HOST, "to": "vm:vm1", "action": "reject", "priority": 500}
    answer = ask([lease, no_host], "vm1", HOST, dhcp)
    assert not answer.allowed and answer.reason == "vm1 ingress: reject by no-host"
    # a VM that no dhcp rule makes a client may not send from 0.0.0.0 at all, whatever udp rule it has
    udp = {"id": "udp", "from": "vm:vm1", "to": "any", "services": ["udp"]}
    assert ask([udp], "vm1", HOST, dhcp).reason.startswith("vm1 egress: deny by sys:spoof")


def test_a_lease_from_a_vm_needs_its_server_role_and_a_known_port() -> None:
    dhcp = Flow("dhcp")
    serve = {"id": "serve", "from": "vm:vm2", "to": "vm:vm1", "services": ["dhcp-server"]}
    answer = ask([serve], "vm1", "vm2", dhcp)
    assert answer.allowed and [s.rule for s in answer.steps] == ["serve"] * 4
    # plain udp does not make vm2 a server: the host drops what it sends from port 67 to port 68
    udp = {"id": "udp", "from": "vm:vm2", "to": "vm:vm1", "services": ["udp"]}
    take = {"id": "take", "from": "vm:vm1", "to": "any", "services": ["dhcp"]}
    answer = ask([udp, take, {**udp, "id": "in", "from": "any", "to": "vm:vm2"}], "vm1", "vm2", dhcp)
    assert not answer.allowed and answer.steps[-1].rule == "sys:no-dhcp-server", answer
    # a client on a bridge port no declared VM holds gets nothing
    answer = ask([serve], "10.77.0.99", "vm2", dhcp)
    assert not answer.allowed and answer.steps[-1].rule == "sys:unknown-port"


def test_a_reject_that_names_a_vm_only_by_address_is_silence() -> None:
    """A rejected packet must leave its sender to be answered: vm1 first resolves vm2, which answers ARP
    only for its own rules' peers. A reject naming vm2 as `vm:vm2` gives vm2 that ARP; one naming it only
    by an address range gives vm2 no rule at all, so vm1's request goes unanswered and nothing comes back
    (found by the differential test)."""
    tcp = Flow("tcp", 443)
    by_name = {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "action": "reject"}
    answer = ask([by_name], "vm1", "vm2", tcp)
    assert not answer.allowed and answer.deciding is not None and answer.deciding.verdict.value == "reject"
    by_range = {**by_name, "to": "10.77.0.0/28"}
    answer = ask([by_range], "vm1", "vm2", tcp)
    step = answer.deciding
    assert step is not None and (step.vm, step.verdict.value, step.rule) == (
        "vm2",
        "deny",
        "sys:default-deny",
    )
    assert "reject by rej never sees it" in answer.reason, answer.reason
    # to the host (its gateway address answers ARP for the VMs its rejects answer): a reset
    assert ask([{**by_name, "to": "host"}], "vm1", HOST, tcp).deciding.verdict.value == "reject"  # type: ignore[union-attr]
