"""Decode nfnetlink_log (NFLOG) netlink messages into frozen `NflogPacket`s — pure, no I/O.

`parse_nflog_batch(data)` takes the bytes of one or more `recv()`s on a NETLINK_NETFILTER socket and
returns the packets, the netlink ACKs (for the reader's config requests) and two counters:

* `malformed` — bytes that claim to be netlink/NFLOG but are broken: a netlink header shorter than 16 bytes
  or longer than the buffer, an attribute whose length runs past its message, a packet message without its
  `NFULA_PACKET_HDR`, a fixed-size attribute of the wrong size, trailing garbage. Such a message is skipped
  whole (a security log must not invent fields); when the netlink framing itself is broken the rest of the
  buffer is unreadable and counts as one more malformed unit.
* `skipped` — well-formed messages that are not packets: `NLMSG_NOOP`, `NLMSG_DONE` (the kernel ends each
  batch it flushes with one), `NLMSG_OVERRUN`, and any message type we do not know.

Nothing in here raises on any input: every byte string is a valid argument (a hypothesis test checks it).

What the kernel (6.x, measured on this host) puts in a message, by where the rule sits:

* **bridge family** (`table bridge`, family 7), forward hook: `PACKET_HDR`, `PREFIX`, `IFINDEX_PHYSINDEV` (the
  bridge *port* the frame came in on), `IFINDEX_INDEV` (the *bridge* itself), `IFINDEX_PHYSOUTDEV` /
  `IFINDEX_OUTDEV` (same, outgoing; absent at prerouting/input), `HWADDR` (source MAC), `HWTYPE` (1),
  `HWLEN` (14), `HWHEADER` (dst MAC, src MAC, ethertype), `TIMESTAMP`, `L2HDR` (the full L2 header, bridge
  family only; with a VLAN tag also `VLAN`), `PAYLOAD` starting at the **network** header (IP or ARP), and at
  prerouting for locally-sent traffic `UID`/`GID`. So both MAC addresses are available for bridged frames.
* **inet family through br_netfilter** (family 2/10): `INDEV` is the bridge, `PHYSINDEV`/`PHYSOUTDEV` the
  ports; `HWADDR`/`HWHEADER` but no `L2HDR`.
* locally generated packets at output/postrouting carry no hardware header: the MACs are `None` then.

MACs are taken from `L2HDR`, else `HWHEADER` (when it is an Ethernet header), else `HWADDR` (source only).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass, field

# --- netlink / nfnetlink constants (linux/netlink.h, linux/netfilter/nfnetlink*.h) -------------------------

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host byte order)
NLMSG_HDRLEN = NLMSG_HDR.size
NLA_HDR = struct.Struct("=HH")  # len, type
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFLOG_PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET

NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_HWTYPE = 15
NFULA_HWHEADER = 16
NFULA_HWLEN = 17
NFULA_VLAN = 20
NFULA_L2HDR = 21

NFULA_VLAN_PROTO = 1
NFULA_VLAN_TCI = 2

NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_ARP = 3
NFPROTO_NETDEV = 5
NFPROTO_BRIDGE = 7
NFPROTO_IPV6 = 10

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARPHRD_ETHER = 1
ETH_HLEN = 14

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
# Transport protocols whose first four bytes are source and destination port.
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE})
# IPv6 extension headers walked to find the transport header: hop-by-hop, routing, destination options.
_IPV6_EXT_OPTS = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_PORTS = struct.Struct(">HH")
_PACKET_HDR = struct.Struct(">HB")  # hw_protocol, hook (then one pad byte)
_TIMESTAMP = struct.Struct(">QQ")  # sec, usec
_IPV4_FIXED = struct.Struct(">BBHHHBBH4s4s")
_IPV6_FIXED = struct.Struct(">IHBB16s16s")
_ARP_FIXED = struct.Struct(">HHBBH")
_NLMSGERR = struct.Struct("=i")


@dataclass(frozen=True, slots=True, kw_only=True)
class NflogPacket:
    """One packet the kernel logged to an NFLOG group.

    Metadata (from netlink attributes): `prefix` is the rule's `log prefix` (UTF-8, invalid bytes replaced);
    `family` the netfilter family of the logging rule (7 bridge, 2 IPv4, 10 IPv6, 3 ARP, 5 netdev); `group`
    the NFLOG group; `hook` the hook number within that family (bridge and inet alike: 0 prerouting,
    1 input, 2 forward, 3 output, 4 postrouting); `hw_protocol` the ethertype (`skb->protocol`). Interface
    fields are ifindexes in the logging namespace, `None` when absent: in the bridge family `physindev` /
    `physoutdev` are the bridge *ports* and `indev` / `outdev` the bridge. `mark` is the packet mark when
    non-zero (the kernel omits a zero mark). `mac_src` / `mac_dst` are lower-case `aa:bb:..` strings when the
    kernel sent a hardware header. `vlan_id` is the 802.1Q VID when the bridge saw a tag. `timestamp` is the
    receive time in seconds since the epoch (`NFULA_TIMESTAMP`), `None` when the kernel gave none.

    Payload (decoded from `NFULA_PAYLOAD`, which starts at the network header): `payload_len` is how many
    bytes the kernel copied (at most the copy range). Every decoded field is `None` when the payload is not
    of that kind or too short to hold it — a short copy range yields addresses without ports, never an
    error. `ip_version` 4 or 6; `src` / `dst` addresses as `ipaddress` prints them; `protocol` the transport
    protocol number (after IPv6 extension headers); `ip_len` the length the IP header declares (the real
    packet size even when the copy was cut short); `sport` / `dport` for TCP, UDP, UDP-Lite, SCTP and DCCP;
    `tcp_flags` the TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, ECE 0x40,
    CWR 0x80); `icmp_type` / `icmp_code` for ICMP and ICMPv6. Ports and flags are only decoded from the first
    fragment. For Ethernet/IPv4 ARP: `arp_op` (1 request, 2 reply) and the sender/target IP and MAC.
    """

    prefix: str
    family: int
    group: int
    hook: int
    hw_protocol: int
    indev: int | None = None
    outdev: int | None = None
    physindev: int | None = None
    physoutdev: int | None = None
    mark: int | None = None
    mac_src: str | None = None
    mac_dst: str | None = None
    vlan_id: int | None = None
    timestamp: float | None = None
    payload_len: int = 0
    ip_version: int | None = None
    src: str | None = None
    dst: str | None = None
    protocol: int | None = None
    ip_len: int | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    arp_op: int | None = None
    arp_sender_ip: str | None = None
    arp_sender_mac: str | None = None
    arp_target_ip: str | None = None
    arp_target_mac: str | None = None
    # The copied bytes themselves (from the network header on), for readers that decode more (DHCP learning).
    payload: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class NetlinkAck:
    """An `NLMSG_ERROR` message: the kernel's answer to request `seq`; `error` is 0 or a negative errno."""

    seq: int
    error: int


