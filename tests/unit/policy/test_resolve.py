from __future__ import annotations

from ipaddress import IPv4Address as A

from hyperfence.model.policy import AddressRange, Direction
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import ANY, complement, merge_ranges, resolve_policy
from tests.unit.policy.test_parse import doc


def r(a: str, b: str) -> AddressRange:
    return AddressRange(A(a), A(b))


def test_merge_and_complement() -> None:
    merged = merge_ranges([r("10.0.0.5", "10.0.0.9"), r("10.0.0.1", "10.0.0.4"), r("10.0.1.0", "10.0.1.0")])
    assert merged == (r("10.0.0.1", "10.0.0.9"), r("10.0.1.0", "10.0.1.0"))
    assert complement(ANY) == ()
    assert complement(merged)[0] == r("0.0.0.0", "10.0.0.0")
    assert merge_ranges([*merged, *complement(merged)]) == ANY


def test_one_rule_grants_sender_egress_and_receiver_ingress() -> None:
    res = resolve_policy(
        parse_policy(doc(rules=[{"id": "p", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}]))
    )
    vm1, vm2 = res.vms
    assert [e.rule.id for e in vm1.egress] == ["p"] and vm1.ingress == ()
    assert [e.rule.id for e in vm2.ingress] == ["p"] and vm2.egress == ()
    assert vm1.egress[0].peers == (r("10.77.0.12", "10.77.0.12"),)
    # ARP is implied both ways between the two, and only between them
    assert vm1.arp_peers == (r("10.77.0.12", "10.77.0.12"),)
    assert vm2.arp_peers == (r("10.77.0.11", "10.77.0.11"),)


def test_address_selectors_do_not_make_rules_apply_to_vms() -> None:
    res = resolve_policy(
        parse_policy(doc(rules=[{"from": "10.77.0.0/22", "to": "vm:vm2", "protocol": "tcp"}]))
    )
    vm1, vm2 = res.vms
    assert vm1.egress == () and len(vm2.ingress) == 1


def test_outside_peers_go_through_the_gateway_and_entries_follow_priority() -> None:
    res = resolve_policy(
        parse_policy(
            doc(
                rules=[
                    {"id": "late", "from": "vm:vm1", "to": "outside", "protocol": "tcp", "priority": 50},
                    {
                        "id": "early",
                        "from": "vm:vm1",
                        "to": "any",
                        "protocol": "udp",
                        "priority": 5,
                        "action": "deny",
                    },
                ]
            )
        )
    )
    vm1 = res.vms[0]
    assert [e.rule.id for e in vm1.egress] == ["early", "late"]
    assert vm1.egress[1].direction is Direction.OUT
    assert A("10.77.0.1") in [x.first for x in vm1.arp_peers]  # gateway for outside
    assert not any(x.first <= A("10.77.0.12") <= x.last for x in vm1.arp_peers)  # deny implies no ARP


def test_dhcp_rule_pairs_request_and_reply() -> None:
    res = resolve_policy(
        parse_policy(doc(rules=[{"id": "d", "from": "vms", "to": "host", "services": ["dhcp"]}]))
    )
    for vp in res.vms:
        assert vp.dhcp_client and not vp.dhcp_server
        assert [e.paired for e in vp.ingress] == [True]
        assert vp.ingress[0].peers == (r("10.77.0.1", "10.77.0.1"),)
