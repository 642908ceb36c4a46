"""Connection tracking in one network namespace, over ctnetlink (stdlib only, CAP_NET_ADMIN there).

Two uses:

* `read_address_pairs`: who is tracked, for `hyperfence vm list` - the original direction's IPv4 source and
  destination of every entry, counted per address pair (a flood from one VM to one peer is one pair, however
  many entries). Why not pyroute2's conntrack dump: it decodes every attribute of every entry into Python
  objects, far slower on a full table (262,144 entries by default) than reading the three attributes used.
* `forget_flows`: forget the entries of given addresses after drift. hyperfence's bridge chains accept every
  packet that conntrack calls established (the `meta mark` shortcut). A connection opened while the rules
  were missing (a hand-run `nft flush ruleset`) is established by the time they are repaired and would keep
  passing for as long as it lives. Deleting the entries makes the next packet of every such flow a new flow
  again, judged by the repaired rules: an allowed flow goes on (its next packet in the allowed direction
  creates a new entry), a forbidden one stays cut. One dump of the IPv4 table, then one delete per matching
  entry, keyed by the entry's original tuple exactly as the dump returned it (and its zone); an entry that
  vanished meanwhile (ENOENT) is not an error.

Dumps are filtered by the kernel to IPv4 (`nfgenmsg.family = AF_INET`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterable

from hyperfence.codec.netlink import NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, split_dump
from hyperfence.codec.netlink import attr as _attr
from hyperfence.codec.netlink import attrs as _attrs
from hyperfence.errors import KernelError, PermissionDeniedError
from hyperfence.system.netlink import netfilter_socket

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_ZONE = 1, 1, 18
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
_RECV = 1 << 20
TIMEOUT_S = 10.0
# More entries than any conntrack table holds (nf_conntrack_max is at most a few million): a dump that
# goes beyond is not ending, and is stopped rather than read forever.
MAX_ENTRIES = 1 << 24

AddressPairs = Counter[tuple[bytes, bytes]]


def _message(kind: int, flags: int, seq: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + attrs  # nfgenmsg
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | kind
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, 0) + body


def matching_entries(data: bytes, addresses: frozenset[bytes]) -> tuple[list[bytes], bool, int]:
    """Pure: from one dump buffer, the delete keys (original tuple + zone attributes) of the entries whose
    original source or destination is in `addresses` (4-byte IPv4), whether the dump is done, and its errno."""
    keys: list[bytes] = []
    messages, done, err = split_dump(data)
    for msg_type, payload, end in messages:
        if msg_type == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            top = _attrs(data, payload + 4, end)
            orig = top.get(CTA_TUPLE_ORIG)
            if orig is not None:
                ip = _attrs(orig, 0, len(orig)).get(CTA_TUPLE_IP, b"")
                ends = _attrs(ip, 0, len(ip))
                if ends.get(CTA_IP_V4_SRC) in addresses or ends.get(CTA_IP_V4_DST) in addresses:
                    key = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, orig)
                    if CTA_ZONE in top:
                        key += _attr(CTA_ZONE, top[CTA_ZONE])
                    keys.append(key)
    return keys, done, err


def forget_flows(netns: str | None, addresses: Iterable[ipaddress.IPv4Address]) -> int:
    """Delete every IPv4 conntrack entry of namespace `netns` whose original source or destination is one of
    `addresses`; returns how many were deleted. Raises `NotFoundError` (no such namespace),
    `PermissionDeniedError` (not root) or `KernelError`."""
    wanted = frozenset(a.packed for a in addresses)
    if not wanted:
        return 0
    sock = _open(netns)
    try:
        sock.settimeout(5.0)
        sock.send(_message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1))
        keys: list[bytes] = []
        while True:
            found, done, err = matching_entries(sock.recv(_RECV), wanted)
            keys.extend(found)
            if err:
                raise KernelError(f"conntrack dump failed: {os.strerror(err)}")
            if done:
                break
        deleted = 0
        for seq, key in enumerate(keys, start=2):
            sock.send(_message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, key))
            _, _, err = matching_entries(sock.recv(_RECV), wanted)
            if err == 0:
                deleted += 1
            elif err != errno.ENOENT:  # ENOENT: it ended meanwhile
                raise KernelError(f"conntrack refused to delete an entry: {os.strerror(err)}")
        return deleted
    except OSError as e:
        raise KernelError(f"conntrack netlink in netns {netns!r}: {e.strerror or e}") from None
    finally:
        sock.close()


def _open(netns: str | None) -> socket.socket:
    return netfilter_socket(netns, what="conntrack")


def read_address_pairs(netns: str | None) -> AddressPairs:
    """(original source, original destination) of every tracked IPv4 connection in `netns` (None: ours),
    as 4-byte addresses, counted. Raises `PermissionDeniedError` without CAP_NET_ADMIN, `KernelError` if
    the dump fails."""
    sock = _open(netns)
    pairs: AddressPairs = Counter()
    seen = 0
    try:
        sock.settimeout(TIMEOUT_S)
        sock.send(_message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1))
        while True:
            done, n = parse_dump_chunk(sock.recv(_RECV), pairs)
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
        raise KernelError(f"conntrack: dump failed: {e.strerror or e}") from None
    finally:
        sock.close()


def parse_dump_chunk(data: bytes, pairs: AddressPairs) -> tuple[bool, int]:
    """Pure: add the address pairs of one datagram of a ctnetlink dump to `pairs`: (is the dump done, how
    many messages it held). A netlink error message raises (EPERM as `PermissionError`, like the socket
    calls); a malformed message raises `KernelError`."""
    off = n = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            raise KernelError(f"conntrack: malformed netlink message (length {length})")
        if kind == NLMSG_DONE:
            return True, n
        if kind == NLMSG_ERROR:
            if length < NLMSG_HDR.size + 4:
                raise KernelError(f"conntrack: malformed netlink error message (length {length})")
            (code,) = struct.unpack_from("=i", data, off + NLMSG_HDR.size)
            if code == -errno.EPERM:
                raise PermissionError(errno.EPERM, "EPERM")
            if code:
                raise KernelError(
                    f"conntrack: the kernel refused the dump: {errno.errorcode.get(-code, code)}"
                )
            return True, n
        pair = _orig_addresses(data, off + NLMSG_HDR.size + 4, off + length)
        if pair is not None:
            pairs[pair] += 1
        n += 1
        off += (length + 3) & ~3
    return False, n


def _orig_addresses(data: bytes, off: int, end: int) -> tuple[bytes, bytes] | None:
    orig = _attrs(data, off, end).get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    ip = _attrs(orig, 0, len(orig)).get(CTA_TUPLE_IP)
    if ip is None:
        return None
    ends = _attrs(ip, 0, len(ip))
    src, dst = ends.get(CTA_IP_V4_SRC), ends.get(CTA_IP_V4_DST)
    if src is None or dst is None or len(src) != 4 or len(dst) != 4:
        return None
    return src, dst
