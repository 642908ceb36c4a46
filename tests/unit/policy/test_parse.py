from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.policy import (
    L4,
    Action,
    IcmpService,
    NamedService,
    PortRange,
    PortService,
    SpecialService,
)
from hyperfence.policy.parse import parse_policy, parse_policy_text

BASE: dict[str, Any] = {
    "networks": [{"name": "lab", "bridge": "br0", "subnet": "10.77.0.0/22", "gateway": "10.77.0.1"}],
    "vms": [
        {
            "name": "vm1",
            "port": "vp1",
            "mac": "02:77:00:00:00:0b",
            "ips": ["10.77.0.11"],
            "labels": {"role": "web"},
        },
        {"name": "vm2", "port": "vp2", "mac": "02:77:00:00:00:0c", "ips": ["10.77.0.12"]},
    ],
}


def doc(**extra: Any) -> dict[str, Any]:
    return {**BASE, **extra}


def problems(data: Any) -> list[str]:
    with pytest.raises(InvalidInputError) as e:
        parse_policy(data)
    return [str(p) for p in e.value.problems]


def test_valid_policy_parses_every_service_form() -> None:
    p = parse_policy(
        doc(
            ipsets={"admins": ["10.9.0.0/24", "10.9.1.5-10.9.1.9"]},
            rules=[
                {
                    "id": "web",
                    "from": ["vm:vm1", "ipset:admins"],
                    "to": "label:role=web",
                    "protocol": "tcp",
                    "ports": [80, "8000-8080"],
                    "priority": 10,
                    "log": True,
                },
                {"from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp", "icmp_type": "echo-request"},
                {
                    "from": "vms",
                    "to": "host",
                    "services": ["dhcp", "udp/53", "icmp/3/4", "proto/47", "arp"],
                    "action": "deny",
                },
            ],
        )
    )
    web, icmp, mixed = p.rules
    assert web.services == (PortService(L4.TCP, (PortRange(80, 80), PortRange(8000, 8080))),)
    assert icmp.id == "r1" and icmp.services == (IcmpService(8, None),)
    assert mixed.action is Action.DENY and NamedService(SpecialService.DHCP) in mixed.services
    assert p.ipset("admins") is not None
    assert p.vms[0].ips == (IPv4Address("10.77.0.11"),) and p.vms[0].label("role") == "web"


def test_yaml_and_json_give_the_same_policy() -> None:
    yaml_text = """
networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]
vms: [{name: a, port: vp1, mac: "02:00:00:00:00:01", ips: [10.77.0.5]}]
rules: [{from: vm:a, to: any, protocol: udp, ports: 53}]
"""
    json_text = (
        '{"networks": [{"name": "lab", "bridge": "br0", "subnet": "10.77.0.0/22"}], '
        '"vms": [{"name": "a", "port": "vp1", "mac": "02:00:00:00:00:01", "ips": ["10.77.0.5"]}], '
        '"rules": [{"from": "vm:a", "to": "any", "protocol": "udp", "ports": 53}]}'
    )
    assert parse_policy_text(yaml_text) == parse_policy_text(json_text)


