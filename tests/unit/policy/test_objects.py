"""policy/objects.py: a document as objects, the changes between two documents, and patching a document
with them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfence.policy.objects import (
    HEAD,
    ObjectChange,
    assemble,
    changed,
    diff,
    fold,
    item_names,
    patch,
    split,
    stored,
)

DOC: dict[str, Any] = {
    "settings": {"inventory": "none"},
    "networks": [{"name": "lan", "subnet": "10.0.0.0/24"}],
    "vms": [{"name": "a", "port": "p1"}, {"name": "b", "port": "p2"}],
    "ipsets": {"web": ["10.1.0.0/24"], "#odd": ["10.2.0.1"]},
    "rules": [{"id": "r1", "from": "vm:a", "to": "vm:b"}, {"from": "vm:b", "to": "vm:a"}],
}


def rebuilt(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    held = stored(old)
    changed(held, diff(held, new))
    return assemble((key, s.pos, __import__("orjson").loads(s.text)) for key, s in held.items())


def test_a_document_is_its_objects_order_included() -> None:
    objects = split(DOC)
    assert objects[("vms", "a")] == (0, {"name": "a", "port": "p1"})
    assert objects[("rules", "#1")][0] == 1  # no id: named by its position
    assert objects[("ipsets", "##odd")] == (1, ["#odd", ["10.2.0.1"]])
    assert objects[("settings", HEAD)] == (0, {"value": {"inventory": "none"}})
    assert assemble((k, pos, body) for k, (pos, body) in objects.items()) == DOC
    assert list(assemble((k, pos, body) for k, (pos, body) in reversed(objects.items()))) == list(DOC)


def test_names_taken_twice_or_unusable_are_positions() -> None:
    items = [{"id": "x"}, {"id": "x"}, {"id": "#1"}, "text", {"id": 5}, {"id": ""}]
    assert item_names("rules", items) == ["x", "#1", "#2", "#3", "#4", "#5"]


def test_a_one_rule_change_is_one_object_and_patch_shares_the_rest() -> None:
    new = {**DOC, "rules": [{"id": "r1", "from": "vm:a", "to": "vm:b", "ports": 22}, DOC["rules"][1]]}
    changes = diff(stored(DOC), new)
    assert [(c.section, c.name) for c in changes] == [("rules", "r1")]
    got = patch(DOC, changes)
    assert got == new
    assert got is not None and got["vms"] is DOC["vms"] and got["rules"][1] is DOC["rules"][1]
    assert DOC["rules"][0] == {"id": "r1", "from": "vm:a", "to": "vm:b"}  # the old document is untouched


def test_appends_are_patched_deletions_and_moves_are_not() -> None:
    appended = {
        **DOC,
        "vms": [*DOC["vms"], {"name": "c", "port": "p3"}],
        "ipsets": {**DOC["ipsets"], "n": []},
    }
    assert patch(DOC, diff(stored(DOC), appended)) == appended
    deleted = {**DOC, "vms": DOC["vms"][:1]}
    assert patch(DOC, diff(stored(DOC), deleted)) is None
    moved = {**DOC, "vms": DOC["vms"][::-1]}
    assert patch(DOC, diff(stored(DOC), moved)) is None
    assert rebuilt(DOC, deleted) == deleted and rebuilt(DOC, moved) == moved


def test_fold_keeps_the_last_write_of_each_object() -> None:
    one = [ObjectChange("rules", "r1", 0, {"id": "r1", "v": 1})]
    two = [ObjectChange("rules", "r1", 0, {"id": "r1", "v": 2}), ObjectChange("vms", "c", 2, {"name": "c"})]
    assert fold([one, two]) == [two[0], two[1]]


names = st.sampled_from(["a", "b", "c", "d", "#1", ""])
items = st.fixed_dictionaries({"name": names}, optional={"port": st.integers(0, 3)})
rules = st.fixed_dictionaries({}, optional={"id": names, "to": st.integers(0, 3)})
documents = st.fixed_dictionaries(
    {},
    optional={
        "settings": st.none() | st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 2)),
        "vms": st.lists(items, max_size=5),
        "rules": st.lists(rules, max_size=5),
        "ipsets": st.dictionaries(names, st.lists(st.integers(0, 2), max_size=2), max_size=3),
        "version": st.just(1),
    },
)


@settings(max_examples=300, deadline=None)
@given(documents, documents)
def test_any_two_documents_diff_fold_and_patch_exactly(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert assemble((k, pos, body) for k, (pos, body) in split(new).items()) == new
    changes = diff(stored(old), new)
    assert rebuilt(old, new) == new
    got = patch(old, fold([changes]))
    assert got is None or got == new
    if not changes:
        assert got == old


def test_writing_and_removing_one_item_makes_the_document_it_says() -> None:
    from hyperfence.policy.objects import apply_changes, holds, remove_item, write_item

    for section, item in (
        ("vms", {"name": "b", "port": "p9"}),  # replaced in place
        ("vms", {"name": "z", "port": "p9"}),  # appended
        ("ipsets", {"#odd": ["10.2.0.9"]}),
        ("ipsets", {"new": []}),
        ("settings", {"inventory": "libvirt"}),
        ("limits", {"id": "l1", "vms": "vms"}),  # a section the document does not have yet
    ):
        changes = write_item(DOC, section, item)
        got = apply_changes(DOC, changes)
        assert got == rebuilt(DOC, got)
        assert all(holds(got, ch) for ch in changes) and not all(holds(DOC, ch) for ch in changes)
    # removing an item moves the ones after it, positional names included
    doc = {**DOC, "rules": [{"id": "a"}, {"x": 1}, {"x": 2}]}
    changes = remove_item(doc, "rules", "a")
    assert (
        apply_changes(doc, changes)
        == {**doc, "rules": [{"x": 1}, {"x": 2}]}
        == rebuilt(doc, apply_changes(doc, changes))
    )
    assert apply_changes(DOC, remove_item(DOC, "ipsets", "#odd"))["ipsets"] == {"web": ["10.1.0.0/24"]}
    without = apply_changes(DOC, remove_item(DOC, "settings", ""))
    assert without == {k: v for k, v in DOC.items() if k != "settings"} and list(without) == list(DOC)[1:]


@settings(max_examples=200, deadline=None)
@given(st.lists(rules, max_size=6), st.lists(rules.filter(lambda r: bool(r.get("id"))), max_size=6))
def test_items_written_one_by_one_are_found_where_a_fresh_look_finds_them(
    start: list[dict[str, Any]], writes: list[dict[str, Any]]
) -> None:
    """The names `patch` carries from one version's list to the next are the names a pass over it gives."""
    from hyperfence.policy.objects import apply_changes, item_names, item_position, write_item

    document: dict[str, Any] = {"rules": start}
    for item in writes:
        if item["id"].startswith("#"):
            continue  # (refused: a name that is a position)
        document = apply_changes(document, write_item(document, "rules", item))
        fresh = item_names("rules", document["rules"])
        for name in {*fresh, "a", "b", "c", "d"}:
            assert item_position("rules", document["rules"], name) == (
                fresh.index(name) if name in fresh else None
            )


@settings(max_examples=300, deadline=None)
@given(documents, documents)
def test_names_carried_through_any_patch_are_those_a_fresh_look_gives(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    from hyperfence.policy.objects import item_names, item_position

    for section in ("vms", "rules"):
        if isinstance(old.get(section), list):
            item_position(section, old[section], "a")  # looked up: what a patch of it carries
    got = patch(old, fold([diff(stored(old), new)]))
    for section in ("vms", "rules"):
        if got is not None and isinstance(got.get(section), list):
            fresh = item_names(section, got[section])
            for name in {*fresh, "a", "b", "#1"}:
                assert item_position(section, got[section], name) == (
                    fresh.index(name) if name in fresh else None
                )
