from __future__ import annotations

from ipaddress import IPv4Address as A

from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfence.model.policy import (
    L4,
    AddressRange,
    Direction,
    NamedService,
    PortRange,
    PortService,
    SpecialService,
)
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import (
    ANY,
    complement,
    dhcp_ports,
    merge_ranges,
    resolve_policy,
    resolve_update,
)
from tests.unit.policy.test_parse import doc

DHCP = NamedService(SpecialService.DHCP)


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


def test_an_allow_of_everything_implies_arp() -> None:
    """No protocol and `services: [any]` are IP traffic: ARP with the peers, the gateway for routed ones."""
    for rule in (
        {"from": "vm:vm1", "to": "vm:vm2"},
        {"from": "vm:vm1", "to": "vm:vm2", "services": ["any"]},
        {"from": "vm:vm1", "to": ["vm:vm2", "outside"], "protocol": "any"},
    ):
        vm1, vm2 = resolve_policy(parse_policy(doc(rules=[rule]))).vms
        assert r("10.77.0.12", "10.77.0.12") in vm1.arp_peers, rule
        assert vm2.arp_peers == (r("10.77.0.11", "10.77.0.11"),), rule
        assert vm1.arp_sources and vm2.arp_sources, rule
    assert vm1.arp_gateway and not vm2.arp_gateway
    # a rule that names only `arp` implies nothing more
    vm1, vm2 = resolve_policy(
        parse_policy(doc(rules=[{"from": "vm:vm1", "to": "vm:vm2", "services": ["arp"]}]))
    ).vms
    assert vm1.arp_peers == vm2.arp_peers == () and not vm1.arp_sources
    # DHCP is IP: a lease is renewed by unicast, so the client and its server resolve each other (and no
    # ARP with the broadcast or 0.0.0.0 addresses of the exchange, nor with the gateway because of them)
    vm1, vm2 = resolve_policy(
        parse_policy(doc(rules=[{"from": "vm:vm1", "to": "vm:vm2", "services": ["dhcp"]}]))
    ).vms
    assert vm1.arp_peers == (r("10.77.0.12", "10.77.0.12"),) and vm2.arp_peers == (
        r("10.77.0.11", "10.77.0.11"),
    )
    assert not vm1.arp_gateway and not vm2.arp_gateway
    assert all("255.255.255.255" not in str(a) and "0.0.0.0" not in str(a) for a in vm1.arp_sources)


def test_a_reject_implies_arp_on_both_ends_and_a_deny_nothing() -> None:
    """The rejected sender must resolve its peer (and the peer answer) for the reset to come back."""
    rules = [
        {"id": "rej", "from": "vm:vm1", "to": ["vm:vm2", "outside"], "protocol": "tcp", "action": "reject"},
        {"id": "no", "from": "vm:vm2", "to": "host", "protocol": "udp", "action": "deny"},
    ]
    vm1, vm2 = resolve_policy(parse_policy(doc(rules=rules))).vms
    assert vm1.arp_peers == (r("10.77.0.1", "10.77.0.1"), r("10.77.0.12", "10.77.0.12"))
    assert vm1.arp_gateway and len(vm1.arp_sources) == 1
    assert vm2.arp_peers == (r("10.77.0.11", "10.77.0.11"),)  # not the host: deny implies nothing
    assert not vm2.arp_gateway


def test_dhcp_rule_pairs_request_and_reply() -> None:
    res = resolve_policy(
        parse_policy(doc(rules=[{"id": "d", "from": "vms", "to": "host", "services": ["dhcp"]}]))
    )
    for vp in res.vms:
        assert vp.dhcp_client and not vp.dhcp_server
        assert [e.paired for e in vp.ingress] == [True]
        assert vp.ingress[0].peers == (r("10.77.0.1", "10.77.0.1"),)