def test_every_mistake_is_listed_with_its_path_and_value() -> None:
    got = problems(
        doc(
            rules=[
                {"from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "ports": ["80-70"]},
                {"from": "vm:nobody", "to": "10.0.0.0/33", "protocol": "udp", "ports": [70000]},
                {"from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "ports": [False]},
                {"from": "vm:vm1", "to": "any", "action": "permit"},
            ]
        )
    )
    joined = "\n".join(got)
    assert "rules[0].ports[0]: range 80-70 is reversed" in joined
    assert "rules[1].from: VM 'nobody' is not declared" in joined
    assert "rules[1].to: '10.0.0.0/33' is not an IPv4 network" in joined
    assert "rules[1].ports[0]: port 70000 is out of range" in joined
    assert "rules[2].ports" in joined and "False" in joined
    assert "rules[3].action" in joined and "permit" in joined
    assert len(got) >= 6


def test_duplicate_identities_and_bad_vm_fields() -> None:
    got = "\n".join(
        problems(
            doc(
                vms=[
                    {"name": "a", "port": "vp1", "mac": "02:00:00:00:00:01", "ips": ["10.77.0.5"]},
                    {"name": "b", "port": "vp1", "mac": "02:00:00:00:00:01", "ips": ["10.77.0.5"]},
                    {"name": "c", "port": "vp3", "mac": "01:00:00:00:00:03", "ips": ["192.168.1.1"]},
                    {"name": "d", "port": "vp4", "mac": "zz", "ips": ["10.77.0.1"]},
                    {
                        "name": "e",
                        "port": "vp5",
                        "mac": "02:00:00:00:00:05",
                        "ips": ["10.77.0.6"],
                        "color": "red",
                    },
                ]
            )
        )
    )
    assert "vms[1].port: vp1 on br0 is already used by VM 'a'" in got
    assert "vms[1].mac: 02:00:00:00:00:01 is already used by VM 'a'" in got
    assert "vms[1].ips[0]: 10.77.0.5 is already used by VM 'a'" in got
    assert "vms[2].mac: '01:00:00:00:00:03' is a multicast MAC" in got
    assert "vms[2].ips[0]: 192.168.1.1 is not in network 'lab'" in got
    assert "vms[3].mac: 'zz' is not a MAC address" in got
    assert "vms[3].ips[0]: 10.77.0.1 is the gateway" in got
    assert "vms[4].color: unknown field" in got


def test_syntax_errors_are_located() -> None:
    with pytest.raises(InvalidInputError) as e:
        parse_policy_text("networks: [\n  {name: lab\n")
    assert "line" in str(e.value)


def test_not_a_mapping() -> None:
    assert problems([1, 2]) == ["expected a mapping with networks, vms, ipsets, rules; got list"]


def test_duplicate_rule_ids_and_services() -> None:
    got = "\n".join(
        problems(
            doc(
                rules=[
                    {"id": "x", "from": "vm:vm1", "to": "any", "services": ["tcp/80"]},
                    {"id": "x", "from": "vm:vm1", "to": "any", "services": ["bogus/1"]},
                ]
            )
        )
    )
    assert "rules[1].id: 'x' is also the id of rules[0]" in got
    assert "rules[1].services[0]: 'bogus/1' is not a service" in got


def test_ports_are_kept_sorted_and_merged_as_nft_keeps_them() -> None:
    p = parse_policy(
        doc(
            rules=[
                {
                    "from": "vm:vm1",
                    "to": "any",
                    "protocol": "tcp",
                    "ports": [443, 80, 81, "1000-2000", "1500-2500"],
                },
                {"from": "vm:vm1", "to": "any", "services": ["udp/53,52,9"]},
            ]
        )
    )
    tcp, udp = (r.services[0] for r in p.rules)
    assert tcp == PortService(L4.TCP, (PortRange(80, 81), PortRange(443, 443), PortRange(1000, 2500)))
    assert udp == PortService(L4.UDP, (PortRange(9, 9), PortRange(52, 53)))


def test_unchanged_rules_are_reused_and_never_hide_a_problem() -> None:
    rules = [
        {"id": "a", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"},
        {"id": "b", "from": "vm:vm2", "to": "any", "protocol": "udp", "ports": [53]},
    ]
    first = parse_policy(doc(rules=rules))
    second = parse_policy(doc(rules=[rules[0], {**rules[1], "ports": [54]}]))
    assert second.rules[0] is first.rules[0]  # same text, same VMs: the same object
    assert second.rules[1] is not first.rules[1]
    # vm2 is gone: the remembered rule "a" must be checked again and refused
    without_vm2 = doc(rules=rules)
    without_vm2["vms"] = without_vm2["vms"][:1]
    assert "rules[0].to: VM 'vm2' is not declared" in "\n".join(problems(without_vm2))
