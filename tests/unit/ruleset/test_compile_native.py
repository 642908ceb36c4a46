"""The bridge_native data plane (model/kernel.py): the same policy, with `ct state`, the connection caps and
the rejects in the bridge family, no inet marker chain; and the compiler's determinism and cache properties
for both flavours."""

from __future__ import annotations

import json
from typing import Any

from hyperfence.model.kernel import Flavour
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.compile import BRIDGE, INET, CompileCache, compile_ruleset, vm_sid
from hyperfence.ruleset.ir import Ruleset
from hyperfence.ruleset.plan import plan_changes
from hyperfence.ruleset.readback import Actual
from tests.unit.policy.test_parse import doc
from tests.unit.ruleset.fake_kernel import FakeKernel
from tests.unit.ruleset.test_compile import RULES

NATIVE = Flavour.BRIDGE_NATIVE
EST: Any = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": [2, 4]}}
NEW: Any = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": 8}}
CT_NEW: Any = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": 8}}
IPV4: Any = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "version"}}, "right": 4}}
REJECTS = [
    {"id": "ssh", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/22", "udp/53"], "action": "reject"},
    {
        "id": "no-web",
        "from": "any",
        "to": "vm:vm2",
        "services": ["tcp/80"],
        "action": "reject",
        "priority": 5,
    },
    {"id": "web-out", "from": "vm:vm1", "to": "any", "services": ["tcp/80"]},
]


def compiled(data: dict[str, Any], flavour: Flavour = NATIVE) -> Ruleset:
    return compile_ruleset(resolve_policy(parse_policy(data)), flavour=flavour)


def sids() -> tuple[str, str]:
    a, b = (vm_sid(v.id) for v in parse_policy(doc()).vms)
    return a, b


def test_the_default_flavour_is_br_netfilter() -> None:
    data = doc(rules=RULES)
    assert compiled(data, Flavour.BR_NETFILTER) == compile_ruleset(resolve_policy(parse_policy(data)))


def test_established_flows_are_accepted_by_bridge_conntrack_without_an_inet_marker() -> None:
    rs = compiled(doc(rules=RULES))
    chains = rs.chain_rules()
    # no marker, no reject chain in inet: only the caps of connections routed towards a VM
    sid1, sid2 = sids()
    assert sorted(c.name for c in rs.chains if c.table == INET) == sorted(
        ["cap_fwd", *(f"{sid}_{suffix}" for sid in (sid1, sid2) for suffix in ("cap", "cap_drop"))]
    )
    assert [s.name for s in rs.sets if s.table == INET] == ["icap_vms"]
    for base in ("egress", "ingress"):
        (est,) = [r for r in chains[(BRIDGE, base)] if r.comment == "sys:est"]
        assert est.statements() == [EST, x.ACCEPT]
    # the mark bit only tags the host's reject answers (bridge output), which `ingress` lets through
    marked = sorted((r.chain, r.comment) for r in rs.rules if '"mark"' in r.expr)
    assert marked == [("answers", "sys:reject-answer"), ("ingress", "sys:reject-answer")]
    assert rs.chain_by_key()[(BRIDGE, "answers")].hook == "output"
    # the other flavour marks in inet and tests the mark in the bridge
    other = compiled(doc(rules=RULES), Flavour.BR_NETFILTER).chain_rules()
    assert [r.comment for r in other[(INET, "pre")]][:2] == ["sys:ct-mark", "sys:ct-clear"]
    (est,) = [r for r in other[(BRIDGE, "egress")] if r.comment == "sys:est"]
    assert est.statements()[0] != EST


def test_connection_caps_count_in_the_bridge_by_port_and_by_destination() -> None:
    rs = compiled(doc(rules=RULES, limits=[{"id": "small", "vms": "vm:vm1", "connections": 200}]))
    sid1, sid2 = sids()
    chains = rs.chain_rules()
    egress = [r.comment for r in chains[(BRIDGE, "egress")]]
    assert egress.index("sys:est") < egress.index("sys:ct-cap-out") < egress.index("sys:dispatch")
    out = chains[(BRIDGE, "egress")][egress.index("sys:ct-cap-out")]
    inn = chains[(BRIDGE, "egress")][egress.index("sys:ct-cap-in")]
    assert out.statements() == [NEW, {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@cap_ports"}}]
    assert inn.statements() == [
        NEW,
        {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@cap_vms"}},
    ]
    by_name = {s.name: s for s in rs.sets}
    assert (by_name["cap_ports"].table, by_name["cap_ports"].key_type) == (BRIDGE, "ifname")
    assert (by_name["cap_vms"].table, by_name["cap_vms"].key_type) == (BRIDGE, "ipv4_addr")
    targets = {json.loads(e)[1]["jump"]["target"] for e in by_name["cap_ports"].elements}
    assert targets == {f"{sid1}_cap", f"{sid2}_cap"}
    for sid, cap in ((sid1, 200), (sid2, 16_384)):
        (count,) = chains[(BRIDGE, f"{sid}_cap")]
        assert count.statements() == [{"ct count": {"val": cap, "inv": True}}, x.goto(f"{sid}_cap_drop")]
        assert chains[(BRIDGE, f"{sid}_cap_drop")][-1].statements() == [x.COUNTER, x.DROP]


def test_connections_routed_to_a_vm_are_capped_in_inet_forward_before_confirmation() -> None:
    rs = compiled(doc(rules=RULES, limits=[{"id": "small", "vms": "vm:vm1", "connections": 200}]))
    sid1, sid2 = sids()
    chains = rs.chain_rules()
    fwd = rs.chain_by_key()[(INET, "cap_fwd")]
    # forward: only routed packets; -10: after conntrack, before reject_fwd (0) and the confirmation
    assert (fwd.hook, fwd.priority, fwd.policy) == ("forward", -10, "accept")
    (dispatch,) = chains[(INET, "cap_fwd")]
    assert dispatch.comment == "sys:ct-cap-in"
    assert dispatch.statements() == [
        NEW,
        # routed from a managed bridge (a VM): its bridge's egress counted it already
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "br0"}},
        {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@icap_vms"}},
    ]
    icap = {s.name: s for s in rs.sets}["icap_vms"]
    assert (icap.table, icap.key_type) == (INET, "ipv4_addr")
    assert {json.loads(e)[1]["jump"]["target"] for e in icap.elements} == {f"{sid1}_cap", f"{sid2}_cap"}
    for sid, cap in ((sid1, 200), (sid2, 16_384)):
        (count,) = chains[(INET, f"{sid}_cap")]
        assert count.statements() == [{"ct count": {"val": cap, "inv": True}}, x.goto(f"{sid}_cap_drop")]
        drop = chains[(INET, f"{sid}_cap_drop")]
        assert drop[-1].statements() == [x.COUNTER, x.DROP]
        # only ever sent to the VM: the log says `in`
        assert [r.comment for r in drop] == ["sys:ct-cap:in:log", "sys:ct-cap"]


def test_rejects_are_decided_in_bridge_prerouting_by_port_then_the_receivers_rules() -> None:
    rs = compiled(doc(rules=REJECTS))
    sid1, sid2 = sids()
    chains = rs.chain_rules()
    by_key = rs.chain_by_key()
    pre = by_key[(BRIDGE, "reject_pre")]
    assert (pre.hook, pre.priority, pre.policy) == ("prerouting", 0, "accept")  # the only hook it may be in
    (dispatch,) = chains[(BRIDGE, "reject_pre")]
    assert dispatch.statements() == [
        CT_NEW,
        {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@reject_src"}},
    ]
    by_name = {s.name: s for s in rs.sets}
    assert by_name["reject_src"].table == BRIDGE and by_name["reject_src"].key_type == "ifname"
    assert {json.loads(e)[1]["goto"]["target"] for e in by_name["reject_src"].elements} == {
        f"{sid1}_rej_out",
        f"{sid2}_rej_out",
    }
    out1 = chains[(BRIDGE, f"{sid1}_rej_out")]
    resets = [r for r in out1 if {"reject": {"type": "tcp reset"}} in r.statements()]
    assert resets and all(r.statements()[0] == IPV4 for r in resets)
    unreach = [r for r in out1 if {"reject": {"type": "icmp", "expr": 3}} in r.statements()]
    assert unreach and unreach[0].statements()[0] == IPV4
    # an allow goes on to the receiver's ingress rules, in the bridge
    assert any(r.statements()[-1] == x.goto("reject_to") for r in out1)
    assert chains[(BRIDGE, "reject_to")][0].statements() == [
        {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@reject_dst"}}
    ]
    assert (BRIDGE, f"{sid2}_rej_in") in chains
    # routed senders and the host reach vm2 through the IP stack: answered in inet, as in the other flavour
    assert (
        (INET, f"{sid2}_rej_in") in chains
        and (INET, "reject_fwd") in chains
        and (INET, "reject_out") in chains
    )
    assert (INET, "reject_pre") not in chains and (INET, "pre") not in chains
    # the bridge answers the frame itself: no ARP with the gateway needed
    assert by_name["reject_arp"].elements == frozenset()


def test_no_reject_rule_no_reject_chain() -> None:
    rs = compiled(doc(rules=RULES))
    assert not [c for c in rs.chains if "rej" in c.name]


def test_a_compile_cache_never_changes_the_result_and_follows_a_flavour_switch() -> None:
    cache = CompileCache()
    versions = [
        (doc(rules=RULES), NATIVE),
        (doc(rules=[*RULES[:1], {**RULES[1], "ports": [80, 443]}, *RULES[2:]]), NATIVE),
        (doc(rules=[*RULES[:1], {**RULES[1], "ports": [80, 443]}, *RULES[2:]]), Flavour.BR_NETFILTER),
        (doc(rules=RULES), Flavour.BR_NETFILTER),
        (doc(rules=RULES), NATIVE),
        (doc(rules=[*RULES, *REJECTS]), NATIVE),
    ]
    for data, flavour in versions:
        resolved = resolve_policy(parse_policy(data))
        assert compile_ruleset(resolved, cache, flavour=flavour) == compile_ruleset(resolved, flavour=flavour)
        # same input, same output, byte for byte
        assert compile_ruleset(resolved, flavour=flavour).rules == compiled(data, flavour).rules


def test_a_flavour_switch_is_one_plan_that_reaches_the_other_flavour_exactly() -> None:
    """What the daemon sends when the flavour changes: one batch (the firewall sends a plan atomically)."""
    for before, after in ((Flavour.BR_NETFILTER, NATIVE), (NATIVE, Flavour.BR_NETFILTER)):
        old, new = (
            compiled(doc(rules=[*RULES, *REJECTS]), before),
            compiled(doc(rules=[*RULES, *REJECTS]), after),
        )
        handles = {(r.table, r.chain, r.comment): i + 1 for i, r in enumerate(old.rules)}
        plan = plan_changes(new, Actual(old, handles))
        kernel = FakeKernel(old, handles)
        kernel.apply(plan.commands)
        got = kernel.ruleset()
        assert set(got.chains) == set(new.chains) and set(got.sets) == set(new.sets)
        assert got.chain_rules() == new.chain_rules()
