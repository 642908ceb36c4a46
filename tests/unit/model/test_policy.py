"""model/policy.py: the little behaviour the data types carry (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hyperfence.model.policy import (
    DEFAULT_HEARTBEAT,
    AddressRange,
    Heartbeat,
    Network,
    Policy,
    Rule,
    Settings,
    Vm,
)


def test_an_address_range_from_a_network_or_an_address() -> None:
    net = AddressRange.of_network(IPv4Network("10.77.0.0/22"))
    assert net == (IPv4Address("10.77.0.0"), IPv4Address("10.77.3.255"))
    one = AddressRange.single(IPv4Address("10.77.0.5"))
    assert one.first == one.last == IPv4Address("10.77.0.5")


def test_rules_run_by_priority_then_by_their_place_in_the_file() -> None:
    rules = [Rule("b", 0, (), (), ()), Rule("a", 1, (), (), (), priority=10), Rule("c", 2, (), (), ())]
    assert [r.id for r in sorted(rules, key=lambda r: r.order)] == ["a", "b", "c"]


def test_a_heartbeat_is_silent_after_its_misses_of_its_interval() -> None:
    assert Heartbeat("h", (), interval=2.5, misses=4).silent_after == 10.0
    assert DEFAULT_HEARTBEAT.silent_after == 3.0 and DEFAULT_HEARTBEAT.boot_grace == 60.0


def test_lookups_by_name_label_and_ip_set() -> None:
    web = Vm("id-1", "web1", "lab", "vp1", "02:00:00:00:00:01", (), labels=(("tier", "web"),))
    policy = Policy(
        (Network("lab", "br0", IPv4Network("10.77.0.0/22")),),
        (web,),
        ipsets=(("partners", (AddressRange.single(IPv4Address("192.0.2.1")),)),),
    )
    assert policy.vm_by_name("web1") is web and policy.vm_by_name("db1") is None
    assert web.label("tier") == "web" and web.label("env") is None
    assert policy.ipset("partners") == (AddressRange.single(IPv4Address("192.0.2.1")),)
    assert policy.ipset("nobody") is None


def test_the_default_connection_cap_follows_the_setting() -> None:
    cap = Settings(connections_per_vm=100).default_cap
    assert (cap.id, cap.vms, cap.connections) == ("default", (), 100)
    assert Settings().default_cap.connections == 16_384