@dataclass(frozen=True, slots=True)
class NflogBatch:
    """Everything decoded from one buffer: packets in arrival order, ACKs, and what was not a packet."""

    packets: tuple[NflogPacket, ...]
    acks: tuple[NetlinkAck, ...] = ()
    malformed: int = 0
    skipped: int = 0


class _MalformedError(Exception):
    """Internal: the message is broken and must be skipped whole. Never leaves this module."""


class _Payload:
    """Scratch space the payload decoders fill in; copied into the frozen `NflogPacket` at the end."""

    __slots__ = (
        "arp_op",
        "arp_sender_ip",
        "arp_sender_mac",
        "arp_target_ip",
        "arp_target_mac",
        "dport",
        "dst",
        "icmp_code",
        "icmp_type",
        "ip_len",
        "ip_version",
        "protocol",
        "sport",
        "src",
        "tcp_flags",
    )

    def __init__(self) -> None:
        self.ip_version: int | None = None
        self.src: str | None = None
        self.dst: str | None = None
        self.protocol: int | None = None
        self.ip_len: int | None = None
        self.sport: int | None = None
        self.dport: int | None = None
        self.tcp_flags: int | None = None
        self.icmp_type: int | None = None
        self.icmp_code: int | None = None
        self.arp_op: int | None = None
        self.arp_sender_ip: str | None = None
        self.arp_sender_mac: str | None = None
        self.arp_target_ip: str | None = None
        self.arp_target_mac: str | None = None


