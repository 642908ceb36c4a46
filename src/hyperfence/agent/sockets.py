"""The guest's TCP and UDP sockets: read once per interval and shared by the resource sample (counts by
state) and the watcher (listeners, new connections).

Two sources, same result (`SocketTable.read`):

- netlink sock_diag (what `ss` uses; standard library `socket.AF_NETLINK`): the default. Measured on a
  2-CPU host with 24 GB of RAM: 0.55 ms for the four tables, against 7.4 ms for /proc/net/tcp + tcp6 + udp +
  udp6 (reading /proc/net/tcp walks the whole established hash table, sized by RAM, once per read() call).
- /proc/net/{tcp,tcp6,udp,udp6}: the fallback when sock_diag is unavailable (a kernel without
  CONFIG_INET_DIAG, or tcp_diag/udp_diag modules that cannot be loaded, as in a minimal initramfs guest),
  and what `read_sockets(root)` reads from a fake tree in tests.

Only addresses, ports, state, uid and inode are read: never queues' contents or payload. Addresses stay raw
bytes (4 or 16) until someone needs them as text (`decode_addr`), which keeps a sample of a busy guest cheap.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
LISTEN = 10
ESTABLISHED = 1
SYN_SENT = 2
MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"
TABLES = (("tcp", "tcp"), ("tcp", "tcp6"), ("udp", "udp"), ("udp", "udp6"))
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_ROOT | NLM_F_MATCH
NLMSG = struct.Struct("=IHHII")
DIAG_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, an empty sockid
DIAG_MSG_LEN = 72  # struct inet_diag_msg
DIAG_PORTS = struct.Struct(">HH")
DIAG_UID_INODE = struct.Struct("=II")
DUMPS = (
    (socket.AF_INET, socket.IPPROTO_TCP, "tcp"),
    (socket.AF_INET6, socket.IPPROTO_TCP, "tcp"),
    (socket.AF_INET, socket.IPPROTO_UDP, "udp"),
    (socket.AF_INET6, socket.IPPROTO_UDP, "udp"),
)


class Sock(NamedTuple):
    proto: str  # "tcp" or "udp"
    local: bytes  # 4 or 16 bytes, network order (see decode_addr)
    lport: int
    remote: bytes
    rport: int
    state: int  # TCP_STATES; UDP: 7 unconnected, 1 connected
    uid: int
    inode: int


class SocketTable:
    """Reads the socket tables through sock_diag when it works, else from /proc/net (decided at the first
    read that fails, then kept). A `root` other than "/" always means /proc/net under that root."""

    def __init__(self, root: str = "/") -> None:
        self.root = root
        self.source = "netlink" if root == "/" else "proc"

    def read(self) -> list[Sock]:
        if self.source == "netlink":
            try:
                return read_sockets_netlink()
            except OSError:
                self.source = "proc"
        return read_sockets(self.root)


def read_sockets_netlink() -> list[Sock]:
    """Every TCP and UDP socket (IPv4 and IPv6) of the agent's network namespace, from netlink sock_diag.
    Raises OSError when the kernel cannot answer (no inet_diag)."""
    out: list[Sock] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        for seq, (family, protocol, proto) in enumerate(DUMPS, start=1):
            req = DIAG_REQ.pack(family, protocol, 0, 0, 0xFFFFFFFF)
            nl.send(NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST_DUMP, seq, 0) + req)
            _read_dump(nl, proto, out)
    return out


def _read_dump(nl: socket.socket, proto: str, out: list[Sock]) -> None:
    while True:
        data = nl.recv(65536)
        if not data:
            raise OSError("sock_diag: empty answer")
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind, _, _, _ = NLMSG.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, offset + NLMSG.size)
                if errno:
                    raise OSError(-errno, f"sock_diag {proto}: {os.strerror(-errno)}")
            elif length >= NLMSG.size + DIAG_MSG_LEN:
                m = offset + NLMSG.size
                family, state = data[m], data[m + 1]
                lport, rport = DIAG_PORTS.unpack_from(data, m + 4)
                size = 4 if family == socket.AF_INET else 16
                uid, inode = DIAG_UID_INODE.unpack_from(data, m + 64)
                out.append(
                    Sock(
                        proto,
                        data[m + 8 : m + 8 + size],
                        lport,
                        data[m + 24 : m + 24 + size],
                        rport,
                        state,
                        uid,
                        inode,
                    )
                )
            if length < NLMSG.size:
                raise OSError("sock_diag: malformed answer")
            offset += (length + 3) & ~3


def read_sockets(root: str = "/") -> list[Sock]:
    """Every TCP and UDP socket (IPv4 and IPv6) from /proc/net under `root`. A table that does not exist
    (no IPv6) is skipped."""
    out: list[Sock] = []
    for proto, table in TABLES:
        try:
            with open(os.path.join(root, "proc/net", table), encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    p = line.split()
                    if len(p) < 10:
                        continue
                    local, lport = p[1].split(":")
                    remote, rport = p[2].split(":")
                    out.append(
                        Sock(
                            proto,
                            _proc_addr(local),
                            int(lport, 16),
                            _proc_addr(remote),
                            int(rport, 16),
                            int(p[3], 16),
                            int(p[7]),
                            int(p[9]),
                        )
                    )
        except FileNotFoundError:
            continue
    return out


def _proc_addr(hexaddr: str) -> bytes:
    """An address as /proc/net/* prints it (each 32-bit word in host byte order) as network-order bytes."""
    return b"".join(struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, len(hexaddr), 8))


def decode_addr(raw: bytes) -> str:
    """An address as text; an IPv4-mapped IPv6 address is shown as IPv4."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if raw[:12] == MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:])
    return socket.inet_ntop(socket.AF_INET6, raw)


def is_zero(raw: bytes) -> bool:
    return not any(raw)
