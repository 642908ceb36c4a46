"""Reject chains: all in the inet table, after conntrack (VM senders at prerouting, routed senders at forward,
the host at output), answering new flows only; and the ARP the host needs to deliver its ICMP answers."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from hyperfence.model.policy import (
    L4,
    IcmpService,
    NamedService,
    PortService,
    ProtocolService,
    SpecialService,
)
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import is_answered_by_icmp, resolve_policy
from hyperfence.ruleset.build import BRIDGE, INET, NETDEV, REJECT_ARP_SET
from hyperfence.ruleset.compile import compile_ruleset, vm_sid
from hyperfence.ruleset.ir import JSON, Rule, Ruleset, TableId
from hyperfence.ruleset.reject import (
    FORWARD_CHAIN,
    OUTPUT_CHAIN,
    PRE_CHAIN,
    RECEIVER_MAP,
    SENDER_MAP,
    TO_CHAIN,
)
from tests.unit.policy.test_parse import doc

RESET: JSON = {"reject": {"type": "tcp reset"}}
PORT_UNREACHABLE: JSON = {"reject": {"type": "icmp", "expr": 3}}
PROHIBITED: JSON = {"reject": {"type": "icmp", "expr": 13}}
SYN_ONLY: JSON = {
    "match": {
        "op": "==",
        "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, [2, 16]]},
        "right": 2,
    }
}
CT_NEW: JSON = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": 8}}
RETURN: JSON = {"return": None}


def proto(n: int) -> JSON:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "protocol"}}, "right": n}}


INGRESS_REJECTS = [
    {
        "id": "ssh-out",
        "from": "outside",
        "to": "vm:vm2",
        "services": ["tcp/22", "any"],
        "action": "reject",
        "priority": 10,
    },
    {"id": "dns-host", "from": "host", "to": "vm:vm2", "services": ["udp/53"], "action": "reject"},
    {"id": "web", "from": ["outside", "host"], "to": "vm:vm2", "services": ["tcp/80"], "priority": 5},
    {"id": "quiet", "from": "host", "to": "vm:vm2", "services": ["tcp/23"], "action": "deny", "priority": 5},
]


def compiled(data: dict[str, Any]) -> Ruleset:
    return compile_ruleset(resolve_policy(parse_policy(data)))


def rules_of(rs: Ruleset, table: TableId, chain: str) -> list[Rule]:
    return rs.chain_rules()[(table, chain)]


def peer_set(rule: Rule, rs: Ruleset) -> tuple[str, frozenset[str]]:
    """The name and elements of the address set a rule matches its peer (`ip saddr`) against."""
    (name,) = [
        s["match"]["right"][1:]
        for s in rule.statements()
        if "match" in s and s["match"]["left"] == {"payload": {"protocol": "ip", "field": "saddr"}}
    ]
    nset = rs.set_by_key()[(INET, name)]
    return name, nset.elements


def goto_map(rs: Ruleset, name: str) -> dict[str, str]:
    """A verdict map of the inet table as {address: goto target}."""
    out = {}
    for elem in rs.set_by_key()[(INET, name)].elements:
        addr, verdict = json.loads(elem)
        out[addr] = verdict["goto"]["target"]
    return out


def test_every_reject_chain_runs_after_conntrack_and_only_for_new_flows() -> None:
    rs = compiled(doc(rules=INGRESS_REJECTS))
    chains = rs.chain_by_key()
    pre, fwd, out = chains[(INET, PRE_CHAIN)], chains[(INET, FORWARD_CHAIN)], chains[(INET, OUTPUT_CHAIN)]
    # prerouting 0: after conntrack (-200) and the established mark (-150), before the bridge's +10 chains
    assert (pre.type, pre.hook, pre.priority, pre.policy) == ("filter", "prerouting", 0, "accept")
    assert (fwd.type, fwd.hook, fwd.priority, fwd.policy) == ("filter", "forward", 0, "accept")
    assert (out.type, out.hook, out.priority, out.policy) == ("filter", "output", 0, "accept")
    to_receiver = {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@ireject_dst"}}
    from_sender = {"vmap": {"key": {"payload": {"protocol": "ip", "field": "saddr"}}, "data": "@ireject_src"}}
    br0 = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}
    # Every dispatch asks conntrack first: a packet of a flow it knows (a reply, an open flow) is never
    # answered, and costs one compare.
    assert [(r.comment, r.statements()) for r in rules_of(rs, INET, PRE_CHAIN)] == [
        ("sys:dispatch", [CT_NEW, br0, from_sender])
    ]
    assert [(r.comment, r.statements()) for r in rules_of(rs, INET, FORWARD_CHAIN)] == [
        ("sys:bridged", [br0, RETURN]),  # bridged IPv4 (br_netfilter): reject_pre's business
        ("sys:dispatch", [CT_NEW, to_receiver]),
    ]
    assert [(r.comment, r.statements()) for r in rules_of(rs, INET, OUTPUT_CHAIN)] == [
        ("sys:dispatch", [CT_NEW, to_receiver])
    ]
    # Only the receiver's own address is dispatched: not the host's (10.77.0.1), not vm1 (no ingress reject).
    assert goto_map(rs, RECEIVER_MAP) == {"10.77.0.12": f"{vm_sid('vm2')}_rej_in"}
    # With an ingress reject, every VM may send what it answers: all are senders.
    assert goto_map(rs, SENDER_MAP) == {
        "10.77.0.11": f"{vm_sid('vm1')}_rej_out",
        "10.77.0.12": f"{vm_sid('vm2')}_rej_out",
    }
    # ... and after a sender's allow, the receiver's rules are asked the same question.
    assert [r.statements() for r in rules_of(rs, INET, TO_CHAIN)] == [[to_receiver]]
    # Nothing is left on the VMs' ports (the netdev table stays, empty, so that a converge removes the
    # netdev chains of earlier versions).
    assert [c for c in rs.chains if c.table == NETDEV] == []


def test_receiver_chain_repeats_ingress_entries_in_order_and_never_accepts() -> None:
    rs = compiled(doc(rules=INGRESS_REJECTS))
    rules = rules_of(rs, INET, f"{vm_sid('vm2')}_rej_in")
    assert [r.comment for r in rules] == [
        "rule:web#1",  # priority 5: an allow only returns
        "rule:quiet#1",  # a deny too
        "rule:ssh-out#1",
        "rule:ssh-out#1:rest",
        "rule:ssh-out#2:tcp",  # "any": a TCP SYN gets a reset,
        "rule:ssh-out#2:rest",  # other TCP nothing,
        "rule:ssh-out#2:udp",  # UDP port unreachable,
        "rule:ssh-out#2",  # the rest administratively prohibited
        "rule:dns-host#1",
    ]
    by_comment = {r.comment: r.statements() for r in rules}
    assert by_comment["rule:web#1"][-1] == RETURN and by_comment["rule:quiet#1"][-1] == RETURN
    ssh = by_comment["rule:ssh-out#1"]
    assert ssh[-1] == RESET and SYN_ONLY in ssh  # a reset answers a new connection only
    assert by_comment["rule:ssh-out#1:rest"][-1] == RETURN
    anything = [by_comment[f"rule:ssh-out#2{s}"] for s in (":tcp", ":rest", ":udp", "")]
    assert anything[0][:2] == [proto(6), SYN_ONLY] and anything[0][-1] == RESET
    assert anything[1][0] == proto(6) and anything[1][-1] == RETURN
    assert anything[2][0] == proto(17) and anything[2][-1] == PORT_UNREACHABLE
    assert anything[3][-1] == PROHIBITED
    assert by_comment["rule:dns-host#1"][-1] == PORT_UNREACHABLE
    assert all({"accept": None} not in r.statements() for r in rules)
    # Peers are matched against address sets of the inet table ("i" prefix): outside and the gateway.
    out_name, out_elems = peer_set(rules[2], rs)
    host_name, host_elems = peer_set(rules[8], rs)
    assert out_name.startswith("is_") and host_name.startswith("is_")
    assert host_elems == frozenset({'"10.77.0.1"'})
    assert '{"range":["10.77.4.0","126.255.255.255"]}' in out_elems  # loopback, multicast: not outside


def test_a_senders_chain_repeats_its_egress_and_goes_on_to_the_receiver_after_an_allow() -> None:
    rules = [
        {
            "id": "no-smtp",
            "from": "vm:vm1",
            "to": "any",
            "services": ["tcp/25", "proto/6", "proto/47"],
            "action": "reject",
        },
        {"id": "quiet", "from": "vm:vm1", "to": "any", "services": ["udp/9"], "action": "deny"},
        {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]},
        {"id": "no-web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"], "action": "reject"},
    ]
    rs = compiled(doc(rules=rules))
    by_comment = {r.comment: r.statements() for r in rules_of(rs, INET, f"{vm_sid('vm1')}_rej_out")}
    assert list(by_comment) == [
        "rule:no-smtp#1",
        "rule:no-smtp#1:rest",
        "rule:no-smtp#2",  # proto/6 is TCP: a reset for a SYN
        "rule:no-smtp#2:rest",
        "rule:no-smtp#3",
        "rule:quiet#1",
        "rule:web#1",
        "rule:no-web#1",
        "rule:no-web#1:rest",
    ]
    assert by_comment["rule:no-smtp#2"][-1] == RESET and SYN_ONLY in by_comment["rule:no-smtp#2"]
    assert by_comment["rule:no-smtp#3"][-1] == PROHIBITED
    assert by_comment["rule:quiet#1"][-1] == RETURN
    assert by_comment["rule:web#1"][-1] == {"goto": {"target": TO_CHAIN}}  # vm2 has an ingress reject


def test_without_an_ingress_reject_only_the_rejecting_vms_are_senders_and_no_other_hook_exists() -> None:
    egress_only = [
        {"id": "no-out", "from": "vm:vm1", "to": "outside", "services": ["tcp/25"], "action": "reject"},
        {"id": "web", "from": "vm:vm1", "to": "outside", "services": ["tcp/80"]},
    ]
    rs = compiled(doc(rules=egress_only))
    inet = {c.name: c.hook for c in rs.chains if c.table == INET and c.hook}
    assert inet == {"pre": "prerouting", "out": "output", PRE_CHAIN: "prerouting"}
    assert goto_map(rs, SENDER_MAP) == {"10.77.0.11": f"{vm_sid('vm1')}_rej_out"}
    by_comment = {r.comment: r.statements() for r in rules_of(rs, INET, f"{vm_sid('vm1')}_rej_out")}
    assert by_comment["rule:no-out#1"][-1] == RESET
    assert by_comment["rule:web#1"][-1] == RETURN  # no receiver rejects: nothing more to ask
    for rules in ([], [{**r, "action": "deny"} for r in INGRESS_REJECTS]):
        rs = compiled(doc(rules=rules))
        inet = {c.name: c.hook for c in rs.chains if c.table == INET and c.hook}
        assert inet == {"pre": "prerouting", "out": "output"}  # the conntrack marker only
        assert [s.name for s in rs.sets if s.table == INET] == ["cap_vms"]  # (the connection caps)


def test_a_network_without_a_gateway_gets_no_answers() -> None:
    data = doc(rules=[{"id": "no", "from": "vm:vm1", "to": "any", "action": "reject"}])
    data["networks"] = [{k: v for k, v in data["networks"][0].items() if k != "gateway"}]
    rs = compiled(data)
    assert not any(c.table == INET and c.name.endswith("_rej_out") for c in rs.chains)
    assert rs.set_by_key()[(BRIDGE, REJECT_ARP_SET)].elements == frozenset()


def arp_elements(rules: list[dict[str, Any]]) -> set[str]:
    rs = compiled(doc(rules=rules))
    return set(rs.set_by_key()[(BRIDGE, REJECT_ARP_SET)].elements)


VM1_ARP = '{"concat":["vp1","10.77.0.1","10.77.0.11"]}'
VM2_ARP = '{"concat":["vp2","10.77.0.1","10.77.0.12"]}'


def test_vms_the_host_may_answer_with_icmp_may_arp_with_their_gateway() -> None:
    # Nothing without a reject, or with TCP-only rejects (a reset is sent straight out of the VM's port).
    assert arp_elements([]) == set()
    assert (
        arp_elements([{"from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/22"], "action": "reject"}])
        == set()
    )
    # An egress reject answered with ICMP: the sender.
    for svc in ("udp/53", "icmp", "proto/47", "any"):
        assert arp_elements([{"from": "vm:vm1", "to": "outside", "services": [svc], "action": "reject"}]) == {
            VM1_ARP
        }, svc
    # An ingress reject: the VMs among its peers.
    ingress = {"from": "vm:vm1", "to": "vm:vm2", "services": ["udp/53"], "action": "reject"}
    assert arp_elements([ingress]) == {VM1_ARP}
    assert arp_elements([{**ingress, "from": "10.77.0.0/22"}]) == {VM1_ARP, VM2_ARP}
    assert arp_elements([{**ingress, "from": "outside"}]) == set()


def test_the_bridge_base_chains_let_that_arp_through_before_the_vm_chains() -> None:
    rs = compiled(doc())
    for chain, key in (
        ("egress", [{"meta": {"key": "iifname"}}, "daddr ip", "saddr ip"]),
        ("ingress", [{"meta": {"key": "oifname"}}, "saddr ip", "daddr ip"]),
    ):
        comments = [r.comment for r in rules_of(rs, BRIDGE, chain)]
        assert comments.index("sys:est") < comments.index("sys:reject-arp") < comments.index("sys:dispatch")
        (rule,) = [r for r in rules_of(rs, BRIDGE, chain) if r.comment == "sys:reject-arp"]
        concat = [key[0], *({"payload": {"protocol": "arp", "field": f}} for f in key[1:])]
        assert rule.statements()[0] == {
            "match": {"op": "==", "left": {"concat": concat}, "right": f"@{REJECT_ARP_SET}"}
        }
        assert rule.statements()[-1] == {"accept": None}


@pytest.mark.parametrize(
    ("service", "icmp"),
    [
        (PortService(L4.TCP), False),
        (ProtocolService(6), False),
        (PortService(L4.UDP), True),
        (ProtocolService(17), True),
        (ProtocolService(47), True),
        (IcmpService(8, None), True),
        (NamedService(SpecialService.ANY), True),
        (NamedService(SpecialService.ARP), False),
        (NamedService(SpecialService.DHCP), False),
    ],
)
def test_which_rejects_answer_with_icmp(service: Any, icmp: bool) -> None:
    assert is_answered_by_icmp(service) is icmp


REJECT_HOST = [
    {"id": "lease", "from": "vm:vm1", "to": "host", "services": ["dhcp"]},
    {"id": "no-host", "from": "vm:vm1", "to": "host", "action": "reject"},
    {"id": "no-vm1", "from": "vm:vm2", "to": "vm:vm1", "services": ["udp/53"], "action": "reject"},
]


def test_what_the_bridge_lets_through_whatever_follows_is_never_answered() -> None:
    """The agent's channel (first, as in the bridge chain) and an allowed DHCP exchange return before a
    later reject of everything could answer them."""
    rs = compiled(doc(rules=REJECT_HOST, settings={"agent_endpoint": "10.77.0.1:8443"}))
    rules = rules_of(rs, INET, f"{vm_sid('vm1')}_rej_out")
    assert [r.comment for r in rules][:3] == ["sys:agent", "rule:lease#1", "rule:no-host#1:tcp"]
    agent, lease = rules[0].statements(), rules[1].statements()
    assert agent == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "10.77.0.1",
            }
        },
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8443}},
        RETURN,
    ]
    assert lease[-1] == {"goto": {"target": TO_CHAIN}}  # an allow: on to the receiver (none here)
    assert {
        "match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 67}
    } in lease


def test_a_quarantined_vm_is_neither_answered_nor_answered_for() -> None:
    r = resolve_policy(parse_policy(doc(rules=REJECT_HOST)))
    vm1 = next(vp.vm.id for vp in r.vms if vp.vm.name == "vm1")
    rs = compile_ruleset(dataclasses.replace(r, quarantine=frozenset({vm1})))
    assert goto_map(rs, SENDER_MAP) == {"10.77.0.12": f"{vm_sid('vm2')}_rej_out"}
    assert RECEIVER_MAP not in {s.name for s in rs.sets}  # vm1 was the only receiver
    # vm2's own egress reject (UDP to vm1) still answers vm2; vm1 gets no ARP with its gateway for it
    assert rs.set_by_key()[(BRIDGE, REJECT_ARP_SET)].elements == frozenset({VM2_ARP})


def test_both_halves_of_a_dhcp_exchange_pass_a_later_reject() -> None:
    """A DHCP server's answer is a new flow (the request went to the broadcast address): the other half of
    a `dhcp` rule (a client taking the answer, a server sending it) returns before a later reject. A VM on
    both sides of one rule holds both halves in one chain, each under its own comment."""
    rs = compiled(
        doc(
            rules=[
                {"id": "lease", "from": "vms", "to": "vms", "services": ["dhcp"]},
                {"id": "rej", "from": "vms", "to": "vms", "action": "reject"},
            ]
        )
    )
    for chain in (f"{vm_sid('vm1')}_rej_out", f"{vm_sid('vm1')}_rej_in"):
        rules = rules_of(rs, INET, chain)
        comments = [r.comment for r in rules]
        assert sorted(comments[:2]) == ["rule:lease#1", "rule:lease#1:pair"], comments  # before the reject
        assert len(comments) == len(set(comments))
        sport, dport, *_, verdict = rules[comments.index("rule:lease#1:pair")].statements()
        assert (sport["match"]["right"], dport["match"]["right"]) == (67, 68)  # a server's answer
        assert verdict in (RETURN, {"goto": {"target": TO_CHAIN}})
