"""Netlink framing, the way hyperfence's readers of the kernel speak it (nftables events and rule ids, NFLOG,
conntrack, links): message headers and attributes. Pure: bytes in, values out; never reads past a buffer,
never raises on what the kernel (or anyone) wrote."""

from __future__ import annotations

import struct

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host byte order)
NLA_HDR = struct.Struct("=HH")  # len, type
NLA_F_NESTED = 0x8000


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, kind) + value + b"\0" * (-length % 4)


def attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """The attributes in data[off:end] by type (flags masked off; the first of a type wins). Stops at the
    first malformed one: never reads outside `end`, never raises."""
    out: dict[int, bytes] = {}
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > end:
            break
        out.setdefault(kind & 0x3FFF, data[off + NLA_HDR.size : off + length])
        off += (length + 3) & ~3
    return out


NLMSG_ERROR, NLMSG_DONE = 2, 3


def split_dump(data: bytes) -> tuple[list[tuple[int, int, int]], bool, int]:
    """One receive buffer of a netlink dump, split: its messages before NLMSG_DONE or an error, each as
    (type, payload start, message end) offsets into `data`; whether the dump is done; its errno (0, or the
    positive errno of an NLMSG_ERROR). Stops at the first malformed header: never reads past the buffer."""
    messages: list[tuple[int, int, int]] = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        if msg_type == NLMSG_DONE:
            return messages, True, 0
        if msg_type == NLMSG_ERROR:
            if off + NLMSG_HDR.size + 4 > len(data):
                return messages, True, 0
            return messages, True, -struct.unpack_from("=i", data, off + NLMSG_HDR.size)[0]
        messages.append((msg_type, off + NLMSG_HDR.size, off + length))
        off += (length + 3) & ~3
    return messages, False, 0
