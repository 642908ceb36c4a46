"""The sections around the rules (policy/sections.py): `limits` and `heartbeats`, parsed entry by entry with
every problem located, and only whole, valid entries kept."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.model.policy import (
    DEFAULT_BOOT_GRACE,
    AllVmsSelector,
    ConnectionCap,
    Direction,
    FloodLimit,
    Heartbeat,
    LabelSelector,
    Release,
    SilenceAction,
    VmSelector,
)
from hyperfence.policy.collector import Collector
from hyperfence.policy.sections import parse_heartbeats, parse_limits, parsed_selectors


def problems(c: Collector) -> list[str]:
    return [str(p) for p in c.problems]


def test_a_flood_limit_defaults_to_both_directions_and_twice_its_rate_as_burst() -> None:
    c = Collector()
    floods, caps = parse_limits(c, [{"vms": "vm:web", "new_flows": 10}], {"web"})
    assert problems(c) == [] and caps == []
    assert floods == [FloodLimit("l0", (VmSelector("web"),), (Direction.OUT, Direction.IN), 10, 20, True)]


def test_one_entry_may_be_a_flood_limit_and_a_connection_cap_for_the_same_vms() -> None:
    c = Collector()
    entry = {"id": "db", "vms": ["label:role=db"], "direction": "in", "new_flows": 5, "burst": 7}
    floods, caps = parse_limits(c, [{**entry, "connections": 100, "log": False}], {"web"})
    assert problems(c) == []
    assert floods == [FloodLimit("db", (LabelSelector("role", "db"),), (Direction.IN,), 5, 7, False)]
    assert caps == [ConnectionCap("db", (LabelSelector("role", "db"),), 100, False)]


def test_a_connection_cap_alone_refuses_the_fields_of_a_flood_limit() -> None:
    c = Collector()
    floods, caps = parse_limits(c, [{"vms": "vms", "connections": 3, "burst": 4, "direction": "in"}], None)
    assert floods == [] and caps == [ConnectionCap("l0", (AllVmsSelector(),), 3, True)]
    assert problems(c) == [
        f"limits[0].{name}: applies to new_flows only, which this entry does not set (the connection cap "
        "counts the connections of both directions)"
        for name in ("direction", "burst")
    ]


def test_every_problem_of_every_entry_is_located_and_no_bad_entry_is_kept() -> None:
    c = Collector()
    items: list[Any] = [
        {"vms": ["vm:ghost", "10.0.0.1"], "connections": 5},
        {"id": "x", "vms": "vms"},
        {"vms": []},
        {"new_flows": 0, "vms": "label:role=db", "extra": 1},
        {"id": "x", "vms": "vms", "connections": 1},
        "nope",
        {"id": "bad id!", "vms": "vms", "connections": 1},
        {"new_flows": 1},
    ]
    floods, caps = parse_limits(c, items, {"web"})
    assert floods == []
    assert caps == [ConnectionCap("x", (AllVmsSelector(),), 1, True)]  # limits[4]: only its id is wrong
    got = problems(c)
    assert got[:2] == [
        "limits[0].vms[0]: VM 'ghost' is not declared",
        "limits[0].vms[1]: '10.0.0.1' selects addresses, not VMs (expected vm:NAME, label:KEY=VALUE or vms)",
    ]
    assert "limits[1]: neither new_flows nor connections (expected at least one of them)" in got
    assert "limits[2].vms: empty (expected at least one selector)" in got
    assert "limits[3].new_flows: Input should be greater than or equal to 1 (got 0)" in got
    assert "limits[3].extra: unknown field (check the spelling; see docs/policy.md)" in got
    assert "limits[4].id: 'x' is also the id of limits[1] (expected unique ids)" in got
    assert "limits[5]: expected a mapping with vms (got 'nope')" in got
    assert any(p.startswith("limits[6].id: 'bad id!' is not a valid id") for p in got), got
    assert "limits[7].vms: missing (a required field; see docs/policy.md)" in got


def test_a_vm_reported_where_it_is_declared_is_not_reported_again_where_it_is_selected() -> None:
    c = Collector()
    c.mark_reported("vm", "web")  # the VM `web` itself was invalid
    assert parse_limits(c, [{"vms": "vm:web", "new_flows": 1}], set()) == ([], [])
    assert problems(c) == []


def test_without_declared_vms_any_vm_name_is_taken_from_an_inventory() -> None:
    c = Collector()
    floods, _ = parse_limits(c, [{"vms": "vm:libvirt-guest", "new_flows": 1}], None)
    assert problems(c) == [] and floods[0].vms == (VmSelector("libvirt-guest"),)


def test_a_heartbeat_takes_its_defaults_and_its_settings() -> None:
    c = Collector()
    got = parse_heartbeats(
        c,
        [
            {"vms": "vm:web"},
            {
                "id": "strict",
                "vms": "vms",
                "interval": 0.5,
                "misses": 2,
                "action": "pause",
                "release": "manual",
            },
        ],
        {"web"},
    )
    assert problems(c) == []
    assert got == [
        Heartbeat(
            "h0", (VmSelector("web"),), 1.0, 3, SilenceAction.ISOLATE, Release.AUTO, DEFAULT_BOOT_GRACE
        ),
        Heartbeat(
            "strict", (AllVmsSelector(),), 0.5, 2, SilenceAction.PAUSE, Release.MANUAL, DEFAULT_BOOT_GRACE
        ),
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("interval", 0.1, "Input should be greater than or equal to 0.2 (got 0.1)"),
        ("interval", float("inf"), "Input should be a finite number (got inf)"),
        ("misses", True, "Input should be a valid integer (got True)"),
        ("action", "explode", "Input should be 'alert', 'isolate' or 'pause' (got 'explode')"),
        ("boot_grace", -1, "Input should be greater than or equal to 0 (got -1)"),
    ],
)
def test_a_bad_heartbeat_field_is_named_with_its_value_and_what_was_expected(
    field: str, value: object, message: str
) -> None:
    c = Collector()
    assert parse_heartbeats(c, [{"vms": "vms", field: value}], None) == []
    assert problems(c) == [f"heartbeats[0].{field}: {message}"]


def test_parsed_selectors_yields_the_good_ones_with_their_paths_and_reports_the_rest() -> None:
    c = Collector()
    got = list(parsed_selectors(c, ["vm:a", "nonsense!", "label:k=v"], "x.vms"))
    assert [(where, text) for where, text, _ in got] == [("x.vms[0]", "vm:a"), ("x.vms[2]", "label:k=v")]
    assert [p.path for p in c.problems] == ["x.vms[1]"]
    assert list(parsed_selectors(c, "vms", "y")) == [("y", "vms", AllVmsSelector())]
