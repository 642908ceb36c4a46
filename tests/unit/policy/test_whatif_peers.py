from __future__ import annotations

from ipaddress import IPv4Address as A
from typing import Any

from hyperfence.model.policy import AddressRange, Direction
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import Resolved, resolve_policy
from hyperfence.policy.whatif import Flow, can
from tests.unit.policy.test_parse import doc

UPLINK = AddressRange(A("10.78.0.1"), A("10.78.0.1"))
TCP22, UDP67 = Flow("tcp", 22), Flow("udp", 67)


def resolved(rules: list[dict[str, Any]], **extra: Any) -> Resolved:
    return resolve_policy(parse_policy(doc(rules=rules, **extra)), host_addresses=(UPLINK,))


def test_the_hosts_uplink_address_is_reached_by_host_not_by_outside() -> None:
    res = resolved(
        [
            {"id": "out", "from": "vm:vm1", "to": "outside", "services": ["tcp/22"]},
            {"id": "hst", "from": "vm:vm2", "to": "host", "services": ["tcp/22"]},
        ]
    )
    denied = can(res, "vm1", "10.78.0.1", TCP22)
    assert not denied.allowed
    assert denied.reason == (
        "vm1 egress: deny by sys:default-deny; 10.78.0.1 is the host's (`host` covers it, `outside` does not)"
    )
    assert can(res, "vm1", "10.78.0.2", TCP22).allowed
    assert can(res, "vm2", "10.78.0.1", TCP22).reason.startswith("allowed by hst (vm2 egress)")
    never = can(res, "vm1", "224.0.0.251", TCP22)
    assert not never.allowed and "224.0.0.251 is never routed" in never.reason


def test_an_address_only_an_unknown_port_can_hold_is_denied_like_the_kernel_does() -> None:
    res = resolved(
        [
            {"id": "web", "from": "vm:vm1", "to": "any", "services": ["tcp/22"]},
            {"id": "in", "from": "any", "to": "vm:vm2", "services": ["tcp/22"]},
        ]
    )
    to_nobody = can(res, "vm1", "10.77.0.99", TCP22)  # vm1's egress allows it; the port drops it
    assert not to_nobody.allowed
    assert [(s.vm, s.direction, s.rule) for s in to_nobody.steps] == [
        ("vm1", Direction.OUT, "web"),
        ("10.77.0.99", Direction.IN, "sys:unknown-port"),
    ]
    assert "lab has no uplinks" in to_nobody.reason and to_nobody.reason.endswith("deny by sys:unknown-port")
    from_nobody = can(res, "10.77.0.99", "vm2", TCP22)  # dropped at the sender's port: vm2 never sees it
    assert not from_nobody.allowed and [s.rule for s in from_nobody.steps] == ["sys:unknown-port"]
    assert not can(res, "10.77.0.98", "10.77.0.99", TCP22).allowed  # neither is a VM: still the kernel's drop
    # the host and addresses off the managed networks are not on a bridge port
    assert can(res, "10.77.0.1", "vm2", TCP22).allowed
    assert can(res, "10.78.0.2", "10.78.0.1", TCP22).reason.endswith("hyperfence does not filter it")


def test_behind_an_uplink_the_vms_rules_decide_and_the_answer_says_why() -> None:
    uplinked = doc()["networks"][0] | {"uplinks": ["eno1"]}
    res = resolved(
        [{"id": "web", "from": "vm:vm1", "to": "any", "services": ["tcp/22"]}], networks=[uplinked]
    )
    answer = can(res, "vm1", "10.77.0.99", TCP22)
    assert answer.allowed and "may be behind an uplink (eno1)" in answer.reason


def test_dhcp_answers_follow_the_role_and_the_peers() -> None:
    res = resolved(
        [
            {"id": "lease", "from": "vms", "to": "host", "services": ["dhcp"]},
            {"id": "srv", "from": "vm:vm2", "to": "vm:vm1", "services": ["dhcp-server"]},
        ]
    )
    assert can(res, "vm1", "10.77.0.1", UDP67).allowed
    assert can(res, "vm1", "255.255.255.255", UDP67).allowed  # the broadcast request
    assert not can(res, "vm1", "10.78.0.2", UDP67).allowed  # a server the rule does not name
    assert can(res, "vm1", "vm2", UDP67).allowed  # vm1 asks vm2, which serves it
    assert can(res, "vm2", "vm1", Flow("udp", 68)).allowed  # vm2's answer, taken by vm1
    assert not can(res, "vm1", "vm2", Flow("udp", 68)).allowed  # vm1 serves nobody
