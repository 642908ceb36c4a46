"""Netlink framing shared by hyperfence's readers of the kernel (codec/netlink.py): pure, no socket."""

from __future__ import annotations

import errno
import struct

from hyperfence.codec.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, split_dump


def test_split_dump_stops_at_done_or_error_and_never_reads_past_the_buffer() -> None:
    one = NLMSG_HDR.pack(NLMSG_HDR.size + 3, 16, 0, 1, 0) + b"abc\0"  # padded to 4
    done = NLMSG_HDR.pack(NLMSG_HDR.size, NLMSG_DONE, 0, 1, 0)
    assert split_dump(one + done + one) == ([(16, 16, 19)], True, 0)
    error = NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.EPERM)
    assert split_dump(one + error) == ([(16, 16, 19)], True, errno.EPERM)
    short_error = NLMSG_HDR.pack(NLMSG_HDR.size, NLMSG_ERROR, 0, 1, 0)  # no room for the errno
    assert split_dump(short_error) == ([], True, 0)
    assert split_dump(one[:10]) == ([], False, 0)  # a cut header
    assert split_dump(NLMSG_HDR.pack(99, 16, 0, 1, 0)) == ([], False, 0)  # longer than the buffer
    assert split_dump(NLMSG_HDR.pack(4, 16, 0, 1, 0) + one) == ([], False, 0)  # shorter than its header
