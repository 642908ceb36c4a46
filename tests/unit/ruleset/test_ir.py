"""The IR (ruleset/ir.py): canonical JSON text makes "the kernel holds what we applied" a string comparison;
a ruleset's lookups group its rules by chain, in order, and its sets and chains by key."""

from __future__ import annotations

import json
import weakref

from hyperfence.ruleset.ir import Chain, Delta, NftSet, Rule, Ruleset, TableId, canonical

T = TableId("bridge", "hyperfence")


def test_canonical_text_sorts_keys_drops_spaces_and_zeroes_counters() -> None:
    a = {"b": 1, "a": [{"counter": {"packets": 5, "bytes": 900}}, {"accept": None}]}
    b = {"a": [{"counter": {"bytes": 0, "packets": 0}}, {"accept": None}], "b": 1}
    assert canonical(a) == canonical(b) == '{"a":[{"counter":{"bytes":0,"packets":0}},{"accept":null}],"b":1}'
    assert canonical(a) != canonical({**b, "b": 2})


def test_only_a_counter_statement_is_zeroed() -> None:
    """A mapping that merely has a `counter` key among others, or a counter that is not a mapping (a named
    counter's reference), keeps its values."""
    mixed = {"counter": {"packets": 5}, "other": 1}
    assert json.loads(canonical(mixed)) == mixed
    named = {"counter": "c_vm1"}
    assert json.loads(canonical(named)) == named


def test_a_chain_is_base_when_it_has_a_hook_and_its_device_is_not_compared() -> None:
    base = Chain(T, "forward", type="filter", hook="forward", priority=0, policy="accept")
    assert base.is_base and not Chain(T, "vm_a_in").is_base
    a = Chain(TableId("netdev", "hf"), "in_p1", "filter", "ingress", 0, device="p1")
    assert a == Chain(TableId("netdev", "hf"), "in_p1", "filter", "ingress", 0)  # nft 1.0.6 lists no device


def test_a_set_s_kind_and_the_shape_that_cannot_change_in_place() -> None:
    plain = NftSet(T, "peers", "ipv4_addr", ("interval",), elements=frozenset({'"10.0.0.1"'}))
    vmap = NftSet(T, "in_ports", "ifname", map_type="verdict")
    assert plain.kind == "set" and vmap.kind == "map"
    assert plain.shape() == ("ipv4_addr", ("interval",), None)
    assert plain.shape() == NftSet(T, "peers", "ipv4_addr", ("interval",)).shape()  # elements change in place
    assert plain.shape() != NftSet(T, "peers", "ipv4_addr").shape()


def test_a_rule_s_statements_come_back_from_its_text() -> None:
    stmts = [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "p"}}, {"accept": None}]
    r = Rule(T, "vm_a_out", "rule:x#1", canonical(stmts))
    assert r.statements() == stmts


def test_lookups_group_rules_by_chain_in_order_including_empty_chains() -> None:
    a, b, c = Chain(T, "a"), Chain(T, "b"), Chain(T, "c")
    r1, r2, r3 = (Rule(T, ch, f"r{i}", "[]") for i, ch in enumerate(["a", "b", "a"]))
    s = NftSet(T, "peers", "ipv4_addr")
    rs = Ruleset((T,), (a, b, c), (s,), (r1, r2, r3))
    assert rs.chain_rules() == {(T, "a"): [r1, r3], (T, "b"): [r2], (T, "c"): []}
    assert rs.chain_by_key() == {(T, "a"): a, (T, "b"): b, (T, "c"): c}
    assert rs.set_by_key() == {(T, "peers"): s}
    assert rs.chain_rules() is rs.chain_rules()  # computed once
    assert rs.counts() == {"tables": 1, "chains": 3, "sets": 1, "rules": 3, "elements": 0}


def test_presets_replace_the_computed_lookups() -> None:
    rs = Ruleset((T,), (Chain(T, "a"),), (), ())
    grouped = {(T, "a"): [Rule(T, "a", "r", "[]")]}
    rs.preset_chain_rules(grouped)
    assert rs.chain_rules() is grouped
    chains = {(T, "a"): Chain(T, "a")}
    rs.preset_lookups(chains, None)
    assert rs.chain_by_key() is chains and rs.set_by_key() == {}


def test_rulesets_compare_by_content_not_by_their_delta() -> None:
    one = Ruleset((T,), (Chain(T, "a"),), (), (Rule(T, "a", "r", "[]"),))
    same = Ruleset((T,), (Chain(T, "a"),), (), (Rule(T, "a", "r", "[]"),))
    assert one == same
    assert one == Ruleset(
        same.tables, same.chains, (), same.rules, delta=Delta(weakref.ref(same), frozenset(), frozenset())
    )
    assert one != Ruleset((T,), (Chain(T, "a"),), (), (Rule(T, "a", "r", '[{"accept":null}]'),))
    assert TableId("bridge", "hyperfence") == ("bridge", "hyperfence")  # a named tuple: cheap to hash
