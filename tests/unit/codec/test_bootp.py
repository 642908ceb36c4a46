"""The DHCP decoder on what a server sends and on hostile bytes."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.codec.bootp import MalformedDhcpError, parse_dhcp
from hyperfence.model.lease import DhcpType
from tests.unit.adapters.dhcp_frames import VM_MAC, ack, bootp, dhcp_options, ip_udp


def test_an_ack_gives_the_address_the_client_and_the_lease() -> None:
    m = parse_dhcp(ack())
    assert (m.op, m.type, m.chaddr, m.yiaddr, m.lease_time) == (
        2,
        DhcpType.ACK,
        VM_MAC,
        IPv4Address("10.77.0.13"),
        3600,
    )
    assert m.server_id == IPv4Address("10.77.0.1") and m.src == IPv4Address("10.77.0.1")


def test_a_nak_and_a_release_are_read_as_such() -> None:
    assert parse_dhcp(ack(options=dhcp_options(6, lease=None))).type is DhcpType.NAK
    release = parse_dhcp(
        ip_udp(
            bootp(op=1, yiaddr="0.0.0.0", ciaddr="10.77.0.13", options=dhcp_options(7, lease=None)),
            src="10.77.0.13",
            dst="10.77.0.1",
            sport=68,
            dport=67,
        )
    )
    assert (release.op, release.type, release.ciaddr) == (1, DhcpType.RELEASE, IPv4Address("10.77.0.13"))


def test_padding_and_a_missing_end_option_are_fine() -> None:
    assert parse_dhcp(ack(options=b"\0\0" + dhcp_options(5)[:-1])).lease_time == 3600


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "shorter than an IPv4 header"),
        (ack()[:19], "shorter than an IPv4 header"),
        (b"\x65" + ack()[1:], "IP version 6"),
        (ack()[:-10], "were copied"),  # cut short by the copy range: the options are missing
        (ack()[:250], "were copied"),
        (ip_udp(bootp(), proto=6), "IP protocol 6"),
        (ip_udp(bootp(), frag=0x2000), "fragment"),
        (ip_udp(bootp()[:200]), "shorter than its fixed part"),
        (ack(op=3), "BOOTP op 3"),
        (ack(htype=6), "hardware type 6"),
        (ack(hlen=16), "length 16"),
        (ack(cookie=b"\0\0\0\0"), "magic cookie"),
        (ack(options=b"\x35\xff\x05"), "255 bytes claimed"),  # a huge option length
        (ack(options=b"\x0c\x40abc"), "64 bytes claimed"),
        (ack(options=b"\x0c"), "no length byte"),
        (ack(options=dhcp_options(None)), "no DHCP message type"),
        (ack(options=b"\x35\x02\x05\x05\xff"), "no DHCP message type"),
        (ack(options=b"\x35\x01\x63\xff"), "message type 99"),
        (ack(options=dhcp_options(5)[:-1] + b"\x35\x01\x06\xff"), "option 53 appears twice"),
        (ack(options=b"\x35\x01\x05\x33\x02\x00\x01\xff"), "lease time (option 51) of 2 bytes"),
        (ack(options=b"\x35\x01\x05\x36\x03abc\xff"), "server identifier (option 54) of 3 bytes"),
        (ack(options=b"\x35\x01\x05" + b"\x0c\x00" * 300), "more than 256 options"),
    ],
)
def test_hostile_or_broken_frames_are_refused_with_the_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(MalformedDhcpError) as e:
        parse_dhcp(frame)
    assert reason in str(e.value)


def test_a_udp_length_beyond_the_packet_is_refused() -> None:
    frame = bytearray(ack())
    struct.pack_into(">H", frame, 24, 2000)
    with pytest.raises(MalformedDhcpError, match="UDP length 2000"):
        parse_dhcp(bytes(frame))


@given(st.binary(max_size=700))
def test_any_bytes_either_parse_or_are_refused(data: bytes) -> None:
    with contextlib.suppress(MalformedDhcpError):
        parse_dhcp(data)


@given(st.binary(max_size=80))
def test_any_options_either_parse_or_are_refused(options: bytes) -> None:
    with contextlib.suppress(MalformedDhcpError):
        parse_dhcp(ack(options=options))
