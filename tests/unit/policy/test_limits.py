"""Flood limits: parsing (every mistake located), resolution to VMs, and what they compile to."""

from __future__ import annotations

import json

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.policy import MAX_CONNECTIONS, Direction, LabelSelector, VmSelector
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
    # only IPv4 (new flows) spends the limit's tokens: ARP never reaches the `limit`
    ipv4 = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "version"}}, "right": 4}}
    assert log_rule[:2] == [ipv4, over] and "limit" in log_rule[2] and "log" in log_rule[3]
    assert log_rule[3]["log"]["prefix"].endswith(":in:flood:sys:flood:web")
    assert drop_rule[:2] == [ipv4, over] and drop_rule[-1] == {"drop": None}
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


# --- connection caps (`connections`) ---------------------------------------------------------------


def test_a_connection_cap_parses_alone_and_beside_a_flood_limit() -> None:
    p = parse_policy(
        doc(
            limits=[
                {"id": "lb", "vms": "label:role=web", "connections": 100_000, "log": False},
                {"id": "both", "vms": "vm:vm2", "new_flows": 50, "connections": 500},
            ]
        )
    )
    assert [(c.id, c.vms, c.connections, c.log) for c in p.connection_caps] == [
        ("lb", (LabelSelector("role", "web"),), 100_000, False),
        ("both", (VmSelector("vm2"),), 500, True),
    ]
    assert [lim.id for lim in p.limits] == ["both"]  # `lb` is no flood limit
    assert p.settings.connections_per_vm == 16_384


def test_every_connection_cap_mistake_is_located() -> None:
    got = "\n".join(
        problems(
            doc(
                settings={"connections_per_vm": 0},
                limits=[
                    {"vms": "vms", "connections": 0},
                    {"vms": "vms", "connections": -5},
                    {"vms": "vms", "connections": 2.5},
                    {"vms": "vms", "connections": "100"},
                    {"vms": "vms", "connections": MAX_CONNECTIONS + 1},
                    {"vms": "vms"},
                    {"vms": "vms", "connections": 10, "direction": "in", "burst": 5},
                ],
            )
        )
    )
    assert "settings.connections_per_vm: Input should be greater than or equal to 1 (got 0)" in got
    assert "limits[0].connections: Input should be greater than or equal to 1 (got 0)" in got
    assert "limits[1].connections: Input should be greater than or equal to 1 (got -5)" in got
    assert "limits[2].connections: Input should be a valid integer (got 2.5)" in got
    assert "limits[3].connections: Input should be a valid integer (got '100')" in got
    assert f"limits[4].connections: Input should be less than or equal to {MAX_CONNECTIONS}" in got
    assert "limits[5]: neither new_flows nor connections (expected at least one of them)" in got
    assert "limits[6].direction: applies to new_flows only" in got
    assert "limits[6].burst: applies to new_flows only" in got


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "16384", MAX_CONNECTIONS + 1])
def test_a_bad_default_cap_is_refused(bad: object) -> None:
    got = problems(doc(settings={"connections_per_vm": bad}))
    assert len(got) == 1 and got[0].startswith("settings.connections_per_vm: "), got


def test_the_first_cap_selecting_a_vm_wins_and_the_others_get_the_default() -> None:
    r = resolve_policy(
        parse_policy(
            doc(
                settings={"connections_per_vm": 1000},
                limits=[
                    {"id": "flood-only", "vms": "vms", "new_flows": 10},
                    {"id": "web", "vms": "label:role=web", "connections": 50},
                    {"id": "all", "vms": "vm:vm1", "connections": 70},
                ],
            )
        )
    )
    caps = {vp.vm.name: vp.connection_cap for vp in r.vms}
    assert (caps["vm1"].id, caps["vm1"].connections) == ("web", 50)
    assert (caps["vm2"].id, caps["vm2"].connections, caps["vm2"].log) == ("default", 1000, True)


def test_a_cap_change_resolves_from_scratch() -> None:
    before = parse_policy(doc(rules=[RULE]))
    after = parse_policy(doc(rules=[RULE], limits=[{"vms": "vm:vm1", "connections": 5}]))
    assert resolve_update(resolve_policy(before), after) is None
    assert resolve_update(resolve_policy(before), parse_policy(doc(rules=[RULE]))) is not None
