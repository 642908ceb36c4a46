"""Discovered VMs join the policy as if declared; bad or clashing ones are left out with a reason."""

from __future__ import annotations

from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.parse import parse_policy
from tests.unit.policy.test_parse import doc, problems

WEB3 = {"name": "web3", "id": "uuid-3", "port": "vnet3", "mac": "52:54:00:00:00:03", "ips": ["10.77.0.13"]}


def test_a_discovered_vm_joins_and_a_rule_can_name_it() -> None:
    base = doc(
        settings={"inventory": "libvirt"}, rules=[{"from": "vm:vm1", "to": "vm:web3", "protocol": "icmp"}]
    )
    merged, skipped = merge_discovered(base, (WEB3,))
    assert skipped == []
    p = parse_policy(merged)
    assert [v.name for v in p.vms] == ["vm1", "vm2", "web3"]


def test_with_an_inventory_a_rule_may_name_a_vm_that_is_not_there_yet() -> None:
    rules = [{"from": "vm:vm1", "to": "vm:web3", "protocol": "icmp"}]
    assert parse_policy(doc(settings={"inventory": "libvirt"}, rules=rules)).rules
    assert any("VM 'web3' is not declared" in p for p in problems(doc(rules=rules)))


def test_clashing_and_invalid_discovered_vms_are_left_out_with_a_reason() -> None:
    clash = {**WEB3, "name": "vm1"}
    no_ips = {**WEB3, "name": "web4", "id": "uuid-4", "port": "vnet4", "mac": "52:54:00:00:00:04", "ips": []}
    outside = {
        **WEB3,
        "name": "web5",
        "id": "uuid-5",
        "port": "vnet5",
        "mac": "52:54:00:00:00:05",
        "ips": ["192.0.2.5"],
    }
    merged, skipped = merge_discovered(doc(), (clash, no_ips, outside, WEB3))
    assert [v["name"] for v in merged["vms"]] == ["vm1", "vm2", "web3"]
    assert len(skipped) == 3
    assert "its name is already declared" in skipped[0]
    assert "ips" in skipped[1]
    assert "192.0.2.5 is not in network" in skipped[2]
    parse_policy(merged)  # what is merged is valid


def test_with_an_inventory_heartbeats_and_limits_may_name_absent_vms() -> None:
    sections = {
        "heartbeats": [{"vms": "vm:web9", "action": "pause"}],
        "limits": [{"vms": "vm:web9", "new_flows": 10}],
    }
    p = parse_policy(doc(settings={"inventory": "libvirt"}, **sections))
    assert p.heartbeats and p.limits
    got = problems(doc(**sections))
    assert any("heartbeats[0].vms: VM 'web9' is not declared" in g for g in got)
    assert any("limits[0].vms: VM 'web9' is not declared" in g for g in got)