def test_an_arp_rule_pairs_both_ways_on_each_vm() -> None:
    """`arp` is an exchange both ways: each VM the rule selects gets it in its own chain and the other half
    (the peers' requests and replies, its answers) in the opposite one; it implies no ARP for IP."""
    res = resolve_policy(
        parse_policy(
            doc(rules=[{"id": "a", "from": "vm:vm1", "to": ["vm:vm2", "host"], "services": ["arp"]}])
        )
    )
    vm1, vm2 = res.vms
    assert [(e.rule.id, e.paired) for e in vm1.egress] == [("a", False)]
    assert [(e.rule.id, e.paired) for e in vm1.ingress] == [("a", True)]
    assert vm1.ingress[0].peers == (r("10.77.0.1", "10.77.0.1"), r("10.77.0.12", "10.77.0.12"))
    assert [(e.rule.id, e.paired) for e in vm2.ingress] == [("a", False)]
    assert [(e.rule.id, e.paired) for e in vm2.egress] == [("a", True)]
    assert vm2.egress[0].peers == (r("10.77.0.11", "10.77.0.11"),)
    assert vm1.arp_peers == vm2.arp_peers == () and not vm1.arp_sources


BROADCAST, NO_ADDRESS = r("255.255.255.255", "255.255.255.255"), r("0.0.0.0", "0.0.0.0")


def test_a_dhcp_client_talks_with_the_servers_its_rule_names_only() -> None:
    res = resolve_policy(
        parse_policy(doc(rules=[{"id": "d", "from": "vms", "to": "host", "services": ["dhcp", "udp/53"]}]))
    )
    host = r("10.77.0.1", "10.77.0.1")
    for vp in res.vms:
        dns, request = vp.egress
        assert dns.services == (PortService(L4.UDP, (PortRange(53, 53),)),) and dns.peers == (host,)
        assert request.peers == (host, BROADCAST)  # a request goes to the server or to everyone on the link
        assert dhcp_ports(DHCP, Direction.OUT, paired=False) == (68, 67)
        (reply,) = vp.ingress
        assert reply.paired and reply.peers == (host,)  # a reply from anyone else is dropped
        assert dhcp_ports(DHCP, Direction.IN, paired=True) == (67, 68)


def test_the_rules_from_side_sends_first_a_vm_named_as_dhcp_server_serves() -> None:
    """`{from: vm2, to: vm1, dhcp}` and `{from: vm1, to: vm2, dhcp-server}` say the same: vm1 serves vm2."""
    for rule in (
        {"id": "d", "from": "vm:vm2", "to": "vm:vm1", "services": ["dhcp"]},
        {"id": "d", "from": "vm:vm1", "to": "vm:vm2", "services": ["dhcp-server"]},
    ):
        vm1, vm2 = resolve_policy(parse_policy(doc(rules=[rule]))).vms
        assert (vm1.dhcp_client, vm1.dhcp_server, vm2.dhcp_client, vm2.dhcp_server) == (
            False,
            True,
            True,
            False,
        )
        one, two = r("10.77.0.11", "10.77.0.11"), r("10.77.0.12", "10.77.0.12")
        (offers,) = vm1.egress
        assert offers.peers == (two, BROADCAST)
        (requests,) = vm1.ingress
        assert requests.peers == (NO_ADDRESS, two)  # a client without an address sends from 0.0.0.0
        svc = offers.services[0]
        assert dhcp_ports(svc, offers.direction, paired=offers.paired) == (67, 68)
        assert dhcp_ports(svc, requests.direction, paired=requests.paired) == (68, 67)
        assert [e.peers for e in vm2.egress] == [(one, BROADCAST)]
        assert [e.peers for e in vm2.ingress] == [(one,)]


rule_st = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["a", "b", "c", "d"]),
        "from": st.sampled_from(["vm:vm1", "vm:vm2", "vms", "any", "label:role=web", "10.77.0.0/24"]),
        "to": st.sampled_from(["vm:vm1", "vm:vm2", "vms", "outside", "host", "label:role=web"]),
        "services": st.lists(
            st.sampled_from(["tcp/80", "udp/53", "icmp", "dhcp", "arp", "any"]),
            min_size=1,
            max_size=2,
            unique=True,
        ),
        "action": st.sampled_from(["allow", "deny", "reject"]),
        "priority": st.integers(0, 2),
    }
)


