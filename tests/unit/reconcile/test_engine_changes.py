"""Engine.compiled: a new store generation is read as the objects it changed and compiled as itself, and
the result is always what compiling the whole generation from scratch gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperfence.policy.objects import ObjectChange
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.reconcile import engine as engine_module
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import compile_ruleset
from tests.unit.policy.test_parse import BASE, doc

VMS = [
    *BASE["vms"],
    *(
        {"name": f"vm{i}", "port": f"vp{i}", "mac": f"02:77:00:00:00:{i:02x}", "ips": [f"10.77.0.{i}"]}
        for i in (3, 4)
    ),
]


def rule(i: int, port: int, src: str = "vm:vm1", dst: str = "vm:vm2") -> dict[str, Any]:
    return {"id": f"r{i}", "from": src, "to": dst, "services": [f"tcp/{port}"]}


def fresh(document: dict[str, Any], discovered: tuple[dict[str, Any], ...] = ()) -> Any:
    merged = {**document, "vms": [*document.get("vms", []), *discovered]}
    return compile_ruleset(resolve_policy(parse_policy(merged)))


def engine(tmp_path: Path) -> Engine:
    return Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _ns: ())


def test_a_one_rule_change_is_read_and_parsed_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e = engine(tmp_path)
    try:
        first = doc(vms=VMS, rules=[rule(i, 80 + i) for i in range(6)])
        e.store.put_policy(first, source="t")
        assert (c := e.compiled()) is not None and c.ruleset == fresh(first)
        second = doc(vms=VMS, rules=[rule(i, 80 + i + (i == 2)) for i in range(6)])
        e.store.put_policy(second, source="t")

        def no(*_a: Any, **_k: Any) -> Any:
            raise AssertionError("read or parsed whole")

        monkeypatch.setattr(e.store, "get_policy", no)
        monkeypatch.setattr(engine_module, "desired_policy", no)
        assert (c := e.compiled()) is not None and c.ruleset == fresh(second)
        # and one written as an object (the REST API's way): appended
        e.store.put_objects([ObjectChange("rules", "r6", 6, rule(6, 99, "vm:vm3", "vm:vm4"))], source="api")
        third = {**second, "rules": [*second["rules"], rule(6, 99, "vm:vm3", "vm:vm4")]}
        assert (c := e.compiled()) is not None and c.ruleset == fresh(third)
    finally:
        e.close()


def test_other_changes_are_read_whole_and_compile_the_same(tmp_path: Path) -> None:
    e = engine(tmp_path)
    try:
        e.store.put_policy(doc(vms=VMS, rules=[rule(1, 80)]), source="t")
        assert e.compiled() is not None
        for version in (
            doc(vms=VMS[:3], rules=[rule(1, 80)]),  # a VM deleted
            doc(vms=VMS[:3], rules=[]),  # a rule deleted
            doc(vms=VMS, rules=[rule(1, 80, "vm:vm4")], ipsets={"a": ["10.9.0.0/24"]}),  # VM, section, rule
        ):
            e.store.put_policy(version, source="t")
            assert (c := e.compiled()) is not None and c.ruleset == fresh(version)
    finally:
        e.close()


edits = st.lists(
    st.tuples(
        st.integers(0, 5), st.integers(1, 3), st.sampled_from(["vm:vm1", "vm:vm3", "vms", "label:role=web"])
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, discover=st.booleans())
def test_any_sequence_of_rule_changes_compiles_as_from_scratch(
    tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int, str]], discover: bool
) -> None:
    e = engine(tmp_path_factory.mktemp("engine"))
    discovered = ({"name": "found", "port": "vp9", "mac": "02:77:00:00:00:09", "ips": ["10.77.0.9"]},)
    try:
        if discover:
            e.set_discovered(discovered)
        rules = [rule(i, 80 + i) for i in range(3)]
        e.store.put_policy(doc(vms=VMS, rules=rules), source="t")
        assert e.compiled() is not None
        for i, port, src in edits:
            if i < len(rules):
                rules[i] = rule(i, port, src)
            else:
                rules.append(rule(len(rules), port, src, "vm:found" if discover else "vm:vm2"))
            version = doc(vms=VMS, rules=list(rules))
            e.store.put_policy(version, source="t")
            c = e.compiled()
            assert c is not None and c.ruleset == fresh(version, discovered if discover else ())
            assert c.ruleset.chain_rules() == fresh(version, discovered if discover else ()).chain_rules()
    finally:
        e.close()
