"""DHCP leases that teach hyperfence a VM's addresses, and the DHCP messages they are learned from.

A VM whose policy item has no `ips` learns them (`Vm.learns`): each address a server it may take leases from
acknowledged for it is a `Lease` until the lease ends (or the VM releases it, or a server refuses it). The
daemon keeps leases in its store, so they outlive a restart until they expire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address


class DhcpType(enum.IntEnum):
    """DHCP message types (option 53, RFC 2132 9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


@dataclass(frozen=True)
class DhcpMessage:
    """The fields of one DHCP message that learning needs, taken from a frame (`codec/bootp.py`).

    `op` 1 is a client's request, 2 a server's reply; `chaddr` the client's MAC (lower case, colon
    separated); `lease_time` is option 51 in seconds (None when absent); `server_id` option 54. `src` and
    `dst` are the IP header's addresses."""

    op: int
    type: DhcpType
    xid: int
    ciaddr: IPv4Address
    yiaddr: IPv4Address
    chaddr: str
    lease_time: int | None
    server_id: IPv4Address | None
    src: IPv4Address
    dst: IPv4Address


class LeaseSource(enum.StrEnum):
    DHCP = "dhcp"  # a server's DHCPACK seen on the VM's port
    LIBVIRT = "libvirt"  # a libvirt network's lease list (virNetworkGetDHCPLeases)


@dataclass(frozen=True)
class Lease:
    """`ip` is the VM's (id `vm`, with MAC `mac`) until `expires` (seconds since the epoch). `server` is the
    address of the server that granted it (None when unknown), `learned` when it was (last) seen."""

    vm: str
    mac: str
    ip: IPv4Address
    expires: float
    learned: float
    server: IPv4Address | None = None
    source: LeaseSource = LeaseSource.DHCP


@dataclass(frozen=True)
class NetworkLease:
    """One IPv4 lease from a libvirt network's lease list (`virNetworkGetDHCPLeases`), bounded and checked
    (`codec/libvirt_xml.network_lease`): libvirt's `network`, its bridge (`iface`), the client's `mac`,
    the address, and `expires` (seconds since the epoch; None: libvirt gives no end, an infinite lease).
    The guest-chosen strings of the entry (hostname, client id) are never kept."""

    network: str
    bridge: str
    mac: str
    ip: IPv4Address
    expires: float | None
