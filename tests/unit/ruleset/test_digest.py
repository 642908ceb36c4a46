"""ruleset/digest.py: equal rulesets have equal digests, different ones differ, and the digest of an
incremental compile, taken from its base's, is exactly the whole digest."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import Resolved, resolve_policy, resolve_update
from hyperfence.ruleset.compile import CompileCache, compile_ruleset
from hyperfence.ruleset.digest import digest, digest_after
from hyperfence.ruleset.ir import Ruleset
from tests.unit.policy.test_parse import doc
from tests.unit.policy.test_resolve import _unique, rule_st

BASE = [
    {"id": "a", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]},
    {"id": "b", "from": "vm:vm2", "to": "vm:vm1", "services": ["tcp/22"]},
]


def _compile(rules: list[dict[str, object]]) -> Ruleset:
    return compile_ruleset(resolve_policy(parse_policy(doc(rules=rules))))


def test_equal_rulesets_have_equal_digests_whatever_their_order_in_memory() -> None:
    one, two = _compile(BASE), _compile(BASE)
    assert one is not two
    assert digest(one) == digest(two)
    shuffled = dataclasses.replace(one, sets=tuple(reversed(one.sets)), chains=tuple(reversed(one.chains)))
    assert digest(shuffled) == digest(one)  # objects are keyed by name: their order in the tuple is not state


def test_any_change_of_content_or_rule_order_changes_the_digest() -> None:
    rs = _compile(BASE)
    changed = _compile([{**BASE[0], "services": ["tcp/81"]}, BASE[1]])
    assert digest(changed) != digest(rs)
    # the same rules of one chain in another order are another ruleset (the first match wins)
    key, rules = next((k, v) for k, v in rs.chain_rules().items() if len(v) > 2)
    swapped = [r for r in rs.rules if (r.table, r.chain) != key]
    swapped += [rules[1], rules[0], *rules[2:]]
    assert digest(dataclasses.replace(rs, rules=tuple(swapped))) != digest(rs)
    # one set element fewer
    s = next(s for s in rs.sets if s.elements)
    fewer = dataclasses.replace(s, elements=frozenset(sorted(s.elements)[1:]))
    assert digest(dataclasses.replace(rs, sets=tuple(fewer if x is s else x for x in rs.sets))) != digest(rs)


@settings(max_examples=60, deadline=None)
@given(versions=st.lists(st.lists(rule_st, max_size=4), min_size=2, max_size=6))
def test_the_digest_after_an_incremental_compile_is_the_whole_digest(
    versions: list[list[dict[str, object]]],
) -> None:
    cache = CompileCache()
    prev: Resolved | None = None
    base: Ruleset | None = None
    base_digest = 0
    for rules in versions:
        policy = parse_policy(doc(rules=_unique(rules)))
        resolved = (resolve_update(prev, policy) if prev is not None else None) or resolve_policy(policy)
        rs = compile_ruleset(resolved, cache)
        value = digest(rs) if base is None else digest_after(rs, base, base_digest)
        assert value == digest(rs)
        prev, base, base_digest = resolved, rs, value


def test_a_one_rule_change_is_digested_from_its_base() -> None:
    cache = CompileCache()
    first = compile_ruleset(resolve_policy(parse_policy(doc(rules=BASE))), cache)
    second = compile_ruleset(
        resolve_policy(parse_policy(doc(rules=[{**BASE[0], "services": ["tcp/81"]}, BASE[1]]))), cache
    )
    assert second.delta is not None and second.delta.base() is first
    assert digest_after(second, first, digest(first)) == digest(second)
    # a wrong base digest shows: the result is computed from it, not from scratch
    assert digest_after(second, first, digest(first) + 1) != digest(second)
    # not compiled from `first`: the whole digest
    other = _compile(BASE)
    assert digest_after(second, other, 12345) == digest(second)