def parse_nflog(data: bytes | bytearray | memoryview) -> list[NflogPacket]:
    """The NFLOG packets in `data` (a buffer of netlink messages), in order. Never raises.

    Broken and non-packet messages are dropped; use `parse_nflog_batch` to learn how many.
    """
    return list(parse_nflog_batch(data).packets)


def parse_nflog_batch(data: bytes | bytearray | memoryview) -> NflogBatch:
    """Decode every netlink message in `data`; never raises, whatever the bytes (see the module docstring)."""
    if not isinstance(data, bytes):
        data = bytes(data)  # bytearray / memoryview from a recv_into buffer
    packets: list[NflogPacket] = []
    acks: list[NetlinkAck] = []
    malformed = 0
    skipped = 0
    end = len(data)
    off = 0
    while off < end:
        if end - off < NLMSG_HDRLEN:
            malformed += 1  # trailing bytes too short for a header
            break
        length, msg_type, _flags, seq, _portid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDRLEN or length > end - off:
            malformed += 1  # framing is lost: nothing after this can be located
            break
        body = off + NLMSG_HDRLEN
        if msg_type == NFLOG_PACKET_TYPE:
            try:
                packets.append(_parse_packet_message(data, body, off + length))
            except _MalformedError:
                malformed += 1
        elif msg_type == NLMSG_ERROR:
            if length - NLMSG_HDRLEN >= _NLMSGERR.size:
                acks.append(NetlinkAck(seq=seq, error=_NLMSGERR.unpack_from(data, body)[0]))
            else:
                malformed += 1
        else:
            skipped += 1  # NOOP, DONE, OVERRUN, config echoes, types we do not know
        off += (length + 3) & ~3
    return NflogBatch(packets=tuple(packets), acks=tuple(acks), malformed=malformed, skipped=skipped)


def _parse_attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """Attribute type -> value for the attributes in `data[off:end]` (the last one wins on repeats)."""
    attrs: dict[int, bytes] = {}
    unpack = NLA_HDR.unpack_from
    while end - off >= 4:
        nla_len, nla_type = unpack(data, off)
        if nla_len < 4 or nla_len > end - off:
            raise _MalformedError
        attrs[nla_type & NLA_TYPE_MASK] = data[off + 4 : off + nla_len]
        off += (nla_len + 3) & ~3
    # Fewer than 4 bytes left over can only be padding; the kernel's own nla_parse tolerates it too.
    return attrs


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) != 4:
        raise _MalformedError
    return int.from_bytes(value, "big")


