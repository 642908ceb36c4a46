"""Leases and DHCP messages (model/lease.py): frozen values whose numbers and names are contracts (RFC 2132's
message types; the lease source as the store writes it)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address

import pytest

from hyperfence.model.lease import DhcpMessage, DhcpType, Lease, LeaseSource, NetworkLease

IP = IPv4Address("10.0.0.5")


def test_the_dhcp_message_types_are_rfc_2132_s_option_53_values() -> None:
    assert {t.name: int(t) for t in DhcpType} == {
        "DISCOVER": 1,
        "OFFER": 2,
        "REQUEST": 3,
        "DECLINE": 4,
        "ACK": 5,
        "NAK": 6,
        "RELEASE": 7,
        "INFORM": 8,
    }
    assert DhcpType(5) is DhcpType.ACK
    with pytest.raises(ValueError, match="9 is not a valid DhcpType"):
        DhcpType(9)  # not a type: `codec/bootp.py` refuses such a frame


def test_a_lease_source_is_stored_as_its_text() -> None:
    assert [s.value for s in LeaseSource] == ["dhcp", "libvirt"]
    assert LeaseSource("libvirt") is LeaseSource.LIBVIRT and f"{LeaseSource.DHCP}" == "dhcp"


def test_a_lease_defaults_to_an_unknown_server_and_dhcp_and_is_a_frozen_value() -> None:
    lease = Lease("vm1", "02:00:00:00:00:01", IP, expires=2000.0, learned=1000.0)
    assert lease.server is None and lease.source is LeaseSource.DHCP
    assert lease == Lease("vm1", "02:00:00:00:00:01", IP, 2000.0, 1000.0, None, LeaseSource.DHCP)
    assert len({lease, dataclasses.replace(lease)}) == 1  # hashable: kept in sets and tuples
    assert lease != dataclasses.replace(lease, expires=3000.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lease.expires = 0.0  # type: ignore[misc]


def test_a_dhcp_message_and_a_network_lease_are_frozen_values() -> None:
    msg = DhcpMessage(
        op=2,
        type=DhcpType.ACK,
        xid=7,
        ciaddr=IPv4Address("0.0.0.0"),
        yiaddr=IP,
        chaddr="02:00:00:00:00:01",
        lease_time=None,  # option 51 absent
        server_id=None,
        src=IPv4Address("10.0.0.1"),
        dst=IPv4Address("255.255.255.255"),
    )
    assert msg == dataclasses.replace(msg) and msg.lease_time is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.op = 1  # type: ignore[misc]
    forever = NetworkLease("default", "virbr0", "02:00:00:00:00:01", IP, expires=None)  # an infinite lease
    assert forever.expires is None and {f.name for f in dataclasses.fields(forever)} == {
        "network",
        "bridge",
        "mac",
        "ip",
        "expires",
    }  # the guest-chosen hostname and client id are never kept
