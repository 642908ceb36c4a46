"""DHCP messages as a server or client puts them on the wire (IPv4 + UDP + BOOTP), for the tests."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

SERVER_MAC = "02:77:00:00:00:01"
VM_MAC = "02:77:00:00:00:0d"


def dhcp_options(
    msg_type: int | None, *, lease: int | None = 3600, server: str | None = "10.77.0.1"
) -> bytes:
    out = b""
    if msg_type is not None:
        out += bytes([53, 1, msg_type])
    if server is not None:
        out += bytes([54, 4]) + IPv4Address(server).packed
    if lease is not None:
        out += bytes([51, 4]) + struct.pack(">I", lease)
    return out + b"\xff"


def bootp(
    *,
    op: int = 2,
    chaddr: str = VM_MAC,
    yiaddr: str = "10.77.0.13",
    ciaddr: str = "0.0.0.0",
    options: bytes | None = None,
    htype: int = 1,
    hlen: int = 6,
    cookie: bytes = b"\x63\x82\x53\x63",
) -> bytes:
    fixed = struct.pack(
        ">BBBBIHH4s4s4s4s16s",
        op,
        htype,
        hlen,
        0,
        0x1234,
        0,
        0,
        IPv4Address(ciaddr).packed,
        IPv4Address(yiaddr).packed,
        b"\0" * 4,
        b"\0" * 4,
        bytes.fromhex(chaddr.replace(":", "")) + b"\0" * 10,
    )
    return fixed + b"\0" * 192 + cookie + (dhcp_options(5) if options is None else options)


def ip_udp(
    payload: bytes,
    *,
    src: str = "10.77.0.1",
    dst: str = "10.77.0.13",
    sport: int = 67,
    dport: int = 68,
    proto: int = 17,
    frag: int = 0,
) -> bytes:
    udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        frag,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + udp


def ack(**kw: object) -> bytes:
    return ip_udp(bootp(**kw))  # type: ignore[arg-type]
