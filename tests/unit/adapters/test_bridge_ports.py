"""Reading link messages (pure: crafted netlink buffers; the kernel side is in tests/netns/firewall/
test_uplinks.py)."""

from __future__ import annotations

import errno
import struct

from hyperfence.adapters.bridge_ports import (
    IFINFOMSG,
    IFLA_IFNAME,
    IFLA_INFO_KIND,
    IFLA_LINKINFO,
    IFLA_MASTER,
    IFLA_PARENT_DEV_BUS_NAME,
    IFLA_PARENT_DEV_NAME,
    RTM_NEWLINK,
    parse_links,
)
from hyperfence.codec.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, attr
from hyperfence.model.ports import BridgePort


def link(name: str, kind: str = "", bus: str = "", dev: str = "") -> bytes:
    body = IFINFOMSG.pack(0, 1, 7, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
    body += attr(IFLA_MASTER, struct.pack("=I", 2)) + attr(12, b"\0" * 30)  # other attributes in between
    if kind:
        body += attr(IFLA_LINKINFO, attr(IFLA_INFO_KIND, kind.encode()))
    if bus:
        body += attr(IFLA_PARENT_DEV_BUS_NAME, bus.encode() + b"\0")
        body += attr(IFLA_PARENT_DEV_NAME, dev.encode() + b"\0")
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), RTM_NEWLINK, 2, 1, 0) + body


def done() -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def test_ports_with_kind_and_parent_and_the_end_of_the_dump() -> None:
    data = link("vp1", "veth") + link("eno1", "", "pci", "0000:00:1f.6") + link("vx0", "vxlan") + done()
    ports, finished, err = parse_links(data, bridge="br0", known=())
    assert (finished, err) == (True, 0)
    assert ports == [
        BridgePort("br0", "vp1", "veth"),
        BridgePort("br0", "eno1", "", "pci 0000:00:1f.6"),
        BridgePort("br0", "vx0", "vxlan"),
    ]


def test_known_ports_are_skipped_and_a_dump_goes_on_until_done() -> None:
    ports, finished, _ = parse_links(link("vp1", "veth") + link("vx0", "vxlan"), bridge="br0", known={"vp1"})
    assert ports == [BridgePort("br0", "vx0", "vxlan")] and not finished


def test_an_error_is_reported_and_a_truncated_buffer_is_never_read_past() -> None:
    error = NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.ENODEV)
    assert parse_links(error, bridge="br0", known=()) == ([], True, errno.ENODEV)
    whole = link("vx0", "vxlan")
    for cut in range(len(whole)):
        ports, finished, err = parse_links(whole[:cut], bridge="br0", known=())
        assert (ports, finished, err) == ([], False, 0)
    # A length field that lies (longer than the buffer) ends the parse too.
    lying = bytearray(whole)
    struct.pack_into("=I", lying, 0, len(whole) + 100)
    assert parse_links(bytes(lying), bridge="br0", known=()) == ([], False, 0)


def test_known_ports_can_be_listed_by_their_name_alone() -> None:
    """What tells which declared VMs are on this host (`Engine(local_only=True)`), at the cost of a name."""
    data = link("vp1", "veth") + link("vx0", "vxlan")
    ports, _, _ = parse_links(data, bridge="br0", known={"vp1"}, list_known=True)
    assert ports == [BridgePort("br0", "vp1"), BridgePort("br0", "vx0", "vxlan")]
