"""codec/nft_rules.py: the nf_tables messages that list one chain's rules (handle and comment), read from
bytes as the kernel writes them, and bounded against what it should not write (pure)."""

from __future__ import annotations

import errno
import struct

from hyperfence.codec.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, attr, attrs
from hyperfence.codec.nft_rules import (
    FAMILIES,
    NFTA_GEN_ID,
    NFTA_RULE_CHAIN,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_RULE_USERDATA,
    NFTNL_UDATA_RULE_COMMENT,
    Generation,
    comment_of,
    dump_request,
    generation_request,
    parse_dump,
    parse_generation,
    parse_table_dump,
)

NEWRULE = (10 << 8) | 6


def rule(handle: int, comment: str | None) -> bytes:
    body = struct.pack("=BBH", FAMILIES["bridge"], 0, 0) + attr(NFTA_RULE_HANDLE, struct.pack(">Q", handle))
    if comment is not None:
        text = comment.encode() + b"\0"
        body += attr(NFTA_RULE_USERDATA, bytes([NFTNL_UDATA_RULE_COMMENT, len(text)]) + text)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NEWRULE, 2, 1, 0) + body + b"\0" * (-len(body) % 4)


DONE = NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def test_a_dump_request_names_the_family_table_and_chain() -> None:
    msg = dump_request("bridge", "hyperfence", "egress", 7)
    length, kind, flags, seq, _ = NLMSG_HDR.unpack_from(msg)
    assert (length, kind, flags & 0x300, seq) == (len(msg), (10 << 8) | 7, 0x300, 7)
    assert msg[NLMSG_HDR.size] == FAMILIES["bridge"]
    a = attrs(msg, NLMSG_HDR.size + 4, len(msg))
    assert (a[NFTA_RULE_TABLE], a[NFTA_RULE_CHAIN]) == (b"hyperfence\0", b"egress\0")


def test_rules_in_order_with_their_comments_until_done() -> None:
    data = rule(10, "sys:est") + rule(11, None) + rule(12, "web") + DONE + rule(13, "after done")
    assert parse_dump(data) == ([(10, "sys:est"), (11, ""), (12, "web")], True, 0)
    assert parse_dump(rule(10, "a")) == ([(10, "a")], False, 0)  # more buffers to come


def test_an_error_ends_the_dump_with_its_errno() -> None:
    error = NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.ENOENT)
    assert parse_dump(error) == ([], True, errno.ENOENT)


def test_what_the_kernel_should_never_write_is_skipped_not_raised() -> None:
    assert parse_dump(rule(10, "a")[:-3]) == ([], False, 0)  # cut short
    body = struct.pack("=BBH", 7, 0, 0) + attr(NFTA_RULE_HANDLE, b"\1\2")  # a 2-byte handle
    odd = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NEWRULE, 2, 1, 0) + body
    assert parse_dump(odd + DONE) == ([], True, 0)
    assert comment_of(bytes([NFTNL_UDATA_RULE_COMMENT, 200]) + b"short\0") == "short"
    assert comment_of(b"\x01\x02ab" + bytes([NFTNL_UDATA_RULE_COMMENT, 3]) + b"ok\0") == "ok"
    assert comment_of(b"\x01") == ""


def _table_rule(chain: str, handle: int, comment: str) -> bytes:
    text = comment.encode() + b"\0"
    body = struct.pack("=BBH", FAMILIES["bridge"], 0, 0) + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
    body += attr(NFTA_RULE_HANDLE, struct.pack(">Q", handle))
    body += attr(NFTA_RULE_USERDATA, bytes([NFTNL_UDATA_RULE_COMMENT, len(text)]) + text)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NEWRULE, 2, 1, 0) + body


def test_a_dump_names_each_rules_chain() -> None:
    data = _table_rule("in", 4, "web") + _table_rule("out", 9, "sys:drop") + DONE
    assert parse_table_dump(data) == ([("in", 4, "web"), ("out", 9, "sys:drop")], True, 0)


def test_the_generation_is_read_from_its_answer() -> None:
    msg = generation_request(5)
    _, kind, flags, seq, _ = NLMSG_HDR.unpack_from(msg)
    assert (kind, flags & 0x300, seq) == ((10 << 8) | 16, 0, 5)  # GETGEN, not a dump
    body = struct.pack("=BBH", 0, 0, 0) + attr(NFTA_GEN_ID, struct.pack(">I", 4_000_000_001))
    answer = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), (10 << 8) | 15, 0, 5, 0) + body
    assert parse_generation(answer) == (4_000_000_001, 0)
    # an answer without the id, a short id, an error
    empty = struct.pack("=BBH", 0, 0, 0)
    assert parse_generation(NLMSG_HDR.pack(NLMSG_HDR.size + 4, (10 << 8) | 15, 0, 5, 0) + empty) == (None, 0)
    short = struct.pack("=BBH", 0, 0, 0) + attr(NFTA_GEN_ID, b"\1\2")
    assert (
        parse_generation(NLMSG_HDR.pack(NLMSG_HDR.size + len(short), (10 << 8) | 15, 0, 5, 0) + short)[0]
        is None
    )
    err = NLMSG_HDR.pack(NLMSG_HDR.size + 4, NLMSG_ERROR, 0, 5, 0) + struct.pack("=i", -errno.EPERM)
    assert parse_generation(err) == (None, errno.EPERM)


def test_one_commit_follows_a_generation_and_only_in_its_namespace() -> None:
    g = Generation("ns-a", 7)
    assert Generation("ns-a", 8).follows(g)
    assert not Generation("ns-a", 9).follows(g)  # someone else committed too
    assert not Generation("ns-a", 7).follows(g)
    assert not Generation("ns-b", 8).follows(g)
    assert Generation("ns-a", 0).follows(Generation("ns-a", (1 << 32) - 1))