def _parse_packet_message(data: bytes, off: int, end: int) -> NflogPacket:
    if end - off < 4:
        raise _MalformedError  # no room for struct nfgenmsg
    family = data[off]
    group = (data[off + 2] << 8) | data[off + 3]
    attrs = _parse_attrs(data, off + 4, end)

    hdr = attrs.get(NFULA_PACKET_HDR)
    if hdr is None or len(hdr) != 4:
        raise _MalformedError
    hw_protocol, hook = _PACKET_HDR.unpack_from(hdr)

    timestamp: float | None = None
    raw_ts = attrs.get(NFULA_TIMESTAMP)
    if raw_ts is not None:
        if len(raw_ts) != _TIMESTAMP.size:
            raise _MalformedError
        sec, usec = _TIMESTAMP.unpack(raw_ts)
        timestamp = sec + usec / 1e6

    indev = _u32(attrs, NFULA_IFINDEX_INDEV)
    outdev = _u32(attrs, NFULA_IFINDEX_OUTDEV)
    physindev = _u32(attrs, NFULA_IFINDEX_PHYSINDEV)
    physoutdev = _u32(attrs, NFULA_IFINDEX_PHYSOUTDEV)
    mark = _u32(attrs, NFULA_MARK)

    raw_prefix = attrs.get(NFULA_PREFIX)
    prefix = "" if raw_prefix is None else raw_prefix.split(b"\0", 1)[0].decode("utf-8", "replace")

    mac_src, mac_dst = _macs(attrs)
    raw_vlan = attrs.get(NFULA_VLAN)
    vlan_id = None if raw_vlan is None else _vlan_id(raw_vlan)

    payload = attrs.get(NFULA_PAYLOAD)
    d = _Payload()
    if payload is not None:
        # hw_protocol is 0 for some locally generated packets: fall back to the rule's family then.
        if hw_protocol in (ETH_P_IP, ETH_P_IPV6) or (
            hw_protocol == 0 and family in (NFPROTO_IPV4, NFPROTO_IPV6)
        ):
            _decode_ip(payload, d)
        elif hw_protocol == ETH_P_ARP or (hw_protocol == 0 and family == NFPROTO_ARP):
            _decode_arp(payload, d)

    return NflogPacket(
        prefix=prefix,
        family=family,
        group=group,
        hook=hook,
        hw_protocol=hw_protocol,
        indev=indev,
        outdev=outdev,
        physindev=physindev,
        physoutdev=physoutdev,
        mark=mark,
        mac_src=mac_src,
        mac_dst=mac_dst,
        vlan_id=vlan_id,
        timestamp=timestamp,
        payload_len=0 if payload is None else len(payload),
        ip_version=d.ip_version,
        src=d.src,
        dst=d.dst,
        protocol=d.protocol,
        ip_len=d.ip_len,
        sport=d.sport,
        dport=d.dport,
        tcp_flags=d.tcp_flags,
        icmp_type=d.icmp_type,
        icmp_code=d.icmp_code,
        arp_op=d.arp_op,
        arp_sender_ip=d.arp_sender_ip,
        arp_sender_mac=d.arp_sender_mac,
        arp_target_ip=d.arp_target_ip,
        arp_target_mac=d.arp_target_mac,
        payload=b"" if payload is None else payload,
    )


def _macs(attrs: dict[int, bytes]) -> tuple[str | None, str | None]:
    """(source, destination) MAC from L2HDR, else an Ethernet HWHEADER, else HWADDR (source only)."""
    l2 = attrs.get(NFULA_L2HDR)
    if l2 is not None and len(l2) >= 12:
        return _mac(l2[6:12]), _mac(l2[0:6])
    hwheader = attrs.get(NFULA_HWHEADER)
    if hwheader is not None and len(hwheader) >= ETH_HLEN:
        hwtype = attrs.get(NFULA_HWTYPE)
        if hwtype is None or (len(hwtype) >= 2 and _BE16.unpack_from(hwtype)[0] == ARPHRD_ETHER):
            return _mac(hwheader[6:12]), _mac(hwheader[0:6])
    hwaddr = attrs.get(NFULA_HWADDR)
    if hwaddr is not None and len(hwaddr) >= 4:
        addrlen = _BE16.unpack_from(hwaddr)[0]
        if 0 < addrlen <= len(hwaddr) - 4:
            return _mac(hwaddr[4 : 4 + addrlen]), None
    return None, None


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def _vlan_id(nested: bytes) -> int | None:
    try:
        inner = _parse_attrs(nested, 0, len(nested))
    except _MalformedError:
        return None  # a broken optional nested attribute costs the VLAN id, not the packet
    tci = inner.get(NFULA_VLAN_TCI)
    if tci is None or len(tci) < 2:
        return None
    return int(_BE16.unpack_from(tci)[0] & 0x0FFF)


