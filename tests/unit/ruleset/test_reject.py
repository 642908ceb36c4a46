"""Reject chains: the netdev ones for VM senders, the inet forward/output ones for every other sender."""

from __future__ import annotations

from typing import Any

from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset.build import INET, NETDEV
from hyperfence.ruleset.compile import compile_ruleset, vm_sid
from hyperfence.ruleset.ir import JSON, Rule, Ruleset, TableId
from hyperfence.ruleset.reject import FORWARD_CHAIN, INET_REJECT_MAP, OUTPUT_CHAIN
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
RETURN: JSON = {"return": None}

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


def test_ingress_rejects_from_outside_and_host_get_forward_and_output_chains() -> None:
    rs = compiled(doc(rules=INGRESS_REJECTS))
    chains = rs.chain_by_key()
    fwd, out = chains[(INET, FORWARD_CHAIN)], chains[(INET, OUTPUT_CHAIN)]
    assert (fwd.type, fwd.hook, fwd.priority, fwd.policy) == ("filter", "forward", 0, "accept")
    assert (out.type, out.hook, out.priority, out.policy) == ("filter", "output", 0, "accept")
    dispatch = [{"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@ireject_dst"}}]
    established = [
        {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x200000]}, "right": 0x200000}},
        RETURN,
    ]
    # Bridged packets (br_netfilter) leave the forward chain by the first, single compare.
    assert [(r.comment, r.statements()) for r in rules_of(rs, INET, FORWARD_CHAIN)] == [
        (
            "sys:bridged",
            [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "br0"}}, RETURN],
        ),
        ("sys:est", established),
        ("sys:dispatch", dispatch),
    ]
    assert [(r.comment, r.statements()) for r in rules_of(rs, INET, OUTPUT_CHAIN)] == [
        ("sys:est", established),
        ("sys:dispatch", dispatch),
    ]
    # Only the receiver's own address is dispatched: not the host's (10.77.0.1), not vm1 (no ingress reject).
    rej_in = f"{vm_sid('vm2')}_rej_in"
    assert rs.set_by_key()[(INET, INET_REJECT_MAP)].elements == frozenset(
        {f'["10.77.0.12",{{"goto":{{"target":"{rej_in}"}}}}]'}
    )


def test_receiver_chain_repeats_ingress_entries_in_order_and_never_accepts() -> None:
    rs = compiled(doc(rules=INGRESS_REJECTS))
    rules = rules_of(rs, INET, f"{vm_sid('vm2')}_rej_in")
    assert [r.comment for r in rules] == [
        "rule:web#1",  # priority 5: an allow only returns
        "rule:quiet#1",  # a deny too
        "rule:ssh-out#1",
        "rule:ssh-out#1:rest",
        "rule:ssh-out#2",
        "rule:ssh-out#2:rest",
        "rule:dns-host#1",
        "rule:dns-host#1:rest",
    ]
    by_comment = {r.comment: r.statements() for r in rules}
    assert by_comment["rule:web#1"][-1] == RETURN and by_comment["rule:quiet#1"][-1] == RETURN
    ssh = by_comment["rule:ssh-out#1"]
    assert ssh[-1] == RESET and SYN_ONLY in ssh  # a reset answers a new connection only
    assert by_comment["rule:ssh-out#2"][-1] == PROHIBITED  # "any": ICMP administratively prohibited
    assert by_comment["rule:dns-host#1"][-1] == PORT_UNREACHABLE
    assert all({"accept": None} not in r.statements() for r in rules)
    # Peers are matched against address sets of the inet table ("i" prefix): outside and the gateway.
    out_name, out_elems = peer_set(rules[2], rs)
    host_name, host_elems = peer_set(rules[6], rs)
    assert out_name.startswith("is_") and host_name.startswith("is_")
    assert host_elems == frozenset({'"10.77.0.1"'})
    assert '{"range":["10.77.4.0","126.255.255.255"]}' in out_elems  # loopback, multicast: not outside
    # The VM senders keep their netdev chains, with the same rule ids.
    netdev = [r.comment for r in rules_of(rs, NETDEV, f"{vm_sid('vm2')}_rej_in")]
    assert netdev == [r.comment for r in rules]


def test_every_managed_bridge_is_skipped_by_the_forward_chain() -> None:
    data = doc(rules=INGRESS_REJECTS)
    data["networks"] = [
        *data["networks"],
        {"name": "lab2", "bridge": "br1", "subnet": "10.88.0.0/24", "gateway": "10.88.0.1"},
    ]
    data["vms"] = [{**vm, "network": "lab"} for vm in data["vms"]]
    first = rules_of(compiled(data), INET, FORWARD_CHAIN)[0]
    assert first.comment == "sys:bridged"
    assert first.statements()[0]["match"]["right"] == {"set": ["br0", "br1"]}


def test_without_an_ingress_reject_the_inet_table_gets_no_new_hook() -> None:
    egress_only = [
        {"id": "no-out", "from": "vm:vm1", "to": "outside", "services": ["tcp/25"], "action": "reject"}
    ]
    for rules in ([], egress_only, [{**r, "action": "deny"} for r in INGRESS_REJECTS]):
        rs = compiled(doc(rules=rules))
        inet = {c.name: c.hook for c in rs.chains if c.table == INET and c.hook}
        assert inet == {"pre": "prerouting", "out": "output"}  # the conntrack marker only
        assert [s.name for s in rs.sets if s.table == INET] == ["cap_vms"]  # (the connection caps)
    # the control: the egress reject is compiled (on the VM's own port)
    rs = compiled(doc(rules=egress_only))
    assert any(
        r.comment == "rule:no-out#1" and RESET in r.statements() for r in rs.rules if r.table == NETDEV
    )
