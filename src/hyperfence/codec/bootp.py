"""Decode a DHCP message from an IPv4 frame's bytes (from the network header on, as NFLOG copies it). Pure.

Anything on a VM's port is hostile input, a server's answer included (a VM may pose as one; a server may be
broken): every length is checked against the bytes that are really there before it is used, nothing is
read past the end, and a message that is not exactly one well-formed DHCP message is refused whole
(`MalformedDhcpError`, with the reason) rather than half-read. Refused: not IPv4/UDP, a fragment, a packet
cut short by the copy (the options are needed), BOOTP other than Ethernet (htype 1, hlen 6), no magic cookie,
an option running past the end, a missing or duplicated message type or lease time, a wrong-sized option.
The options field and `sname`/`file` overloading (option 52) are not read: nothing needed lives there.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from hyperfence.model.lease import DhcpMessage, DhcpType

MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTP_FIXED = 236  # op .. file: the fixed part of a BOOTP message, before the magic cookie
UDP_HEADER = 8
MAX_OPTIONS = 256  # options read at most (a real message has a few dozen; each costs at least 2 bytes)
OPT_PAD, OPT_END = 0, 255
OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 51, 53, 54

_BOOTP = struct.Struct(
    ">BBBBIHH4s4s4s4s16s"
)  # op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr


class MalformedDhcpError(ValueError):
    """The bytes are not one well-formed DHCP message; the message says why."""


def parse_dhcp(packet: bytes) -> DhcpMessage:
    """The DHCP message in an IPv4/UDP packet (`packet` starts at the IPv4 header), or `MalformedDhcpError`."""
    if len(packet) < 20:
        raise MalformedDhcpError(f"{len(packet)} bytes: shorter than an IPv4 header")
    if packet[0] >> 4 != 4:
        raise MalformedDhcpError(f"IP version {packet[0] >> 4} (expected 4)")
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    if ihl < 20 or total < ihl + UDP_HEADER:
        raise MalformedDhcpError(f"IPv4 header length {ihl} / total length {total} do not hold a UDP header")
    if total > len(packet):
        raise MalformedDhcpError(f"the packet declares {total} bytes but {len(packet)} were copied")
    if int.from_bytes(packet[6:8], "big") & 0x3FFF:
        raise MalformedDhcpError("an IPv4 fragment")
    if packet[9] != 17:
        raise MalformedDhcpError(f"IP protocol {packet[9]} (expected 17, UDP)")
    src, dst = IPv4Address(packet[12:16]), IPv4Address(packet[16:20])
    udp = packet[ihl:total]
    udp_len = int.from_bytes(udp[4:6], "big")
    if not UDP_HEADER <= udp_len <= len(udp):
        raise MalformedDhcpError(
            f"UDP length {udp_len} does not fit the {len(udp)} bytes after the IP header"
        )
    return _bootp(udp[UDP_HEADER:udp_len], src, dst)


def _bootp(data: bytes, src: IPv4Address, dst: IPv4Address) -> DhcpMessage:
    if len(data) < BOOTP_FIXED + len(MAGIC_COOKIE):
        raise MalformedDhcpError(f"{len(data)} bytes of BOOTP: shorter than its fixed part and cookie")
    op, htype, hlen, _, xid, _, _, ciaddr, yiaddr, _, _, chaddr = _BOOTP.unpack_from(data)
    if op not in (1, 2):
        raise MalformedDhcpError(f"BOOTP op {op} (expected 1 or 2)")
    if htype != 1 or hlen != 6:
        raise MalformedDhcpError(f"hardware type {htype} / length {hlen} (expected Ethernet: 1 / 6)")
    if data[BOOTP_FIXED : BOOTP_FIXED + 4] != MAGIC_COOKIE:
        raise MalformedDhcpError("no DHCP magic cookie")
    options = _options(data, BOOTP_FIXED + 4)
    kind = options.get(OPT_MESSAGE_TYPE)
    if kind is None or len(kind) != 1:
        raise MalformedDhcpError("no DHCP message type (option 53 of one byte)")
    try:
        msg_type = DhcpType(kind[0])
    except ValueError:
        raise MalformedDhcpError(f"DHCP message type {kind[0]} is not one of 1..8") from None
    lease = options.get(OPT_LEASE_TIME)
    if lease is not None and len(lease) != 4:
        raise MalformedDhcpError(f"lease time (option 51) of {len(lease)} bytes (expected 4)")
    server = options.get(OPT_SERVER_ID)
    if server is not None and len(server) != 4:
        raise MalformedDhcpError(f"server identifier (option 54) of {len(server)} bytes (expected 4)")
    return DhcpMessage(
        op=op,
        type=msg_type,
        xid=xid,
        ciaddr=IPv4Address(ciaddr),
        yiaddr=IPv4Address(yiaddr),
        chaddr=chaddr[:6].hex(":"),
        lease_time=None if lease is None else int.from_bytes(lease, "big"),
        server_id=None if server is None else IPv4Address(server),
        src=src,
        dst=dst,
    )


def _options(data: bytes, at: int) -> dict[int, bytes]:
    """The options from `at` to the END option (or the end of the data). An option that appears twice is
    refused for the ones learning reads (RFC 3396 would concatenate them: ambiguous for a 4-byte value)."""
    out: dict[int, bytes] = {}
    for _ in range(MAX_OPTIONS):
        if at >= len(data):
            return out
        code = data[at]
        if code == OPT_END:
            return out
        if code == OPT_PAD:
            at += 1
            continue
        if at + 2 > len(data):
            raise MalformedDhcpError(f"option {code} at byte {at}: no length byte")
        length = data[at + 1]
        if at + 2 + length > len(data):
            raise MalformedDhcpError(
                f"option {code} at byte {at}: {length} bytes claimed, {len(data) - at - 2} left"
            )
        if code in out and code in (OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID):
            raise MalformedDhcpError(f"option {code} appears twice")
        out[code] = data[at + 2 : at + 2 + length]
        at += 2 + length
    raise MalformedDhcpError(f"more than {MAX_OPTIONS} options")