def _ipv4_str(raw: bytes) -> str:
    # Same text as str(ipaddress.IPv4Address(raw)), without the object: this runs twice per packet.
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


@functools.lru_cache(maxsize=4096)
def _ipv6_str(raw: bytes) -> str:
    # ipaddress's compressed text costs microseconds; a VM's few addresses repeat in every packet.
    return str(ipaddress.IPv6Address(raw))


def _decode_ip(p: bytes, out: _Payload) -> None:
    if not p:
        return
    version = p[0] >> 4
    if version == 4:
        if len(p) < _IPV4_FIXED.size:
            return
        ver_ihl, _tos, total_len, _id, frag, _ttl, proto, _csum, src, dst = _IPV4_FIXED.unpack_from(p)
        ihl = (ver_ihl & 0x0F) * 4
        out.ip_version, out.src, out.dst = 4, _ipv4_str(src), _ipv4_str(dst)
        out.protocol, out.ip_len = proto, total_len
        if ihl < _IPV4_FIXED.size or frag & 0x1FFF:
            return  # bad header length, or not the first fragment: no transport header here
        _decode_l4(p, ihl, proto, out)
    elif version == 6:
        if len(p) < _IPV6_FIXED.size:
            return
        _vtf, plen, next_header, _hop, src6, dst6 = _IPV6_FIXED.unpack_from(p)
        out.ip_version = 6
        out.src = _ipv6_str(src6)
        out.dst = _ipv6_str(dst6)
        out.ip_len = _IPV6_FIXED.size + plen
        off = _IPV6_FIXED.size
        first_fragment = True
        # Walk extension headers; stop at the transport header or when the copy runs out.
        for _ in range(8):
            if next_header in _IPV6_EXT_OPTS or next_header == _IPV6_AH:
                if len(p) < off + 2:
                    return  # the copy ends inside the extension headers: transport unknown
                ext_len = (p[off + 1] + 2) * 4 if next_header == _IPV6_AH else (p[off + 1] + 1) * 8
                next_header = p[off]
                off += ext_len
            elif next_header == _IPV6_FRAGMENT:
                if len(p) < off + 8:
                    return
                first_fragment = (_BE16.unpack_from(p, off + 2)[0] >> 3) == 0
                next_header = p[off]
                off += 8
            else:
                break
        out.protocol = next_header
        if first_fragment:
            _decode_l4(p, off, next_header, out)


def _decode_l4(p: bytes, off: int, proto: int, out: _Payload) -> None:
    if proto in PORT_PROTOCOLS:
        if len(p) >= off + 4:
            out.sport, out.dport = _PORTS.unpack_from(p, off)
        if proto == IPPROTO_TCP and len(p) >= off + 14:
            out.tcp_flags = p[off + 13]
    elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and len(p) >= off + 2:
        out.icmp_type = p[off]
        out.icmp_code = p[off + 1]


def _decode_arp(p: bytes, out: _Payload) -> None:
    if len(p) < _ARP_FIXED.size:
        return
    htype, ptype, hlen, plen, op = _ARP_FIXED.unpack_from(p)
    out.arp_op = op
    if htype != ARPHRD_ETHER or ptype != ETH_P_IP or hlen != 6 or plen != 4 or len(p) < 28:
        return  # not Ethernet/IPv4 ARP, or cut short: the operation is all we can say
    out.arp_sender_mac = _mac(p[8:14])
    out.arp_sender_ip = _ipv4_str(p[14:18])
    out.arp_target_mac = _mac(p[18:24])
    out.arp_target_ip = _ipv4_str(p[24:28])
