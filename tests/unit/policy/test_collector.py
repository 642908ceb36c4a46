"""Collecting every problem of an input, each located (policy/collector.py): one bad field hides nothing
else, one mistake is reported once, and a message quotes what it got, cut to a bounded length."""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictInt, StrictStr

from hyperfence.policy.collector import ALL, Collector, Strict, key_path, loc, one_or_list, shown


class Item(Strict):
    name: Any = None  # required (see `fields`): the model accepts None, `fields` reports it missing
    port: StrictInt = 0
    note: StrictStr = ""
    labels: dict[str, StrictInt] = Field(default_factory=dict)


def problems(c: Collector) -> list[str]:
    return [str(p) for p in c.problems]


def test_loc_writes_indexes_in_brackets_and_names_with_dots() -> None:
    assert loc(["rules", 2, "ports", 0]) == "rules[2].ports[0]"
    assert loc([0, "a"]) == "[0].a"
    assert loc([]) == ""


def test_shown_quotes_a_value_and_cuts_a_long_one() -> None:
    assert shown("x") == "'x'"
    long = shown("x" * 100)
    assert len(long) == 80 and long.endswith("...") and long.startswith("'xxx")
    assert shown(list(range(1000)), 10) == "[0, 1, ..."


def test_key_path_quotes_a_key_that_is_not_plain_text() -> None:
    assert key_path("labels", "role") == "labels.role"
    assert key_path("labels", "app.kubernetes.io/name") == "labels.app.kubernetes.io/name"
    assert key_path("labels", "a b") == "labels['a b']"
    assert key_path("labels", 3) == "labels[3]"


def test_one_or_list_gives_each_item_its_path() -> None:
    assert one_or_list(["a", "b"], "vms") == [("vms[0]", "a"), ("vms[1]", "b")]
    assert one_or_list("a", "vms") == [("vms", "a")]
    assert one_or_list([], "vms") == []


def test_a_valid_mapping_gives_the_document_and_no_bad_field() -> None:
    c = Collector()
    assert c.fields(Item, {"name": "web", "port": 80}, "items[0]", required=("name",)) == (
        Item(name="web", port=80),
        frozenset(),
    )
    assert c.problems == []


def test_one_bad_field_hides_nothing_else_and_is_left_at_its_default() -> None:
    c = Collector()
    got = c.fields(Item, {"name": "web", "port": "80", "note": 5, "typo": 1}, "items[3]", required=("name",))
    assert got == (Item(name="web"), frozenset({"port", "note", "typo"}))
    assert problems(c) == [
        "items[3].port: Input should be a valid integer (got '80')",
        "items[3].note: Input should be a valid string (got 5)",
        "items[3].typo: unknown field (check the spelling; see docs/policy.md)",
    ]


def test_a_missing_required_field_is_a_problem_of_its_own_and_the_rest_is_still_checked() -> None:
    c = Collector()
    got = c.fields(Item, {"port": "x"}, "items[0]", required=("name",))
    assert got is not None and got[1] == {"name", "port"}
    assert problems(c) == [
        "items[0].name: missing (a required field; see docs/policy.md)",
        "items[0].port: Input should be a valid integer (got 'x')",
    ]


def test_not_a_mapping_says_what_was_expected_and_what_came() -> None:
    c = Collector()
    assert c.fields(Item, [1, 2], "items[1]", required=("name", "port")) is None
    assert c.fields(Item, "text", "items[2]") is None
    assert problems(c) == [
        "items[1]: expected a mapping with name, port (got [1, 2])",
        "items[2]: expected a mapping (got 'text')",
    ]


def test_a_key_that_is_not_a_string_is_named_as_a_key() -> None:
    c = Collector()
    got = c.fields(Item, {"labels": {1: 2}}, "vms[0]")
    assert got is not None and got[1] == {"labels"}
    assert problems(c) == ["vms[0].labels.1: the key 1 is not a string (expected a name)"]
    c = Collector()
    c.fields(Item, {"labels": {"k": "v"}}, "")  # at the top: no leading dot
    assert problems(c) == ["labels.k: Input should be a valid integer (got 'v')"]


def test_value_turns_a_value_error_into_a_located_problem() -> None:
    c = Collector()
    assert c.value(int, "12", "a") == 12
    assert c.value(int, "x", "rules[0].priority") is None
    assert problems(c) == ["rules[0].priority: invalid literal for int() with base 10: 'x'"]


def test_a_mistake_is_reported_once_where_it_is_made() -> None:
    c = Collector()
    assert not c.is_reported("vm", "web")
    c.mark_reported("vm", "web")
    assert c.is_reported("vm", "web") and not c.is_reported("vm", "db")
    assert not c.is_reported("ipset", "web")
    c.mark_reported("ipset")  # the whole section is wrong
    assert c.is_reported("ipset", "anything") and c.is_reported("ipset", ALL)
    c.add("x", "y")
    assert problems(c) == ["x: y"]  # marking adds no problem of its own
