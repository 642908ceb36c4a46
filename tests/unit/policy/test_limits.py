"""Flood limits: parsing (every mistake located), resolution to VMs, and what they compile to."""

from __future__ import annotations

import json

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.policy import Direction, LabelSelector
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy, resolve_update
from hyperfence.ruleset.compile import BRIDGE, compile_ruleset, vm_sid
from tests.unit.policy.test_parse import doc, problems

RULE = {"id": "web", "from": "vm:vm2", "to": "vm:vm1", "services": ["tcp/80"]}


def test_a_limit_parses_with_defaults() -> None:
    p = parse_policy(doc(rules=[RULE], limits=[{"id": "web", "vms": "label:role=web", "new_flows": 100}]))
    (lim,) = p.limits
    assert lim.vms == (LabelSelector("role", "web"),)
    assert lim.directions == (Direction.OUT, Direction.IN)
    assert (lim.rate, lim.burst, lim.log) == (100, 200, True)


def test_every_limit_mistake_is_listed() -> None:
    got = problems(
        doc(
            limits=[
                {"vms": "10.0.0.0/8", "new_flows": 10},
                {"vms": "vm:nope", "new_flows": 0, "direction": "sideways"},
                {"id": "a", "vms": [], "new_flows": 5},
                {"id": "a", "vms": "vms", "new_flows": 5, "colour": "red"},
            ]
        )
    )
    text = "\n".join(got)
    assert "limits[0].vms: '10.0.0.0/8' selects addresses, not VMs" in text
    assert "limits[1].new_flows" in text and "(got 0)" in text
    assert "limits[1].direction" in text and "sideways" in text
    assert "limits[2].vms: empty" in text
    assert "limits[3].colour: unknown field" in text


def test_a_duplicate_limit_id_and_an_undeclared_vm() -> None:
    got = "\n".join(
        problems(
            doc(
                limits=[
                    {"id": "a", "vms": "vm:vm1", "new_flows": 5},
                    {"id": "a", "vms": ["vm:vm2", "vm:ghost"], "new_flows": 5},
                ]
            )
        )
    )
    assert "limits[1].id: 'a' is also the id of limits[0]" in got
    assert "limits[1].vms[1]: VM 'ghost' is not declared" in got


def test_limits_resolve_to_the_selected_vms_and_directions() -> None:
    r = resolve_policy(
        parse_policy(
            doc(
                limits=[
                    {"id": "in-web", "vms": "label:role=web", "direction": "in", "new_flows": 50},
                    {"id": "all", "vms": "vms", "direction": "out", "new_flows": 500, "log": False},
                ]
            )
        )
    )
    by_name = {vp.vm.name: vp for vp in r.vms}
    assert [lim.id for lim in by_name["vm1"].limits_in] == ["in-web"]
    assert [lim.id for lim in by_name["vm1"].limits_out] == ["all"]
    assert by_name["vm2"].limits_in == ()
    assert [lim.id for lim in by_name["vm2"].limits_out] == ["all"]


def test_a_limit_change_resolves_from_scratch() -> None:
    before = parse_policy(doc(rules=[RULE]))
    after = parse_policy(doc(rules=[RULE], limits=[{"vms": "vms", "new_flows": 5}]))
    assert resolve_update(resolve_policy(before), after) is None


def test_limits_come_first_in_the_vm_chain_and_log_within_the_log_rate() -> None:
    rs = compile_ruleset(
        resolve_policy(
            parse_policy(
                doc(rules=[RULE], limits=[{"id": "web", "vms": "vm:vm1", "direction": "in", "new_flows": 7}])
            )
        )
    )
    rules = rs.chain_rules()[(BRIDGE, f"{vm_sid(rs_vm_id('vm1'))}_in")]
    assert [r.comment for r in rules[:2]] == ["sys:flood:web:log", "sys:flood:web"]
    log_rule, drop_rule = (json.loads(r.expr) for r in rules[:2])
    over = {"limit": {"burst": 14, "inv": True, "per": "second", "rate": 7}}
    assert log_rule[0] == over and "limit" in log_rule[1] and "log" in log_rule[2]
    assert log_rule[2]["log"]["prefix"].endswith(":in:flood:sys:flood:web")
    assert drop_rule[0] == over and drop_rule[-1] == {"drop": None}
    out = rs.chain_rules()[(BRIDGE, f"{vm_sid(rs_vm_id('vm1'))}_out")]
    assert not any(r.comment.startswith("sys:flood") for r in out)


def rs_vm_id(name: str) -> str:
    return next(v.id for v in parse_policy(doc()).vms if v.name == name)


def test_no_limits_no_flood_rules() -> None:
    rs = compile_ruleset(resolve_policy(parse_policy(doc(rules=[RULE]))))
    assert not any(r.comment.startswith("sys:flood") for r in rs.rules)


@pytest.mark.parametrize("bad", [{"vms": "vms"}, {"vms": "vms", "new_flows": "10"}, {"new_flows": 1}])
def test_required_fields_and_types(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        parse_policy(doc(limits=[bad]))
