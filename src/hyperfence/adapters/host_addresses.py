"""The host's own IPv4 addresses in the bridges' namespace: what the `host` selector covers beyond the
policy's gateways (and what `outside` leaves out).

They are read from the namespace's local routing table (table 255, `ip route show table local`), which is
exactly what the kernel takes as its own: its `local` routes are every address of every interface (the
uplink's, the bridges', loopback) and any prefix routed `local` (an "AnyIP" block), its `broadcast` routes
the broadcast addresses of the host's networks, which the host receives too. One netlink dump, ~1 ms.

`AddressWatch` tells when they may have changed: a NETLINK_ROUTE socket subscribed to IPv4 address and
route events. It does not parse them: any event means "read again" (level-triggered).
"""

from __future__ import annotations

import os
import socket
from ipaddress import IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hyperfence.errors import KernelError, NotFoundError
from hyperfence.model.policy import AddressRange
from hyperfence.system.netlink import GroupWatch
from hyperfence.system.netns import NetnsThread, netns_path

RT_TABLE_LOCAL = 255
RTN_LOCAL, RTN_BROADCAST = 2, 3
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40


def _read_local_table() -> tuple[AddressRange, ...]:
    with IPRoute() as ipr:
        routes = ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL)
    out = {
        AddressRange.of_network(IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"))
        for r in routes
        if r["type"] in (RTN_LOCAL, RTN_BROADCAST) and r.get_attr("RTA_DST") is not None
    }
    return tuple(sorted(out))


def read_host_addresses(netns: str | None) -> tuple[AddressRange, ...]:
    """The host's addresses (and broadcast addresses) in namespace `netns` (None: ours), sorted. Raises
    `NotFoundError` (no such namespace) or `KernelError`."""
    if netns is not None and not os.path.exists(netns_path(netns)):
        raise NotFoundError(f"host addresses: netns {netns!r} does not exist (see `ip netns list`)")
    try:
        worker = NetnsThread(netns, name="hyperfence-addrs")
        try:
            return worker.call(_read_local_table)
        finally:
            worker.close()
    except (NetlinkError, OSError, ValueError) as e:
        where = f"netns {netns}" if netns else "this namespace"
        raise KernelError(f"cannot read the host's addresses in {where}: {e}") from None


class AddressWatch(GroupWatch):
    """IPv4 address and route events of namespace `netns` (None: ours)."""

    def __init__(self, netns: str | None) -> None:
        super().__init__(netns, groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE, what="host address events")
