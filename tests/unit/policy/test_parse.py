from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.policy import (
    L4,
    MAX_ID_LENGTH,
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


# --- each mistake once, where it is --------------------------------------------------------------------

SELECTOR_HELP = (
    "expected vm:NAME, label:KEY=VALUE, vms, ipset:NAME, a CIDR (10.0.0.0/24), a range (10.0.0.5-10.0.0.9), "
    "an address, host, outside or any"
)
PROTOCOL_HELP = (
    "expected tcp, udp, icmp, arp, dhcp, dhcp-server, any, a number 0-255 or one of igmp, gre, esp, ah, sctp"
)
WEB = {"name": "web", "port": "vp3", "mac": "52:54:00:zz:00:03", "ips": ["10.77.0.13"]}


def test_an_invalid_vm_is_reported_once_not_again_where_it_is_named() -> None:
    got = problems(
        doc(
            vms=[*BASE["vms"], WEB],
            rules=[
                {"from": "vm:web", "to": "vm:vm1", "protocol": "icmp"},
                {"from": ["vm:vm2", "vm:web"], "to": "vm:ghost", "protocol": "icmp"},
            ],
            limits=[{"vms": "vm:web", "new_flows": 10}],
            heartbeats=[{"vms": ["vm:web", "vm:nobody"]}],
        )
    )
    assert got == [
        "vms[2].mac: '52:54:00:zz:00:03' is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)",
        # a VM that is declared nowhere is still reported, wherever it is named
        "rules[1].to: VM 'ghost' is not declared (expected one of: vm1, vm2)",
        "heartbeats[0].vms[1]: VM 'nobody' is not declared",
    ]


def test_a_vm_missing_a_field_is_reported_once_too() -> None:
    no_mac = {k: v for k, v in WEB.items() if k != "mac"}
    got = problems(doc(vms=[*BASE["vms"], no_mac], rules=[{"from": "vm:web", "to": "vms"}]))
    assert got == ["vms[2].mac: missing (a required field; see docs/policy.md)"]


def test_an_invalid_network_is_reported_once_not_again_at_its_vms_and_their_rules() -> None:
    got = problems(
        {
            "networks": [
                {"name": "lab", "bridge": "br0", "subnet": "10.77.0.0/22"},
                {"name": "dmz", "bridge": "br1", "subnet": "10.88.0.1/24"},
            ],
            "vms": [
                {
                    "name": "a",
                    "network": "lab",
                    "port": "vp1",
                    "mac": "02:00:00:00:00:01",
                    "ips": ["10.77.0.5"],
                },
                {
                    "name": "b",
                    "network": "dmz",
                    "port": "vp2",
                    "mac": "02:00:00:00:00:02",
                    "ips": ["10.88.0.5"],
                },
                {
                    "name": "c",
                    "network": "wan",
                    "port": "vp3",
                    "mac": "02:00:00:00:00:03",
                    "ips": ["10.9.0.5"],
                },
            ],
            "rules": [{"from": "vm:a", "to": ["vm:b", "vm:c"], "protocol": "icmp"}],
        }
    )
    assert got == [
        "networks[1].subnet: '10.88.0.1/24' has host bits set (expected the network address, e.g. 10.88.0.0/24)",
        "vms[2].network: 'wan' is not a declared network (expected one of: lab)",
    ]


def test_an_invalid_ip_set_is_reported_once_not_again_where_it_is_named() -> None:
    got = problems(
        doc(
            ipsets={"admins": ["10.9.0.0/24", "10.9.1.300"], "ops": "10.9.2.0/24"},
            rules=[{"from": ["ipset:admins", "ipset:ops", "ipset:nope"], "to": "vm:vm1", "protocol": "icmp"}],
        )
    )
    assert got == [
        "ipsets.admins[1]: '10.9.1.300' is not an IPv4 address (expected a.b.c.d)",
        "ipsets.ops: expected a list of addresses, CIDRs or ranges (got '10.9.2.0/24')",
        "rules[0].from[2]: IP set 'nope' is not declared (expected one of: no IP sets declared)",
    ]


def test_a_section_that_is_wrong_as_a_whole_is_reported_once() -> None:
    got = problems(
        {
            "networks": 5,
            "vms": {"name": "a"},
            "ipsets": ["10.0.0.1"],
            "rules": [{"from": "vm:a", "to": "ipset:x", "protocol": "tcp", "ports": ["90-80"]}],
        }
    )
    assert got == [
        "networks: Input should be a valid list (got 5)",
        "vms: Input should be a valid list (got {'name': 'a'})",
        "ipsets: expected a mapping of IP set names to address lists (got ['10.0.0.1'])",
        # the rule's own mistake is still found; its names cannot be checked against broken sections
        "rules[0].ports[0]: range 90-80 is reversed (expected 80-90)",
    ]


def test_one_bad_field_hides_no_other_problem_of_its_rule() -> None:
    got = problems(
        doc(
            rules=[
                {"from": ["vm:vm1", "bad sel"], "to": "vm:ghost", "protocol": "bogus", "ports": ["80-70"]},
                {"from": "vm:vm1", "to": 5, "protocol": {"a": 1}, "ports": [0], "priority": "x", "colour": 1},
                {"to": "vm:vm2", "protocol": "icmp", "icmp_type": True, "icmp_code": 300, "action": "permit"},
                {"from": "vm:vm1", "to": "any", "services": "tcp/80", "log": "yes"},
            ]
        )
    )
    assert got == [
        f"rules[0].from[1]: 'bad sel' is not a selector ({SELECTOR_HELP})",
        "rules[0].to: VM 'ghost' is not declared (expected one of: vm1, vm2)",
        "rules[0].ports[0]: range 80-70 is reversed (expected 70-80)",
        f"rules[0].protocol: 'bogus' is not a protocol ({PROTOCOL_HELP})",
        "rules[1].priority: Input should be a valid integer (got 'x')",
        "rules[1].colour: unknown field (check the spelling; see docs/policy.md)",
        f"rules[1].to: 5 is not a selector ({SELECTOR_HELP})",
        "rules[1].ports[0]: port 0 is out of range (expected 1-65535)",
        f"rules[1].protocol: {{'a': 1}} is not a protocol ({PROTOCOL_HELP})",
        "rules[2].from: missing (a required field; see docs/policy.md)",
        "rules[2].action: Input should be 'allow', 'deny' or 'reject' (got 'permit')",
        "rules[2].icmp_type: True is not an ICMP type (expected 0-255 or one of echo-reply, "
        "destination-unreachable, source-quench, redirect, echo-request, router-advertisement, "
        "router-solicitation, time-exceeded, parameter-problem, timestamp-request, timestamp-reply)",
        "rules[2].icmp_code: 300 is not an ICMP code (expected 0-255)",
        "rules[3].log: Input should be a valid boolean (got 'yes')",
        "rules[3].services: expected a list of services, e.g. [tcp/80, udp/53] (got 'tcp/80')",
    ]


def test_values_of_the_wrong_type_are_located_item_by_item() -> None:
    got = problems(
        doc(
            ipsets={"admins": ["10.9.0.0/24", 7]},
            rules=[
                {"from": ["vm:vm1", 5], "to": {"vm": 1}, "services": ["tcp/80", None]},
                {"from": "vm:vm1", "to": "any", "protocol": "tcp", "ports": []},
            ],
        )
    )
    assert got == [
        "ipsets.admins[1]: 7 is not an address, CIDR or range (expected e.g. 10.0.0.0/24)",
        f"rules[0].from[1]: 5 is not a selector ({SELECTOR_HELP})",
        f"rules[0].to: {{'vm': 1}} is not a selector ({SELECTOR_HELP})",
        "rules[0].services[1]: None is not a service (expected tcp/PORTS, udp/PORTS, tcp, udp, icmp, icmp/TYPE, "
        "icmp/TYPE/CODE, proto/NUMBER, arp, dhcp, dhcp-server or any)",
        "rules[1].ports: empty (expected at least one port; leave ports out for all ports)",
    ]


def test_keys_that_are_not_text_are_located() -> None:
    got = problems({**doc(), 1: 2, "ipsets": {5: ["10.0.0.1"]}, "settings": {"log_rate": 0}})
    assert got == [
        "1: the key 1 is not a string (expected a name)",
        "settings.log_rate: Input should be greater than or equal to 1 (got 0)",
        "ipsets[5]: 5 is not a valid IP set name (expected letters, digits, '_', '.', '-'; at most 63 "
        "characters, starting with a letter or digit)",
    ]


def test_a_bad_inventory_setting_does_not_turn_every_vm_name_into_a_problem() -> None:
    got = problems(doc(settings={"inventory": "kvm"}, rules=[{"from": "vm:web3", "to": "vms"}]))
    assert got == ["settings.inventory: Input should be 'none' or 'libvirt' (got 'kvm')"]


def test_names_must_match_whole_a_trailing_newline_is_not_a_name() -> None:
    vm = {"name": "web\n", "port": "vp3\n", "mac": "02:77:00:00:00:0d", "ips": ["10.77.0.13"]}
    got = problems(doc(vms=[*BASE["vms"], vm], rules=[{"id": "r\n", "from": "vm:vm1", "to": "vm:vm2"}]))
    assert got == [
        "vms[2].name: 'web\\n' is not a valid VM name (expected letters, digits, '_', '.', '-'; at most 63 "
        "characters, starting with a letter or digit)",
        "vms[2].port: 'vp3\\n' is not an interface name (expected 1-15 characters of letters, digits, '_', "
        "'.', ':', '-')",
        "rules[0].id: 'r\\n' is not a valid rule id (expected letters, digits, '_', '.', '-'; at most 32 "
        "characters, starting with a letter or digit)",
    ]


@pytest.mark.parametrize("length", [32, 33, 64])
def test_rule_and_limit_ids_have_one_maximum_length(length: int) -> None:
    rule_id, limit_id = "r" * length, "l" * length
    data = doc(
        rules=[{"id": rule_id, "from": "vm:vm1", "to": "vm:vm2"}],
        limits=[{"id": limit_id, "vms": "vms", "new_flows": 5}],
        heartbeats=[{"id": "h" * length, "vms": "vms"}],
    )
    assert MAX_ID_LENGTH == 32  # the number docs/policy.md gives
    if length <= 32:
        p = parse_policy(data)
        assert (p.rules[0].id, p.limits[0].id, p.heartbeats[0].id) == (rule_id, limit_id, "h" * length)
        return
    rule = "letters, digits, '_', '.', '-'; at most 32 characters, starting with a letter or digit"
    assert problems(data) == [
        f"rules[0].id: {rule_id!r} is not a valid rule id (expected {rule})",
        f"limits[0].id: {limit_id!r} is not a valid id (expected {rule})",
        f"heartbeats[0].id: {'h' * length!r} is not a valid id (expected {rule})",
    ]


def test_a_huge_value_is_quoted_short() -> None:
    (got,) = problems(
        doc(rules=[{"from": "vm:vm1", "to": "any", "protocol": "tcp", "ports": [list(range(10**5))]}])
    )
    assert got.startswith("rules[0].ports[0]: [0, 1, 2, 3,") and len(got) < 200


def test_settings_host_addresses_are_addresses_each_checked() -> None:
    p = parse_policy(doc(settings={"host_addresses": ["192.0.2.7", "198.51.100.0/30"]}))
    assert [str(r.first) for r in p.settings.host_addresses] == ["192.0.2.7", "198.51.100.0"]
    assert problems(doc(settings={"host_addresses": ["192.0.2.7", "nope", 5]})) == [
        "settings.host_addresses[1]: 'nope' is not an IPv4 address (expected a.b.c.d)",
        "settings.host_addresses[2]: 5 is not an address, CIDR or range (expected e.g. 10.0.0.0/24)",
    ]


def test_a_service_named_twice_is_one_service_and_its_nft_rules_keep_distinct_ids() -> None:
    """Found by the differential test: `[icmp/echo-request, icmp/8]` made two nft rules with the same id,
    and the next policy without it could not be applied (the planner deleted by a handle the id shared)."""
    from hyperfence.policy.resolve import resolve_policy
    from hyperfence.ruleset.compile import compile_ruleset

    policy = parse_policy(
        doc(
            rules=[
                {
                    "id": "r",
                    "from": "vm:vm1",
                    "to": "vm:vm2",
                    "services": ["icmp/echo-request", "icmp/8", "tcp/80", "tcp/80"],
                }
            ]
        )
    )
    assert len(policy.rules[0].services) == 2
    for rules in compile_ruleset(resolve_policy(policy)).chain_rules().values():
        comments = [r.comment for r in rules]
        assert len(comments) == len(set(comments)), comments


def test_a_vm_without_ips_learns_its_addresses_and_an_empty_list_is_still_refused() -> None:
    learner = {"name": "vm3", "port": "vp3", "mac": "02:77:00:00:00:0d"}
    p = parse_policy(doc(vms=[*BASE["vms"], learner]))
    vm3 = p.vm_by_name("vm3")
    assert vm3 is not None and vm3.learns and vm3.ips == ()
    assert not any(v.learns for v in p.vms if v.name != "vm3")
    got = problems(doc(vms=[*BASE["vms"], {**learner, "ips": []}]))
    assert any(g.startswith("vms[2].ips") for g in got), got


def test_the_learn_group_must_differ_from_the_log_group() -> None:
    assert parse_policy(doc(settings={"learn_group": 9})).settings.learn_group == 9
    got = problems(doc(settings={"nflog_group": 5, "learn_group": 5}))
    assert any("settings.learn_group: 5 is also nflog_group" in g for g in got), got
