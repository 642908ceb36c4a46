"""The ports of the managed bridges as the kernel lists them (`ip -d link show master BRIDGE`), for the check
that no network device on a bridge is left undeclared (`policy/uplinks.py`).

Raw NETLINK_ROUTE, stdlib only, in the bridges' namespace: one RTM_GETLINK request per bridge for its index,
then one dump of the links whose master it is (the kernel filters by IFLA_MASTER; statistics are skipped).
Per port: its name, its kind (IFLA_LINKINFO / IFLA_INFO_KIND: `tun`, `veth`, `vxlan`, ...) and its parent
device on a bus (IFLA_PARENT_DEV_BUS_NAME / _NAME, Linux 5.16+: what makes a device without a kind a
physical NIC; read from netlink because /sys/class/net shows the namespace that mounted /sys, not the
bridges'). Ports named in `known` (the declared VMs' ports and uplinks) are skipped after their name, or
listed by their name alone (`list_known`: which declared VMs are on this host), so at 1,000 VMs the read
costs ~3 ms, nearly all of it the kernel's (pyroute2 took 0.44 s for the same dump).

`LinkWatch` tells when the ports may have changed: the RTNLGRP_LINK events of the namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection, Iterable

from hyperfence.codec.netlink import NLA_HDR, NLMSG_HDR, attr, attrs, split_dump
from hyperfence.errors import KernelError
from hyperfence.model.ports import BridgePort
from hyperfence.system.netlink import NETLINK_ROUTE, GroupWatch
from hyperfence.system.netlink import netfilter_socket as open_netlink

RTM_NEWLINK, RTM_GETLINK = 16, 18
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_EXT_MASK = 3, 10, 18, 29
IFLA_PARENT_DEV_NAME, IFLA_PARENT_DEV_BUS_NAME = 56, 57
IFLA_INFO_KIND = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3
RTMGRP_LINK = 0x1
RECV = 1 << 20
TIMEOUT = 5.0


def _request(msg_type: int, flags: int, seq: int, index: int, extra: bytes) -> bytes:
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    body += attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS)) + extra
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0) + body


def _text(value: bytes | None) -> str:
    return (value or b"").split(b"\0", 1)[0].decode(errors="replace")


def _name_of(data: bytes, off: int, end: int) -> str | None:
    """The IFLA_IFNAME of one link message's attributes (data[off:end]), looked for without parsing the
    rest (the kernel puts it first)."""
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > end:
            return None
        if kind & 0x3FFF == IFLA_IFNAME:
            return _text(data[off + NLA_HDR.size : off + length])
        off += (length + 3) & ~3
    return None


def parse_links(
    data: bytes, *, bridge: str, known: Collection[str], list_known: bool = False
) -> tuple[list[BridgePort], bool, int]:
    """(ports, done, errno) from one receive buffer of a link dump or get; a port named in `known` is
    skipped, or listed by its name alone with `list_known`. Never reads past the buffer."""
    ports: list[BridgePort] = []
    messages, done, err = split_dump(data)
    for msg_type, payload, end in messages:
        start = payload + IFINFOMSG.size
        if msg_type == RTM_NEWLINK and start <= end:
            name = _name_of(data, start, end)
            if name is not None and name in known:
                if list_known:
                    ports.append(BridgePort(bridge, name))
            elif name is not None:
                a = attrs(data, start, end)
                info = a.get(IFLA_LINKINFO, b"")
                kind = _text(attrs(info, 0, len(info)).get(IFLA_INFO_KIND))
                bus, dev = _text(a.get(IFLA_PARENT_DEV_BUS_NAME)), _text(a.get(IFLA_PARENT_DEV_NAME))
                parent = f"{bus} {dev}".strip()
                ports.append(BridgePort(bridge, name, kind, parent))
    return ports, done, err


def _index(sock: socket.socket, bridge: str, seq: int) -> int | None:
    """The bridge's ifindex; None when there is no such link (a bridge that is not there has no ports)."""
    sock.send(_request(RTM_GETLINK, 0, seq, 0, attr(IFLA_IFNAME, bridge.encode() + b"\0")))
    data = sock.recv(RECV)
    if len(data) >= NLMSG_HDR.size + IFINFOMSG.size:
        _, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, 0)
        if msg_type == RTM_NEWLINK:
            return int(IFINFOMSG.unpack_from(data, NLMSG_HDR.size)[2])
    _, _, err = parse_links(data, bridge=bridge, known=())
    if err in (errno.ENODEV, errno.ENOENT, 0):
        return None
    raise KernelError(f"bridge ports: looking up bridge {bridge} failed: {os.strerror(err)}")


def _ports(
    sock: socket.socket, bridge: str, index: int, seq: int, *, known: Collection[str], list_known: bool
) -> list[BridgePort]:
    sock.send(_request(RTM_GETLINK, NLM_F_DUMP, seq, 0, attr(IFLA_MASTER, struct.pack("=I", index))))
    out: list[BridgePort] = []
    while True:
        ports, done, err = parse_links(sock.recv(RECV), bridge=bridge, known=known, list_known=list_known)
        out.extend(ports)
        if err:
            raise KernelError(f"bridge ports: listing the ports of {bridge} failed: {os.strerror(err)}")
        if done:
            return out


def read_bridge_ports(
    netns: str | None, bridges: Iterable[str], *, known: Collection[str] = (), list_known: bool = False
) -> tuple[BridgePort, ...]:
    """The ports of `bridges` in namespace `netns` (None: ours), except those named in `known` (listed by
    their name alone with `list_known`). A bridge that does not exist has none. Raises `NotFoundError` (no such namespace), `PermissionDeniedError`
    (entering it needs root) or `KernelError`."""
    sock = open_netlink(netns, what="bridge ports", protocol=NETLINK_ROUTE)
    try:
        sock.settimeout(TIMEOUT)
        out: list[BridgePort] = []
        for seq, bridge in enumerate(sorted(set(bridges)), start=1):
            index = _index(sock, bridge, 2 * seq)
            if index is not None:
                out.extend(_ports(sock, bridge, index, 2 * seq + 1, known=known, list_known=list_known))
        return tuple(out)
    except OSError as e:
        raise KernelError(f"bridge ports: {e.strerror or e}") from None
    finally:
        sock.close()


class LinkWatch(GroupWatch):
    """Link events (a port added to or taken off a bridge, a device created or deleted) of `netns`."""

    def __init__(self, netns: str | None) -> None:
        super().__init__(netns, groups=RTMGRP_LINK, what="link events")
