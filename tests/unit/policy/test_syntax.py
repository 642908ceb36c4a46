"""policy/syntax.py: the policy's small languages (names, addresses, ranges, selectors, ports, services) read
and written back: what is written parses to the same value, every refusal names the value and what was
expected (pure; hypothesis draws the values)."""

from __future__ import annotations

import itertools
import re
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.model.policy import AddressRange, PortRange
from hyperfence.policy.syntax import (
    format_range,
    format_selector,
    format_service,
    normalize_ports,
    parse_address_range,
    parse_mac,
    parse_network,
    parse_port_range,
    parse_selector,
    parse_service,
)

addresses = st.integers(0, 2**32 - 1).map(IPv4Address)
ranges = st.tuples(addresses, addresses).map(lambda p: AddressRange(min(p), max(p)))
ports = st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda p: PortRange(min(p), max(p)))


@given(ranges)
def test_an_address_range_reads_back_as_written(rng: AddressRange) -> None:
    assert parse_address_range(format_range(rng)) == rng


def test_a_range_is_written_as_a_prefix_only_when_it_is_one() -> None:
    assert format_range(parse_address_range("10.0.0.0-10.0.0.255")) == "10.0.0.0/24"
    assert format_range(parse_address_range("10.0.0.1-10.0.0.2")) == "10.0.0.1-10.0.0.2"
    assert format_range(parse_address_range(" 10.0.0.7 ")) == "10.0.0.7"


@given(st.lists(ports, max_size=8))
def test_ports_are_kept_as_nft_keeps_them_sorted_and_merged(items: list[PortRange]) -> None:
    once = normalize_ports(tuple(items))
    assert normalize_ports(once) == once
    assert all(a.last + 1 < b.first for a, b in itertools.pairwise(once))
    covered = {p for r in items for p in range(r.first, min(r.last, r.first + 50) + 1)}
    assert all(any(r.first <= p <= r.last for r in once) for p in covered)


@pytest.mark.parametrize(
    "text",
    ["tcp", "udp/53", "tcp/80,443,8000-8080", "icmp", "icmp/8", "icmp/3/4", "proto/47", "arp", "dhcp"],
)
def test_a_service_reads_back_as_written(text: str) -> None:
    svc = parse_service(text)
    assert parse_service(format_service(svc)) == svc


def test_equal_services_compare_equal() -> None:
    assert parse_service("tcp/443,80,81") == parse_service("tcp/80-81,443")
    assert parse_service("proto/6") == parse_service("tcp") and parse_service("proto/1") == parse_service(
        "icmp"
    )
    assert parse_service("icmp/echo-request") == parse_service("icmp/8")


@pytest.mark.parametrize("text", ["vm:web1", "label:tier=web", "vms", "ipset:partners", "host", "outside"])
def test_a_selector_reads_back_as_written(text: str) -> None:
    assert format_selector(parse_selector(text)) == text


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (parse_port_range, 0, "port 0 is out of range (expected 1-65535)"),
        (parse_port_range, "90-80", "range 90-80 is reversed (expected 80-90)"),
        (parse_port_range, True, "is not a port"),
        (parse_address_range, "10.0.0.9-10.0.0.5", "reversed (expected the lower address first"),
        (parse_network, "10.0.0.1/24", "has host bits set (expected the network address, e.g. 10.0.0.0/24)"),
        (parse_mac, "01:00:5e:00:00:01", "is a multicast MAC address"),
        (parse_mac, "52:54:00:12:34", "is not a MAC address"),
        (parse_selector, "vm:", "is not a valid VM name"),
        (parse_selector, "label:tier", "is not a label selector (expected label:KEY=VALUE)"),
        (parse_service, "tcp/http", "is not a port"),
        (parse_service, "icmp/bogus", "is not an ICMP type"),
        (parse_service, "gre", "is not a service"),
    ],
)
def test_a_refusal_names_the_value_and_what_was_expected(parse: object, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(value)  # type: ignore[operator]
