"""Counters per rule for people (`ruleset stats`)."""

from __future__ import annotations

from hyperfence.cli.render import statement_text, stats_rows
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.compile import BRIDGE, INET


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


def test_the_cap_rules_read_as_nft_writes_them() -> None:
    assert statement_text(x.ct_count_over(200)) == "ct count over 200"
    assert statement_text(x.ct_unconfirmed()) == "ct status ! 8"
    assert statement_text(x.goto("v1_cap_drop")) == "goto v1_cap_drop"
