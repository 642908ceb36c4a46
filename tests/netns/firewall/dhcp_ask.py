"""Run in a lab VM: broadcast one DHCPDISCOVER naming `chaddr` as the client and print the address offered
(or `NONE` when no offer comes within the timeout). The message is built by hand so that its chaddr can
differ from the interface's MAC, which no DHCP client does.

    python dhcp_ask.py IFACE CHADDR [TIMEOUT]
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from ipaddress import IPv4Address

MAGIC = b"\x63\x82\x53\x63"


def discover(xid: int, chaddr: bytes) -> bytes:
    fixed = struct.pack(
        ">BBBBIHH4s4s4s4s16s64s128s",
        1,  # op: request
        1,  # htype: Ethernet
        6,  # hlen
        0,
        xid,
        0,
        0x8000,  # broadcast: the offer comes to the broadcast address, whatever MAC it names
        bytes(4),
        bytes(4),
        bytes(4),
        bytes(4),
        chaddr.ljust(16, b"\0"),
        bytes(64),
        bytes(128),
    )
    return fixed + MAGIC + bytes([53, 1, 1, 255])


def offered(data: bytes, xid: int) -> str | None:
    """The address of a DHCPOFFER answering `xid`, else None."""
    if len(data) < 240 or data[0] != 2 or struct.unpack_from(">I", data, 4)[0] != xid:
        return None
    if data[236:240] != MAGIC or b"\x35\x01\x02" not in data[240:]:
        return None
    return str(IPv4Address(data[16:20]))


def main() -> None:
    iface, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    xid = int.from_bytes(os.urandom(4), "big")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", 68))
    s.sendto(discover(xid, mac), ("255.255.255.255", 67))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data = s.recv(2048)
        except TimeoutError:
            break
        ip = offered(data, xid)
        if ip is not None:
            print(ip)
            return
    print("NONE")


if __name__ == "__main__":
    main()
