"""services/edit.py: one policy object at a time, validated against the policy the engine holds, stored as
the object changes it is (a compare-and-swap), nothing stored when it is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError
from hyperfence.policy.objects import ObjectChange
from hyperfence.reconcile.engine import Engine
from hyperfence.services.edit import Edit, edit_from_wire, store_edit
from tests.unit.policy.test_parse import BASE, doc

R1 = {"id": "r1", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}
R2 = {"id": "r2", "from": "vm:vm2", "to": "vm:vm1", "services": ["tcp/22"]}
VM3 = {"name": "vm3", "port": "vp3", "mac": "02:77:00:00:00:0d", "ips": ["10.77.0.13"]}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(
        netns=None, state_dir=str(tmp_path), read_addresses=lambda _ns: (), read_ports=lambda *_a, **_k: []
    )
    e.store.put_policy(doc(rules=[R1, R2]), source="file")
    try:
        yield e
    finally:
        e.close()


def edit(engine: Engine, what: Edit) -> Any:
    return store_edit(
        what, kernel=engine, policies=engine.store, source="test", read_ports=lambda *_a, **_k: []
    )


def latest(engine: Engine) -> Any:
    stored = engine.store.get_policy()
    assert stored is not None
    return stored.document


def test_a_rule_is_replaced_in_place_or_appended_and_checked_as_itself(engine: Engine) -> None:
    edited = {**R1, "services": ["tcp/8080"]}
    done = edit(engine, Edit("rules", edited))
    assert done.checked == "item" and [c.name for c in done.changes] == ["r1"]
    assert latest(engine)["rules"] == [edited, R2]
    r3 = {"id": "r3", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
    done = edit(engine, Edit("rules", r3))
    assert done.changes == (ObjectChange("rules", "r3", 2, r3),)
    assert latest(engine)["rules"] == [edited, R2, r3]
    again = edit(engine, Edit("rules", r3))  # as it is: nothing stored
    assert again.changes == () and again.generation == done.generation == engine.store.latest_generation()


def test_an_invalid_item_is_refused_where_it_is_wrong_and_nothing_is_stored(engine: Engine) -> None:
    before = engine.store.latest_generation()
    with pytest.raises(InvalidInputError) as e:
        edit(engine, Edit("rules", {**R1, "to": "vm:nobody"}))
    assert [p.path for p in e.value.problems] == ["rules[0].to"]
    with pytest.raises(InvalidInputError) as e:
        edit(engine, Edit("vms", {**VM3, "mac": "not-a-mac"}))
    assert [p.path for p in e.value.problems] == ["vms[2].mac"]
    with pytest.raises(InvalidInputError, match="needs its id"):
        edit(engine, Edit("rules", {"from": "vm:vm1", "to": "vm:vm2"}))
    with pytest.raises(InvalidInputError, match="not a policy section"):
        edit(engine, Edit("rulez", R1))
    with pytest.raises(NotFoundError, match="no item 'r9'"):
        edit(engine, Edit("rules", remove=True, name="r9"))
    assert engine.store.latest_generation() == before


def test_other_objects_are_checked_with_the_whole_document(engine: Engine) -> None:
    assert edit(engine, Edit("vms", VM3)).checked == "document"
    assert [v["name"] for v in latest(engine)["vms"]] == ["vm1", "vm2", "vm3"]
    edit(engine, Edit("ipsets", {"admins": ["10.9.0.0/24"]}))
    edit(engine, Edit("settings", {"inventory": "none"}))
    done = edit(engine, Edit("rules", remove=True, name="r1"))
    assert {(c.name, c.pos, c.deleted) for c in done.changes} == {("r1", -1, True), ("r2", 0, False)}
    assert latest(engine) == {
        **BASE,
        "vms": [*BASE["vms"], VM3],
        "rules": [R2],
        "ipsets": {"admins": ["10.9.0.0/24"]},
        "settings": {"inventory": "none"},
    }
    compiled = engine.compiled()
    assert compiled is not None and [r.id for r in compiled.policy.rules] == ["r2"]


def test_a_writer_in_between_makes_it_validate_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.store.put_objects
    calls: list[int | None] = []

    def racing(changes: list[ObjectChange], *, source: str, expected: int | None = None) -> int:
        calls.append(expected)
        if len(calls) == 1:  # another writer stores a generation first
            engine.store.put_policy(doc(rules=[R1]), source="other")
        return real(changes, source=source, expected=expected)

    monkeypatch.setattr(engine.store, "put_objects", racing)
    r3 = {"id": "r3", "from": "vm:vm2", "to": "vm:vm1", "protocol": "icmp"}
    edit(engine, Edit("rules", r3))
    assert calls == [1, 2]
    assert latest(engine)["rules"] == [R1, r3]  # made on the other writer's version, not on the old one


def test_a_policy_file_is_not_edited_and_bad_requests_name_their_field(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{"networks": ' + str(BASE["networks"]).replace("'", '"') + "}")
    e = Engine(netns=None, state_dir=str(tmp_path / "s"), policy_file=str(f), read_addresses=lambda _ns: ())
    try:
        with pytest.raises(ConflictError, match="edit the file"):
            edit(e, Edit("rules", R1))
    finally:
        e.close()
    with pytest.raises(InvalidInputError) as err:
        edit_from_wire({"section": 3, "remove": "yes", "name": None})
    assert [p.path for p in err.value.problems] == ["section", "remove", "name"]
    assert edit_from_wire({"section": "rules", "item": R1}) == Edit("rules", R1)


def test_an_item_nested_too_deeply_is_refused_where_it_comes_in(engine: Engine) -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    with pytest.raises(InvalidInputError) as err:
        edit_from_wire({"section": "rules", "item": {**R1, "description": deep}})
    assert [p.path for p in err.value.problems] == ["item"] and "nested" in str(err.value.problems[0])
    before = engine.store.latest_generation()
    with pytest.raises(InvalidInputError):
        edit(engine, Edit("rules", {**R1, "description": deep}))
    assert engine.store.latest_generation() == before


def test_a_removal_request_has_no_item_and_that_is_fine() -> None:
    assert edit_from_wire({"section": "rules", "remove": True, "name": "r1"}) == Edit(
        "rules", remove=True, name="r1"
    )
