"""Read the host's connection tracking table (a ctnetlink dump) in one network namespace, stdlib only.

Only what `hyperfence vm list` needs: the original direction's IPv4 source and destination of every tracked
connection, counted per address pair (a flood from one VM to one peer is one pair, however many entries).
The dump is filtered by the kernel to IPv4 (`nfgenmsg.family = AF_INET`) and needs CAP_NET_ADMIN in the
namespace. Why not pyroute2's conntrack dump: it decodes every attribute of every entry into Python objects,
far slower on a full table (262,144 entries by default) than reading the three attributes we use.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter

from hyperfence.adapters.netns import NetnsThread
from hyperfence.errors import KernelError, PermissionDeniedError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 1, 1, 2
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
RECV_BYTES = 1 << 18
TIMEOUT_S = 10.0
# More entries than any conntrack table holds (nf_conntrack_max is at most a few million): a dump that
# goes beyond is not ending, and is stopped rather than read forever.
MAX_ENTRIES = 1 << 24

AddressPairs = Counter[tuple[bytes, bytes]]


def read_address_pairs(netns: str | None) -> AddressPairs:
    """(original source, original destination) of every tracked IPv4 connection in `netns` (None: ours),
    as 4-byte addresses, counted. Raises `PermissionDeniedError` without CAP_NET_ADMIN, `KernelError` if
    the dump fails."""
    worker = NetnsThread(netns, name="hyperfence-conntrack")
    try:
        return worker.call(_dump)
    finally:
        worker.close()


def _dump() -> AddressPairs:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise KernelError(f"conntrack: cannot open a netfilter netlink socket: {e.strerror}") from None
    with sock:
        sock.settimeout(TIMEOUT_S)
        header = _NLMSG.pack(
            _NLMSG.size + 4,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            0,
        )
        pairs: AddressPairs = Counter()
        seen = 0
        try:
            sock.sendto(header + struct.pack("=BBH", socket.AF_INET, 0, 0), (0, 0))
            while True:
                done, n = parse_dump_chunk(sock.recv(RECV_BYTES), pairs)
                seen += n
                if done:
                    return pairs
                if seen > MAX_ENTRIES:
                    raise KernelError(f"conntrack: the dump did not end after {MAX_ENTRIES} entries")
        except PermissionError:
            raise PermissionDeniedError(
                "conntrack: reading the connection tracking table needs CAP_NET_ADMIN (run as root)"
            ) from None
        except TimeoutError:
            raise KernelError(f"conntrack: the dump gave no answer for {TIMEOUT_S:g} s") from None
        except OSError as e:
            raise KernelError(f"conntrack: dump failed: {e.strerror}") from None


def parse_dump_chunk(data: bytes, pairs: AddressPairs) -> tuple[bool, int]:
    """Add the address pairs of one datagram of a ctnetlink dump to `pairs`: (is the dump done, how many
    messages it held). A netlink error message raises (EPERM as `PermissionError`, like the socket calls)."""
    off = n = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            raise KernelError(f"conntrack: malformed netlink message (length {length})")
        if kind == NLMSG_DONE:
            return True, n
        if kind == NLMSG_ERROR:
            if length < _NLMSG.size + 4:
                raise KernelError(f"conntrack: malformed netlink error message (length {length})")
            (code,) = struct.unpack_from("=i", data, off + _NLMSG.size)
            if code == -errno.EPERM:
                raise PermissionError(errno.EPERM, "EPERM")
            if code:
                raise KernelError(
                    f"conntrack: the kernel refused the dump: {errno.errorcode.get(-code, code)}"
                )
            return True, n
        pair = _orig_addresses(data, off + _NLMSG.size + 4, off + length)
        if pair is not None:
            pairs[pair] += 1
        n += 1
        off += (length + 3) & ~3
    return False, n


def _attr(data: bytes, off: int, end: int, kind: int) -> tuple[int, int] | None:
    """(start, end) of the payload of the first attribute of type `kind` in data[off:end]."""
    while off + _NLA.size <= end:
        length, typ = _NLA.unpack_from(data, off)
        if length < _NLA.size:
            return None
        if typ & 0x3FFF == kind:
            return off + _NLA.size, min(off + length, end)
        off += (length + 3) & ~3
    return None


def _orig_addresses(data: bytes, off: int, end: int) -> tuple[bytes, bytes] | None:
    tuple_orig = _attr(data, off, end, CTA_TUPLE_ORIG)
    if tuple_orig is None:
        return None
    ip = _attr(data, *tuple_orig, CTA_TUPLE_IP)
    if ip is None:
        return None
    src, dst = _attr(data, *ip, CTA_IP_V4_SRC), _attr(data, *ip, CTA_IP_V4_DST)
    if src is None or dst is None or src[1] - src[0] != 4 or dst[1] - dst[0] != 4:
        return None
    return data[src[0] : src[1]], data[dst[0] : dst[1]]
