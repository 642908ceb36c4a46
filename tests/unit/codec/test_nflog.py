"""Decoding of nfnetlink_log messages (pure: hand-built netlink buffers, no kernel)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfence.codec.nflog import (
    NetlinkAck,
    NflogBatch,
    NflogPacket,
    parse_nflog,
    parse_nflog_batch,
)

# --- a small encoder for the wire format (the inverse of what the module decodes) ---------------------------

NFLOG_PACKET = 0x0400  # NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
NLMSG_ERROR, NLMSG_DONE = 2, 3
HDR, MARK, TIMESTAMP, INDEV, OUTDEV, PHYSINDEV, PHYSOUTDEV = 1, 2, 3, 4, 5, 6, 7
HWADDR, PAYLOAD, PREFIX, HWTYPE, HWHEADER, HWLEN, VLAN, L2HDR = 8, 9, 10, 15, 16, 17, 20, 21
BRIDGE, IPV4, IPV6 = 7, 2, 10

MAC_A = bytes.fromhex("7a5398eec2ce")
MAC_B = bytes.fromhex("c2aa7e3fec8f")


def nla(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def nlmsg(msg_type: int, body: bytes, *, seq: int = 0, flags: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, msg_type, flags, seq, 0) + body + b"\0" * (-length % 4)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def packet_msg(
    payload: bytes | None,
    *,
    hw_protocol: int = 0x0800,
    hook: int = 2,
    family: int = BRIDGE,
    group: int = 5,
    prefix: bytes | None = b"hf:test",
    extra: bytes = b"",
) -> bytes:
    attrs = nla(HDR, struct.pack(">HBB", hw_protocol, hook, 0))
    if prefix is not None:
        attrs += nla(PREFIX, prefix + b"\0")
    attrs += extra
    if payload is not None:
        attrs += nla(PAYLOAD, payload)
    return nlmsg(NFLOG_PACKET, struct.pack(">BBH", family, 0, group) + attrs)


def ipv4(proto: int, l4: bytes, *, src: str = "10.79.0.11", dst: str = "10.79.0.12", frag: int = 0) -> bytes:
    total = 20 + len(l4)
    return (
        struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            total,
            0x1234,
            frag,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + l4
    )


def ipv6(next_header: int, rest: bytes, *, src: str = "fd00::11", dst: str = "fd00::12") -> bytes:
    return (
        struct.pack(
            ">IHBB16s16s",
            6 << 28,
            len(rest),
            next_header,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + rest
    )


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, data: bytes = b"hello") -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data


def icmp(kind: int, code: int) -> bytes:
    return struct.pack(">BBHHH", kind, code, 0, 1, 1) + b"ping"


def arp(op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    return (
        struct.pack(">HHBBH", 1, 0x0800, 6, 4, op)
        + sha
        + ipaddress.IPv4Address(spa).packed
        + tha
        + ipaddress.IPv4Address(tpa).packed
    )


def only(data: bytes) -> NflogPacket:
    batch = parse_nflog_batch(data)
    assert batch.malformed == 0
    assert len(batch.packets) == 1
    return batch.packets[0]


# --- what the kernel really sent on this host (bridge forward hook, `log prefix ... group 5`) ---------------

KERNEL_BRIDGE_UDP = bytes.fromhex(
    "d400000000040000000000000000000007000005080001000800020014000a0068663a746573743a64656e793a7231"
    "00080006000000000308000400000000020800070000000004080005000000000210000800000600007a5398eec2ce"
    "000006000f000001000006001100000e000012001000c2aa7e3fec8f7a5398eec2ce0800000014000300000000006b"
    "03bf8e000000000009733812001500c2aa7e3fec8f7a5398eec2ce080000002500090045000021b732400040116ee5"
    "0a4f000b0a4f000ca3cf270f000d14d368656c6c6f000000"
)


def test_decodes_a_message_the_kernel_sent() -> None:
    p = only(KERNEL_BRIDGE_UDP)
    assert p == NflogPacket(
        prefix="hf:test:deny:r1",
        family=BRIDGE,
        group=5,
        hook=2,
        hw_protocol=0x0800,
        indev=2,
        outdev=2,
        physindev=3,
        physoutdev=4,
        mac_src="7a:53:98:ee:c2:ce",
        mac_dst="c2:aa:7e:3f:ec:8f",
        timestamp=0x6B03BF8E + 0x97338 / 1e6,
        payload_len=33,
        ip_version=4,
        src="10.79.0.11",
        dst="10.79.0.12",
        protocol=17,
        ip_len=33,
        sport=0xA3CF,
        dport=9999,
    )


# --- one test per payload kind ------------------------------------------------------------------------------


def test_ipv4_tcp() -> None:
    payload = ipv4(6, tcp(40000, 443, 0x12))
    p = only(packet_msg(payload, family=IPV4, hook=1, prefix=b"hf:tcp"))
    assert (p.prefix, p.family, p.hook, p.group, p.hw_protocol) == ("hf:tcp", IPV4, 1, 5, 0x0800)
    assert (p.ip_version, p.src, p.dst, p.protocol) == (4, "10.79.0.11", "10.79.0.12", 6)
    assert (p.sport, p.dport, p.tcp_flags) == (40000, 443, 0x12)
    assert (p.icmp_type, p.icmp_code, p.arp_op) == (None, None, None)
    assert p.payload_len == len(payload) == p.ip_len == 40
    assert (p.indev, p.outdev, p.physindev, p.physoutdev, p.mark, p.timestamp) == (None,) * 6
    assert (p.mac_src, p.mac_dst, p.vlan_id) == (None, None, None)


def test_ipv4_udp() -> None:
    p = only(packet_msg(ipv4(17, udp(5353, 53, b"q" * 10), src="192.0.2.1", dst="198.51.100.7")))
    assert (p.src, p.dst, p.protocol, p.sport, p.dport) == ("192.0.2.1", "198.51.100.7", 17, 5353, 53)
    assert p.tcp_flags is None
    assert p.ip_len == p.payload_len == 38


def test_ipv4_icmp() -> None:
    p = only(packet_msg(ipv4(1, icmp(8, 0))))
    assert (p.protocol, p.icmp_type, p.icmp_code) == (1, 8, 0)
    assert (p.sport, p.dport, p.tcp_flags) == (None, None, None)


def test_arp_request() -> None:
    payload = arp(1, MAC_A, "10.79.0.11", b"\0" * 6, "10.79.0.12")
    p = only(packet_msg(payload, hw_protocol=0x0806, prefix=b"hf:arp"))
    assert (p.hw_protocol, p.arp_op) == (0x0806, 1)
    assert (p.arp_sender_mac, p.arp_sender_ip) == ("7a:53:98:ee:c2:ce", "10.79.0.11")
    assert (p.arp_target_mac, p.arp_target_ip) == ("00:00:00:00:00:00", "10.79.0.12")
    assert (p.ip_version, p.src, p.dst, p.protocol) == (None, None, None, None)
    assert p.payload_len == 28


def test_arp_with_unknown_hardware_only_gives_the_operation() -> None:
    payload = struct.pack(">HHBBH", 6, 0x0800, 6, 4, 2) + b"\0" * 20
    p = only(packet_msg(payload, hw_protocol=0x0806))
    assert p.arp_op == 2
    assert (p.arp_sender_ip, p.arp_sender_mac, p.arp_target_ip, p.arp_target_mac) == (None,) * 4


def test_bridge_message_with_ports_prefix_macs_timestamp_mark_and_vlan() -> None:
    l2 = MAC_B + MAC_A + b"\x08\x00"
    vlan = nla(1, struct.pack(">H", 0x8100)) + nla(2, struct.pack(">H", 0x2000 | 42))
    extra = (
        nla(PHYSINDEV, u32(3))
        + nla(INDEV, u32(2))
        + nla(PHYSOUTDEV, u32(4))
        + nla(OUTDEV, u32(2))
        + nla(MARK, u32(0x10))
        + nla(HWADDR, struct.pack(">HH", 6, 0) + MAC_A + b"\0\0")
        + nla(HWTYPE, struct.pack(">H", 1))
        + nla(HWLEN, struct.pack(">H", 14))
        + nla(HWHEADER, l2)
        + nla(TIMESTAMP, struct.pack(">QQ", 1_700_000_000, 250_000))
        + nla(VLAN | 0x8000, vlan)
        + nla(L2HDR, l2)
    )
    p = only(packet_msg(ipv4(17, udp(1234, 9999)), prefix=b"hf:test:deny:r1", extra=extra, group=7))
    assert (p.prefix, p.family, p.group, p.hook) == ("hf:test:deny:r1", BRIDGE, 7, 2)
    assert (p.indev, p.outdev, p.physindev, p.physoutdev, p.mark) == (2, 2, 3, 4, 0x10)
    assert (p.mac_src, p.mac_dst) == ("7a:53:98:ee:c2:ce", "c2:aa:7e:3f:ec:8f")
    assert p.vlan_id == 42
    assert p.timestamp == pytest.approx(1_700_000_000.25)
    assert (p.sport, p.dport) == (1234, 9999)


def test_macs_fall_back_to_hwheader_then_hwaddr() -> None:
    header = nla(HWTYPE, struct.pack(">H", 1)) + nla(HWHEADER, MAC_B + MAC_A + b"\x08\x00")
    p = only(packet_msg(ipv4(1, icmp(8, 0)), family=IPV4, extra=header))
    assert (p.mac_src, p.mac_dst) == ("7a:53:98:ee:c2:ce", "c2:aa:7e:3f:ec:8f")

    addr = nla(HWADDR, struct.pack(">HH", 6, 0) + MAC_A + b"\0\0")
    p = only(packet_msg(ipv4(1, icmp(8, 0)), family=IPV4, extra=addr))
    assert (p.mac_src, p.mac_dst) == ("7a:53:98:ee:c2:ce", None)

    not_ethernet = nla(HWTYPE, struct.pack(">H", 772)) + nla(HWHEADER, b"\x01" * 14)
    p = only(packet_msg(ipv4(1, icmp(8, 0)), family=IPV4, extra=not_ethernet))
    assert (p.mac_src, p.mac_dst) == (None, None)


def test_ipv6_udp_after_a_hop_by_hop_header() -> None:
    hop_by_hop = bytes([17, 0]) + b"\x01\x04\0\0\0\0"  # next header UDP, length 8, PadN
    p = only(packet_msg(ipv6(0, hop_by_hop + udp(546, 547)), hw_protocol=0x86DD, family=IPV6))
    assert (p.ip_version, p.src, p.dst) == (6, "fd00::11", "fd00::12")
    assert (p.protocol, p.sport, p.dport) == (17, 546, 547)
    assert p.ip_len == 40 + 8 + 13


def test_ipv6_icmpv6_and_non_first_fragment() -> None:
    p = only(packet_msg(ipv6(58, bytes([135, 0, 0, 0])), hw_protocol=0x86DD))
    assert (p.protocol, p.icmp_type, p.icmp_code) == (58, 135, 0)

    later_fragment = bytes([17, 0]) + struct.pack(">HI", 185 << 3, 7)
    p = only(packet_msg(ipv6(44, later_fragment + b"\xaa" * 8), hw_protocol=0x86DD))
    assert (p.protocol, p.sport, p.dport) == (17, None, None)


def test_ipv4_non_first_fragment_has_no_ports() -> None:
    p = only(packet_msg(ipv4(17, b"\x00\x35\x00\x35" + b"x" * 8, frag=0x00B9)))
    assert (p.protocol, p.sport, p.dport) == (17, None, None)


def test_short_copy_gives_addresses_without_ports() -> None:
    full = ipv4(6, tcp(1, 2, 0x02))
    p = only(packet_msg(full[:20]))
    assert (p.src, p.dst, p.protocol, p.ip_len, p.payload_len) == ("10.79.0.11", "10.79.0.12", 6, 40, 20)
    assert (p.sport, p.dport, p.tcp_flags) == (None, None, None)
    p = only(packet_msg(full[:24]))
    assert (p.sport, p.dport, p.tcp_flags) == (1, 2, None)


def test_meta_only_message_and_hw_protocol_zero_falls_back_to_family() -> None:
    p = only(packet_msg(None, prefix=None))
    assert (p.prefix, p.payload_len, p.ip_version) == ("", 0, None)
    p = only(packet_msg(ipv4(17, udp(1, 2)), hw_protocol=0, family=IPV4))
    assert (p.src, p.dport) == ("10.79.0.11", 2)
    p = only(packet_msg(ipv4(17, udp(1, 2)), hw_protocol=0x88B5, family=BRIDGE))
    assert (p.hw_protocol, p.src, p.payload_len) == (0x88B5, None, 33)


def test_prefix_with_invalid_utf8_is_replaced_not_raised() -> None:
    assert only(packet_msg(None, prefix=b"hf:\xff\xfe")).prefix == "hf:\ufffd\ufffd"


def test_batch_with_acks_done_and_unknown_types() -> None:
    ack = nlmsg(NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16, seq=1)
    refused = nlmsg(NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16, seq=2)
    data = (
        ack
        + refused
        + packet_msg(ipv4(17, udp(1, 2)))
        + packet_msg(ipv4(6, tcp(3, 4, 0x10)))
        + nlmsg(0x0401, b"\0" * 4)  # a config message echoed back: not a packet
        + nlmsg(0x7777, b"")
        + nlmsg(NLMSG_DONE, struct.pack("=i", 0))
    )
    batch = parse_nflog_batch(data)
    assert [p.dport for p in batch.packets] == [2, 4]
    assert batch.acks == (NetlinkAck(seq=1, error=0), NetlinkAck(seq=2, error=-1))
    assert (batch.malformed, batch.skipped) == (0, 3)
    assert parse_nflog(data) == list(batch.packets)


# --- broken input: skipped, counted, never raised ------------------------------------------------------------


def test_empty_buffer() -> None:
    assert parse_nflog(b"") == []
    assert parse_nflog_batch(b"") == NflogBatch(packets=())


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"garbage!", b"\xff" * 15, b"\x00" * 16, b"\x00" * 64, bytes(range(256))],
)
def test_garbage_is_counted(data: bytes) -> None:
    batch = parse_nflog_batch(data)
    assert batch.packets == ()
    assert batch.malformed >= 1


def test_every_truncation_of_a_message_is_one_malformed() -> None:
    whole = packet_msg(ipv4(6, tcp(1, 2, 0x02)), extra=nla(PHYSINDEV, u32(3)))
    for cut in range(1, len(whole)):
        batch = parse_nflog_batch(whole[:cut])
        assert (batch.packets, batch.malformed) == ((), 1), cut


def test_good_message_before_a_truncated_one_is_kept() -> None:
    good = packet_msg(ipv4(17, udp(1, 2)))
    batch = parse_nflog_batch(good + good[:30])
    assert len(batch.packets) == 1
    assert batch.malformed == 1


def test_huge_netlink_length_stops_the_buffer() -> None:
    bad = struct.pack("=IHHII", 0xFFFFFFFF, NFLOG_PACKET, 0, 0, 0) + b"\0" * 40
    batch = parse_nflog_batch(packet_msg(ipv4(17, udp(1, 2))) + bad)
    assert (len(batch.packets), batch.malformed) == (1, 1)


def test_huge_attribute_length_skips_only_that_message() -> None:
    hdr = nla(HDR, struct.pack(">HBB", 0x0800, 2, 0))
    bad_attr = struct.pack("=HH", 0xFFFF, PAYLOAD) + b"\0" * 8
    bad = nlmsg(NFLOG_PACKET, struct.pack(">BBH", BRIDGE, 0, 5) + hdr + bad_attr)
    good = packet_msg(ipv4(17, udp(1, 2)))
    batch = parse_nflog_batch(bad + good + bad)
    assert (len(batch.packets), batch.malformed) == (1, 2)


@pytest.mark.parametrize(
    ("attrs", "malformed"),
    [
        (struct.pack("=HH", 4, HDR), 1),  # zero-length packet header
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 4, PHYSINDEV), 1),  # zero-length ifindex
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 4, TIMESTAMP), 1),  # zero-length timestamp
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 0, PREFIX) + b"\0" * 4, 1),  # length 0 < 4
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 4, PREFIX), 0),  # empty prefix is fine
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 4, PAYLOAD), 0),  # empty payload is fine
        (nla(HDR, b"\x08\x00\x02\x00") + struct.pack("=HH", 4, 999), 0),  # unknown attribute: ignored
        (nla(HDR, b"\x08\x00\x02\x00") + nla(VLAN, b"\xff\xff\x01\x00"), 0),  # broken VLAN: no vlan_id
        (b"", 1),  # no packet header at all
    ],
)
def test_zero_length_and_missing_attributes(attrs: bytes, malformed: int) -> None:
    batch = parse_nflog_batch(nlmsg(NFLOG_PACKET, struct.pack(">BBH", BRIDGE, 0, 5) + attrs))
    assert batch.malformed == malformed
    assert len(batch.packets) == 1 - malformed
    for p in batch.packets:
        assert (p.prefix, p.payload_len, p.vlan_id) == ("", 0, None)


def test_short_bodies_are_malformed() -> None:
    assert parse_nflog_batch(nlmsg(NFLOG_PACKET, b"\x07\x00")).malformed == 1
    assert parse_nflog_batch(nlmsg(NLMSG_ERROR, b"\0\0")).malformed == 1


# --- properties ------------------------------------------------------------------------------------------------


@given(st.binary(max_size=2048))
@settings(max_examples=2000)
def test_random_bytes_never_raise(data: bytes) -> None:
    batch = parse_nflog_batch(data)
    assert batch.malformed + batch.skipped + len(batch.packets) + len(batch.acks) >= (1 if data else 0)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=80)), max_size=12), st.integers(0, 255))
@settings(max_examples=1000)
def test_any_well_framed_packet_message_is_a_packet_or_one_malformed(
    attrs: list[tuple[int, bytes]], family: int
) -> None:
    body = struct.pack(">BBH", family, 0, 5) + b"".join(nla(kind, value) for kind, value in attrs)
    batch = parse_nflog_batch(nlmsg(NFLOG_PACKET, body))
    assert len(batch.packets) + batch.malformed == 1


@given(st.binary(min_size=1, max_size=400), st.data())
@settings(max_examples=1000)
def test_corrupted_real_messages_never_raise(noise: bytes, data: st.DataObject) -> None:
    base = bytearray(
        KERNEL_BRIDGE_UDP + packet_msg(arp(1, MAC_A, "10.0.0.1", MAC_B, "10.0.0.2"), hw_protocol=0x0806)
    )
    at = data.draw(st.integers(0, len(base) - 1))
    base[at : at + len(noise)] = noise
    parse_nflog_batch(bytes(base))


@given(
    st.sampled_from([6, 17, 132, 136, 33]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.ip_addresses(v=4),
    st.ip_addresses(v=4),
)
def test_ports_and_addresses_round_trip(
    proto: int, sport: int, dport: int, src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address
) -> None:
    p = only(packet_msg(ipv4(proto, tcp(sport, dport, 0x18), src=str(src), dst=str(dst))))
    assert (p.src, p.dst, p.protocol, p.sport, p.dport) == (str(src), str(dst), proto, sport, dport)
    assert p.tcp_flags == (0x18 if proto == 6 else None)
