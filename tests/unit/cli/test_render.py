"""Counters per rule for people (`ruleset stats`)."""

from __future__ import annotations

import copy

from hyperfence.cli.render import ruleset_text, statement_text, stats_rows
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.compile import BRIDGE, INET, compile_ruleset
from tests.unit.policy.test_parse import doc


def test_stats_sum_policy_rules_and_show_the_connection_caps_drops() -> None:
    counters = {
        (BRIDGE, "v1_out", "rule:web#1"): (3, 300),
        (BRIDGE, "v1_out", "rule:web#2"): (1, 100),
        (BRIDGE, "v1_out", "rule:web#1:log"): (9, 900),  # a log rule: never a decision
        (INET, "v1_cap_drop", "sys:ct-cap"): (40, 4000),
        (INET, "v2_cap_drop", "sys:ct-cap"): (2, 200),
        (INET, "v1_rej_in", "rule:web#1"): (5, 500),  # reject answers: counted where the bridge decides
    }
    assert stats_rows(counters, {"v1": "vm1", "v2": "vm2"}, by_vm=False) == [
        {"rule": "sys:ct-cap", "vm": "", "direction": "both", "packets": 42, "bytes": 4200},
        {"rule": "web", "vm": "", "direction": "egress", "packets": 4, "bytes": 400},
    ]
    by_vm = stats_rows(counters, {"v1": "vm1", "v2": "vm2"}, by_vm=True)
    assert [(r["rule"], r["vm"], r["packets"]) for r in by_vm] == [
        ("sys:ct-cap", "vm1", 40),
        ("sys:ct-cap", "vm2", 2),
        ("web", "vm1", 4),
    ]


def test_stats_count_bridge_native_cap_drops_of_both_tables_as_the_caps() -> None:
    counters = {
        (BRIDGE, "v1_cap_drop", "sys:ct-cap"): (40, 4000),
        (INET, "v1_cap_drop", "sys:ct-cap"): (2, 200),
    }
    assert stats_rows(counters, {"v1": "vm1"}, by_vm=True) == [
        {"rule": "sys:ct-cap", "vm": "vm1", "direction": "both", "packets": 42, "bytes": 4200},
    ]


def test_the_cap_rules_read_as_nft_writes_them() -> None:
    assert statement_text(x.ct_count_over(200)) == "ct count over 200"
    assert statement_text(x.ct_unconfirmed()) == "ct status ! 8"
    assert statement_text(x.goto("v1_cap_drop")) == "goto v1_cap_drop"


def test_every_rule_the_compiler_writes_renders_as_text() -> None:
    """`ruleset show` on a policy that uses every feature (uplinks and their VLAN guard, rejects, limits,
    caps, ARP, DHCP, logging): no statement the compiler writes may crash the renderer (a raw ethertype
    payload did: `ruleset show` ended in a KeyError traceback)."""
    data = copy.deepcopy(
        doc(
            rules=[
                {"id": "web", "from": "any", "to": "vm:vm1", "services": ["tcp/80", "icmp/8/0"], "log": True},
                {"id": "rej", "from": "vm:vm1", "to": "outside", "action": "reject"},
                {"id": "lease", "from": "vms", "to": "host", "services": ["dhcp", "arp"]},
            ],
        )
    )  # (doc's networks are shared between tests: changed here only in a copy)
    data["networks"][0]["uplinks"] = ["eth9"]
    data["limits"] = [{"id": "l", "vms": "vms", "direction": "in", "new_flows": 100, "burst": 200}]
    text = ruleset_text(compile_ruleset(resolve_policy(parse_policy(data))))
    assert "@ll,96,16" in text  # the ethertype of a VLAN tag, as nft writes a raw payload
    assert 'comment "rule:rej#1:tcp"' in text


def test_a_raw_payload_reads_as_nft_writes_it() -> None:
    """The guard's VLAN check matches the ethertype as raw bytes 12-13 of the frame (`@ll,96,16`)."""
    assert statement_text(x.vlan_tagged()) == "@ll,96,16 { 33024, 34984 }"


def test_every_statement_of_a_compiled_policy_renders() -> None:
    """`ruleset show --desired` of a policy that uses every part of the compiler: no statement is left
    unrendered (a raw payload once ended `ruleset show` in a KeyError)."""
    policy = parse_policy(doc(rules=[{"from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "ports": [22]}]))
    text = ruleset_text(compile_ruleset(resolve_policy(policy)))
    assert "@ll,96,16 { 33024, 34984 } goto vlan_out" in text and "tcp dport 22 " in text