def _unique(rules: list[dict[str, object]]) -> list[dict[str, object]]:
    seen: dict[object, dict[str, object]] = {}
    for rule in rules:
        r = rule
        if r["action"] == "reject":  # reject applies to IP traffic only
            kept = [x for x in r["services"] if x not in ("arp", "dhcp")]  # type: ignore[attr-defined]
            r = {**r, "services": kept or ["tcp/80"]}
        seen.setdefault(r["id"], r)
    return list(seen.values())


@settings(max_examples=80, deadline=None)
@given(before=st.lists(rule_st, max_size=4), after=st.lists(rule_st, max_size=4))
def test_incremental_resolve_equals_a_full_resolve(
    before: list[dict[str, object]], after: list[dict[str, object]]
) -> None:
    prev = resolve_policy(parse_policy(doc(rules=_unique(before))))
    policy = parse_policy(doc(rules=_unique(after)))
    updated = resolve_update(prev, policy)
    assert updated is not None
    assert updated == resolve_policy(policy)


def test_incremental_resolve_declines_when_vms_change() -> None:
    prev = resolve_policy(parse_policy(doc()))
    changed = doc()
    changed["vms"] = changed["vms"][:1]
    assert resolve_update(prev, parse_policy(changed)) is None


@settings(max_examples=60, deadline=None)
@given(versions=st.lists(st.lists(rule_st, max_size=4), min_size=2, max_size=5))
def test_incremental_resolve_and_cached_compile_equal_a_fresh_compile(
    versions: list[list[dict[str, object]]],
) -> None:
    from hyperfence.ruleset.compile import CompileCache, compile_ruleset

    cache = CompileCache()
    prev = None
    for rules in versions:
        policy = parse_policy(doc(rules=_unique(rules)))
        resolved = (resolve_update(prev, policy) if prev is not None else None) or resolve_policy(policy)
        fresh = compile_ruleset(resolve_policy(policy))
        cached = compile_ruleset(resolved, cache)
        assert cached == fresh
        assert cached.chain_rules() == fresh.chain_rules()
        prev = resolved


UPLINK, LOOPBACK = r("10.78.0.1", "10.78.0.1"), r("127.0.0.0", "127.255.255.255")


def test_host_is_every_address_of_the_host_and_outside_none_of_them() -> None:
    policy = parse_policy(
        doc(
            settings={"host_addresses": ["192.0.2.7"]},
            rules=[
                {"id": "h", "from": "vm:vm1", "to": "host", "services": ["tcp/22"]},
                {"id": "o", "from": "vm:vm1", "to": "outside", "services": ["tcp/22"]},
            ],
        )
    )
    res = resolve_policy(policy, host_addresses=(UPLINK, LOOPBACK))
    gateway, extra = r("10.77.0.1", "10.77.0.1"), r("192.0.2.7", "192.0.2.7")
    assert res.host == (gateway, UPLINK, LOOPBACK, extra)  # the gateway, the kernel's, the setting's
    host, outside = res.vms[0].egress
    assert host.peers == res.host
    for addr in ("10.78.0.1", "192.0.2.7", "127.0.0.1", "10.77.0.1", "10.77.0.12"):
        assert not any(x.first <= A(addr) <= x.last for x in outside.peers), addr
    for addr in ("10.78.0.2", "8.8.8.8", "10.78.0.0", "10.77.4.0"):
        assert any(x.first <= A(addr) <= x.last for x in outside.peers), addr
    # never routed, so never outside: "this network", multicast and the limited broadcast
    for addr in ("0.0.0.1", "224.0.0.251", "239.1.1.1", "255.255.255.255"):
        assert not any(x.first <= A(addr) <= x.last for x in outside.peers), addr
    # without the kernel's addresses (a pure check), `host` is the gateways and the setting's
    assert resolve_policy(policy).host == (gateway, extra)


def test_a_change_of_the_hosts_addresses_is_a_full_resolve() -> None:
    policy = parse_policy(doc(rules=[{"id": "o", "from": "vm:vm1", "to": "outside", "services": ["any"]}]))
    before = resolve_policy(policy, host_addresses=(UPLINK,))
    assert resolve_update(before, policy, host_addresses=(UPLINK, LOOPBACK)) is None
    same = resolve_update(before, policy, host_addresses=(UPLINK,))
    assert same is not None and same.vms == before.vms
