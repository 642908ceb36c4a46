"""parse_rules_changed: a change of rules only is validated rule by rule against the policy it edits; what
it cannot vouch for (another section changed, a rule with a problem, an id another rule has) is left to the
whole parse, which says what is wrong and where."""

from __future__ import annotations

from typing import Any

from hyperfence.policy import edits
from hyperfence.policy.objects import ObjectChange
from hyperfence.policy.parse import parse_policy, parse_rules_changed
from tests.unit.policy.test_parse import doc

RULES = [
    {"id": "a", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]},
    {"id": "b", "from": "vm:vm2", "to": "vm:vm1", "services": ["tcp/22"]},
]


def edit(
    document: dict[str, Any], pos: int, rule: dict[str, Any]
) -> tuple[dict[str, Any], list[ObjectChange]]:
    rules = list(document["rules"])
    if pos < len(rules):
        rules[pos] = rule
    else:
        rules.append(rule)
    return {**document, "rules": rules}, [ObjectChange("rules", str(rule.get("id")), pos, rule)]


def test_each_change_is_the_whole_parse_and_ids_stay_unique() -> None:
    before = doc(rules=RULES)
    previous = parse_policy(before)
    for pos, rule in (
        (1, {**RULES[1], "services": ["tcp/23"]}),  # edited, its id kept
        (1, {**RULES[1], "id": "c"}),  # its id changed to a free one
        (2, {"id": "c", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}),  # appended
    ):
        after, changes = edit(before, pos, rule)
        for _ in range(2):  # (twice from the same policy, as the daemon validates and then compiles)
            made = parse_rules_changed(previous, before, after, changes)
            assert made == parse_policy(after)
            assert made is not None and edits.edited(previous.rules, made.rules) == (pos,)
    # Taking another rule's id, edited or appended: left to the whole parse (which names the place)
    for pos in (1, 2):
        after, changes = edit(before, pos, {**RULES[1], "id": "a"})
        assert parse_rules_changed(previous, before, after, changes) is None
    # a rule's id freed by one version can be taken by the next
    renamed, changes = edit(before, 0, {**RULES[0], "id": "z"})
    made = parse_rules_changed(previous, before, renamed, changes)
    assert made is not None
    after, changes = edit(renamed, 1, {**RULES[1], "id": "a"})
    assert parse_rules_changed(made, renamed, after, changes) == parse_policy(after)
    after, changes = edit(renamed, 1, {**RULES[1], "id": "z"})  # but not the one it took
    assert parse_rules_changed(made, renamed, after, changes) is None
