from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hyperfence.errors import InvalidInputError
from hyperfence.model.kernel import Flavour
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.compile import BRIDGE, INET, compile_ruleset, vm_sid
from hyperfence.ruleset.ir import Ruleset
from hyperfence.ruleset.plan import plan_changes
from hyperfence.ruleset.readback import Actual
from tests.unit.policy.test_parse import doc
from tests.unit.ruleset.fake_kernel import FakeKernel


def compiled(data: dict[str, Any]) -> Ruleset:
    return compile_ruleset(resolve_policy(parse_policy(data)))


RULES = [
    {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"},
    {
        "id": "web",
        "from": ["vm:vm1", "10.9.0.0/24"],
        "to": "label:role=web",
        "protocol": "tcp",
        "ports": [80],
        "log": True,
    },
    {"id": "dhcp", "from": "vms", "to": "host", "services": ["dhcp"]},
]


def test_compile_is_deterministic_and_independent_of_vm_order() -> None:
    a = compiled(doc(rules=RULES))
    shuffled = doc(rules=RULES)
    shuffled["vms"] = list(reversed(shuffled["vms"]))
    assert a == compiled(doc(rules=RULES)) == compiled(shuffled)


def test_every_rule_has_a_unique_id_per_chain_and_a_counter() -> None:
    rs = compiled(doc(rules=RULES))
    for (_, chain), rules in rs.chain_rules().items():
        comments = [r.comment for r in rules]
        assert len(comments) == len(set(comments)), chain
        for r in rules:
            # log rules, dispatch and the per-packet anti-spoofing accepts (the hot path) carry no counter
            if r.comment.endswith(":log") or r.comment in (
                "sys:dispatch",
                "sys:dhcp-dispatch",  # a DHCP request to the VM's chaddr guard, which counts
                "sys:vlan-tagged",  # a tagged frame to vlan_out / vlan_in, which count the drop
                "sys:ct-cap-out",  # dispatch to the VM's connection cap
                "sys:ct-cap-in",
                "sys:ct-count",  # the cap's decision is counted in sys:ct-cap
                "sys:ct-clear",
                "sys:ct-mark",
                "sys:est",
                "sys:ident-ip",
                "sys:ident-arp",
                "sys:dhcp-discover",
            ):
                continue
            assert any("counter" in s for s in r.statements()), (chain, r.comment)


def test_protected_vm_with_no_rules_ends_in_default_deny_both_ways() -> None:
    rs = compiled(doc())
    sid = vm_sid("vm1")
    rules = rs.chain_rules()
    for chain in (f"{sid}_out", f"{sid}_in"):
        last = rules[(BRIDGE, chain)][-1]
        assert last.comment == "sys:default-deny" and {"drop": None} in last.statements()
    guard = [r.comment for r in rules[(BRIDGE, f"{sid}_guard")]]
    assert guard == ["sys:spoof:log", "sys:spoof"]  # identity is checked by one lookup in the base chain
    dhcp = next(s for s in rs.sets if s.name == "dhcp_clients")
    assert dhcp.elements == frozenset()  # no DHCP discover without a rule


def test_a_tagged_frame_is_dropped_first_from_a_vm_and_never_reaches_one_from_an_uplink() -> None:
    tagged = x.vlan_tagged()
    rules = compiled(doc()).chain_rules()
    first = rules[(BRIDGE, "guard")][0]
    # before the identity accepts, which would judge the IP inside the tag
    assert first.comment == "sys:vlan-tagged"
    assert first.statements() == [tagged, x.goto("vlan_out")]
    assert [r.comment for r in rules[(BRIDGE, "vlan_out")]] == ["sys:vlan:log", "sys:vlan"]
    assert not any(tagged in r.statements() for r in rules[(BRIDGE, "ingress")])  # no uplink: no cost
    assert (BRIDGE, "vlan_in") not in rules
    trunk = doc()
    trunk["networks"] = [{**trunk["networks"][0], "uplinks": ["eno1", "eno2"]}]
    rules = compile_ruleset(resolve_policy(parse_policy(trunk))).chain_rules()
    uplinks = {"set": ["eno1", "eno2"]}
    assert rules[(BRIDGE, "guard")][0].statements() == [
        tagged,
        x.match(x.meta("iifname"), uplinks, op="!="),  # a trunk may send tagged frames
        x.goto("vlan_out"),
    ]
    ingress = rules[(BRIDGE, "ingress")]
    assert [r.comment for r in ingress[:2]] == ["sys:vlan-tagged", "sys:est"]
    assert ingress[0].statements() == [
        tagged,
        x.match(x.meta("oifname"), uplinks, op="!="),  # trunk to trunk passes
        x.goto("vlan_in"),
    ]
    assert [r.comment for r in rules[(BRIDGE, "vlan_in")]] == ["sys:vlan:log", "sys:vlan"]


def test_addresses_live_in_sets_not_rules() -> None:
    many = [f"10.{i // 250}.{i % 250}.1" for i in range(5000)]
    small = compiled(
        doc(
            ipsets={"big": ["10.200.0.1"]},
            rules=[{"from": "ipset:big", "to": "vm:vm1", "protocol": "tcp", "ports": [22]}],
        )
    )
    big = compiled(
        doc(
            ipsets={"big": many},
            rules=[{"from": "ipset:big", "to": "vm:vm1", "protocol": "tcp", "ports": [22]}],
        )
    )
    assert len(big.rules) == len(small.rules)
    assert big.counts()["elements"] - small.counts()["elements"] == 4999


def test_plan_against_its_own_state_is_empty_and_one_change_is_small() -> None:
    rs = compiled(doc(rules=RULES))
    assert plan_changes(
        rs, Actual(rs, {(r.table, r.chain, r.comment): i for i, r in enumerate(rs.rules)})
    ).empty
    first = plan_changes(rs, Actual.empty())
    assert first.summary["rules+"] == len(rs.rules)
    changed = compiled(doc(rules=[*RULES[:1], {**RULES[1], "ports": [80, 443]}, *RULES[2:]]))
    plan = plan_changes(
        changed, Actual(rs, {(r.table, r.chain, r.comment): i for i, r in enumerate(rs.rules)})
    )
    # only vm1's egress and vm1's ingress (role=web) chains change, from the changed rule to their end
    assert set(plan.summary) == {"rules~"}
    assert {c for _, c in plan.touched_chains} == {f"{vm_sid('vm1')}_out", f"{vm_sid('vm1')}_in"}


rule_strategy = st.fixed_dictionaries(
    {
        "from": st.sampled_from(
            ["vm:vm1", "vm:vm2", "vms", "any", "outside", "host", "10.1.0.0/16", "label:role=web"]
        ),
        "to": st.sampled_from(["vm:vm1", "vm:vm2", "vms", "any", "host", "10.77.0.0/24"]),
        "services": st.lists(
            st.sampled_from(
                [
                    "tcp/80",
                    "udp/53",
                    "icmp",
                    "icmp/8",
                    "arp",
                    "any",
                    "proto/47",
                    "tcp/1000-2000",
                    "dhcp",
                    "dhcp-server",
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        ),
        "action": st.sampled_from(["allow", "deny", "reject"]),
        "priority": st.integers(0, 3),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    before=st.lists(rule_strategy, max_size=5), after=st.lists(rule_strategy, max_size=5), seed=st.integers()
)
def test_plan_reaches_desired_from_any_previous_state(
    before: list[dict[str, Any]], after: list[dict[str, Any]], seed: int
) -> None:
    """Apply the plan to a simulated kernel: it must end exactly at the desired ruleset (and, like the
    kernel, it refuses a rule that looks up a missing set and the deletion of a set still looked up)."""
    try:
        old = compiled(doc(rules=[{"id": f"a{i}", **r} for i, r in enumerate(before)]))
        new = compiled(
            doc(rules=[{"id": f"b{i}" if seed % 2 else f"a{i}", **r} for i, r in enumerate(after)])
        )
    except InvalidInputError:  # e.g. a reject of arp or dhcp
        assume(False)
        raise
    handles = {(r.table, r.chain, r.comment): i + 1 for i, r in enumerate(old.rules)}
    plan = plan_changes(new, Actual(old, handles))
    kernel = FakeKernel(old, handles)
    kernel.apply(plan.commands)
    got = kernel.ruleset()
    assert set(got.tables) == set(new.tables)
    assert set(got.chains) == set(new.chains)
    assert set(got.sets) == set(new.sets)
    assert got.chain_rules() == new.chain_rules()


def test_a_compile_cache_never_changes_the_result() -> None:
    from hyperfence.ruleset.compile import CompileCache

    cache = CompileCache()
    versions = [
        doc(rules=RULES),
        doc(rules=[*RULES[:1], {**RULES[1], "ports": [80, 443]}, *RULES[2:]]),
        doc(
            ipsets={"x": ["10.9.0.0/24"]}, rules=[*RULES, {"from": "ipset:x", "to": "vms", "protocol": "udp"}]
        ),
        doc(
            ipsets={"x": ["10.9.1.0/24"]}, rules=[*RULES, {"from": "ipset:x", "to": "vms", "protocol": "udp"}]
        ),
        doc(rules=RULES),
    ]
    for v in versions:
        resolved = resolve_policy(parse_policy(v))
        assert compile_ruleset(resolved, cache) == compile_ruleset(resolved)
    assert len(cache.vms) == 2  # only the latest policy's VMs are kept


def test_every_vms_new_connections_pass_its_cap_both_ways() -> None:
    """After the conntrack marker in `pre`: the first packet of a new connection (not confirmed yet) from a
    VM (on a managed bridge, by source address) and towards it (by destination address) reaches its own
    `ct count` rule."""
    rs = compiled(doc(rules=RULES, limits=[{"id": "small", "vms": "vm:vm1", "connections": 200}]))
    sid1, sid2 = (vm_sid(v.id) for v in parse_policy(doc()).vms)
    chains = rs.chain_rules()
    pre = chains[(INET, "pre")]
    assert [r.comment for r in pre] == ["sys:ct-mark", "sys:ct-clear", "sys:ct-cap-out", "sys:ct-cap-in"]
    new = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": 8}}  # ct status ! confirmed
    bridge = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}
    dispatch = {"vmap": {"key": {"payload": {"protocol": "ip", "field": "saddr"}}, "data": "@cap_vms"}}
    assert pre[2].statements() == [new, bridge, dispatch]
    assert pre[3].statements() == [
        new,
        {"vmap": {**dispatch["vmap"], "key": {"payload": {"protocol": "ip", "field": "daddr"}}}},
    ]
    (cap_map,) = [s for s in rs.sets if s.name == "cap_vms"]
    assert (cap_map.table, cap_map.key_type, cap_map.map_type) == (INET, "ipv4_addr", "verdict")
    assert {json.loads(e)[0]: json.loads(e)[1]["jump"]["target"] for e in cap_map.elements} == {
        "10.77.0.11": f"{sid1}_cap",
        "10.77.0.12": f"{sid2}_cap",
    }
    for sid, cap in ((sid1, 200), (sid2, 16_384)):
        (count,) = chains[(INET, f"{sid}_cap")]
        assert count.statements() == [
            {"ct count": {"val": cap, "inv": True}},
            {"goto": {"target": f"{sid}_cap_drop"}},
        ]
        out_log, in_log, drop = chains[(INET, f"{sid}_cap_drop")]
        assert out_log.comment == "sys:ct-cap:out:log" and in_log.comment == "sys:ct-cap:in:log"
        assert out_log.statements()[0]["match"]["left"]["payload"]["field"] == "saddr"
        assert out_log.statements()[-1]["log"]["prefix"] == f"hf:{sid}:out:cap:sys:ct-cap"
        assert in_log.statements()[0]["match"]["left"]["payload"]["field"] == "daddr"
        assert in_log.statements()[-1]["log"]["prefix"] == f"hf:{sid}:in:cap:sys:ct-cap"
        assert {"limit": {"rate": 10, "burst": 20, "per": "second"}} in out_log.statements()
        assert (drop.comment, drop.statements()) == ("sys:ct-cap", [x.COUNTER, x.DROP])


def test_a_cap_that_does_not_log_only_counts() -> None:
    rs = compiled(doc(limits=[{"vms": "vm:vm1", "connections": 10, "log": False}]))
    sid = vm_sid(parse_policy(doc()).vms[0].id)
    assert [r.comment for r in rs.chain_rules()[(INET, f"{sid}_cap_drop")]] == ["sys:ct-cap"]


def test_an_arp_rule_is_rendered_both_ways_in_each_vms_chains() -> None:
    """vm1 asks vm2 and answers it (`arp daddr ip` vm2 out), hears vm2's requests and replies (`arp saddr
    ip` vm2, `arp daddr ip` its own address, in); vm2 the same with vm1."""
    rs = compiled(doc(rules=[{"id": "a", "from": "vm:vm1", "to": "vm:vm2", "services": ["arp"]}]))
    chains = rs.chain_rules()

    def arp_rule(vm: str, side: str, comment: str) -> list[Any]:
        (rule,) = [r for r in chains[(BRIDGE, f"{vm_sid(vm)}_{side}")] if r.comment == comment]
        return rule.statements()

    for vm, own, mine, pair in (("vm1", "10.77.0.11", "out", "in"), ("vm2", "10.77.0.12", "in", "out")):
        for side, comment in ((mine, "rule:a#1"), (pair, "rule:a#1:pair")):
            st = arp_rule(vm, side, comment)
            fields = {s["match"]["left"]["payload"]["field"]: s["match"]["right"] for s in st if "match" in s}
            if side == "out":
                assert set(fields) == {"daddr ip"} and fields["daddr ip"].startswith("@s_")
            else:
                assert fields["saddr ip"].startswith("@s_") and fields["daddr ip"] == own
            assert st[-1] == x.ACCEPT


LEARNER = {"name": "vm3", "id": "vm3", "port": "vp3", "mac": "02:77:00:00:00:0d"}
DHCP_FROM_HOST = {"id": "lease", "from": "vm:vm3", "to": "host", "services": ["dhcp"]}


def _learning_doc(*rules: dict[str, Any], ips: list[str] | None = None) -> dict[str, Any]:
    data = doc(rules=list(rules))
    data["vms"] = [*data["vms"], {**LEARNER, **({"ips": ips} if ips else {})}]
    return data


def test_a_learning_vm_without_an_address_may_only_ask_for_a_lease() -> None:
    rs = compiled(
        _learning_doc(DHCP_FROM_HOST, {"id": "ping", "from": "vm:vm3", "to": "vm:vm1", "protocol": "icmp"})
    )
    sets = {s.name: s for s in rs.sets}
    assert not any("vp3" in e for e in sets["ident_ip"].elements | sets["ident_arp"].elements)
    assert any("vp3" in e for e in sets["dhcp_clients"].elements)
    sid = vm_sid("vm3")
    rules = rs.chain_rules()
    # no rule that needs its own address (ARP to it, the cap's log line)
    assert not any('"daddr ip"' in r.expr and "arp" in r.expr for r in rules[(BRIDGE, f"{sid}_in")])
    # the server's answer is logged to the learn group right before the rule that accepts it
    comments = [r.comment for r in rules[(BRIDGE, f"{sid}_in")]]
    at = comments.index("rule:lease#1:pair")
    assert comments[at - 1] == "rule:lease#1:pair:learn"
    learn = rules[(BRIDGE, f"{sid}_in")][at - 1]
    assert {"log": {"group": 8, "prefix": f"hf:{sid}:in:learn:rule:lease#1:pair"}} in learn.statements()
    # established answers (renewals) and what it sends to a server's port: dispatched before the shortcut
    assert [r.comment for r in rules[(BRIDGE, "ingress")]].index("sys:dhcp-learn") < [
        r.comment for r in rules[(BRIDGE, "ingress")]
    ].index("sys:est")
    assert [r.comment for r in rules[(BRIDGE, "egress")]].index("sys:dhcp-learn") < [
        r.comment for r in rules[(BRIDGE, "egress")]
    ].index("sys:est")
    assert [r.comment for r in rules[(BRIDGE, f"{sid}_lrn_in")]] == ["rule:lease#1:pair:learn"]
    assert [r.comment for r in rules[(BRIDGE, f"{sid}_lrn_out")]] == ["sys:dhcp-learn"]


def test_learning_rules_exist_only_for_learning_vms_with_a_dhcp_rule() -> None:
    for data in (_learning_doc(DHCP_FROM_HOST, ips=["10.77.0.13"]), _learning_doc()):
        rs = compiled(data)
        assert not any("learn" in r.comment for r in rs.rules)
        assert not any(s.name.startswith("learn_") for s in rs.sets)


def test_a_denied_server_teaches_nothing() -> None:
    """A deny before the accept: the learn log sits right before the accept, after the deny."""
    deny = {"id": "nohost", "from": "host", "to": "vm:vm3", "action": "deny", "priority": 10}
    rs = compiled(_learning_doc(DHCP_FROM_HOST, deny))
    comments = [r.comment for r in rs.chain_rules()[(BRIDGE, f"{vm_sid('vm3')}_in")]]
    assert comments.index("rule:nohost#1") < comments.index("rule:lease#1:pair:learn")


def test_every_dhcp_request_a_vm_sends_must_name_its_own_mac_as_the_client_in_both_flavours() -> None:
    """The chaddr guard: before any identity accept in the guard, UDP 68 -> 67 from a VM's port jumps to
    `<vm>_dhcp`, which returns only for BOOTP htype 1 / hlen 6 with chaddr = the VM's MAC, else logs and
    drops (`sys:dhcp-chaddr`)."""
    for flavour in Flavour:
        rs = compile_ruleset(resolve_policy(parse_policy(doc(rules=RULES))), flavour=flavour)
        rules = rs.chain_rules()
        guard = [r.comment for r in rules[(BRIDGE, "guard")]]
        assert guard.index("sys:dhcp-dispatch") < guard.index("sys:ident-ip"), flavour
        dispatch = rules[(BRIDGE, "guard")][guard.index("sys:dhcp-dispatch")].statements()
        assert x.match(x.payload("udp", "sport"), 68) in dispatch
        assert x.match(x.payload("udp", "dport"), 67) in dispatch
        ports = next(s for s in rs.sets if s.name == "dhcp_ports")
        sid = vm_sid("vm1")
        assert json.dumps(["vp1", {"jump": {"target": f"{sid}_dhcp"}}]) in {
            json.dumps(json.loads(e)) for e in ports.elements
        }
        chain = rules[(BRIDGE, f"{sid}_dhcp")]
        assert [r.comment for r in chain] == ["sys:dhcp-chaddr-own", "sys:dhcp-chaddr:log", "sys:dhcp-chaddr"]
        own = chain[0].statements()
        chaddr = {"payload": {"base": "th", "offset": 288, "len": 48}}
        assert x.match(chaddr, 0x02770000000B) in own and x.RETURN in own
        assert x.match({"payload": {"base": "th", "offset": 72, "len": 16}}, 0x0106) in own
        assert x.DROP in chain[-1].statements()
