"""codec/nft_batch.py: the nf_tables messages that delete and append rules in one transaction, and rule
bodies read out of a dump (pure: messages built and read here as the kernel builds and reads them)."""

from __future__ import annotations

import errno
import struct

from hyperfence.codec.netlink import NLA_F_NESTED, NLMSG_HDR, attr, attrs
from hyperfence.codec.nft_batch import (
    NFTA_RULE_EXPRESSIONS,
    AppendRule,
    DeleteRule,
    parse_acks,
    parse_rule_bodies,
    rule_batch,
)
from hyperfence.codec.nft_rules import (
    FAMILIES,
    NFTA_RULE_CHAIN,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_RULE_USERDATA,
    NFTNL_UDATA_RULE_COMMENT,
)

EXPR = attr(1 | NLA_F_NESTED, attr(1, b"counter\0") + attr(2 | NLA_F_NESTED, b""))  # one expression
COMMENT = bytes([NFTNL_UDATA_RULE_COMMENT, 4]) + b"web\0"


def messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload after the header) of each message."""
    out = []
    off = 0
    while off < len(data):
        length, kind, flags, seq, _ = NLMSG_HDR.unpack_from(data, off)
        out.append((kind, flags, seq, data[off + NLMSG_HDR.size : off + length]))
        off += (length + 3) & ~3
    return out


def test_a_batch_is_one_transaction_of_the_changes_in_order() -> None:
    changes = [
        DeleteRule("bridge", "hyperfence", "v1_in", 77),
        AppendRule("bridge", "hyperfence", "v1_in", (EXPR, COMMENT)),
    ]
    data, seqs = rule_batch(changes, 100)
    msgs = messages(data)
    assert [m[0] for m in msgs] == [0x10, (10 << 8) | 8, (10 << 8) | 6, 0x11]  # begin, DELRULE, NEWRULE, end
    assert [m[2] for m in msgs] == [100, 101, 102, 103] and seqs == [101, 102]
    begin = msgs[0][3]
    assert struct.unpack(">H", begin[2:4])[0] == 10  # res_id: the nftables subsystem, big-endian
    delete, append = msgs[1], msgs[2]
    assert delete[1] & 0x4 and append[1] & 0x4  # each asks for an acknowledgement
    assert append[1] & 0x800 and append[1] & 0x400  # appended, created
    assert delete[3][0] == append[3][0] == FAMILIES["bridge"]
    d = attrs(delete[3], 4, len(delete[3]))
    assert (d[NFTA_RULE_TABLE], d[NFTA_RULE_CHAIN]) == (b"hyperfence\0", b"v1_in\0")
    assert struct.unpack(">Q", d[NFTA_RULE_HANDLE])[0] == 77
    a = attrs(append[3], 4, len(append[3]))
    assert (a[NFTA_RULE_EXPRESSIONS], a[NFTA_RULE_USERDATA]) == (EXPR, COMMENT)


def _dumped(chain: str, body: tuple[bytes, bytes] | None) -> bytes:
    payload = struct.pack("=BBH", FAMILIES["bridge"], 0, 0) + attr(NFTA_RULE_TABLE, b"hyperfence\0")
    payload += attr(NFTA_RULE_CHAIN, chain.encode() + b"\0") + attr(NFTA_RULE_HANDLE, struct.pack(">Q", 5))
    if body is not None:
        payload += attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, body[0]) + attr(NFTA_RULE_USERDATA, body[1])
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), (10 << 8) | 6, 2, 1, 0) + payload


def test_rule_bodies_are_read_out_of_a_dump_by_chain_and_comment() -> None:
    done = NLMSG_HDR.pack(NLMSG_HDR.size + 4, 3, 2, 1, 0) + b"\0" * 4
    data = _dumped("v1_in", (EXPR, COMMENT)) + _dumped("v1_in", None) + done
    assert parse_rule_bodies(data) == (
        [("v1_in", "web", EXPR, COMMENT)],
        True,
        0,
    )  # (no expressions: skipped)
    assert parse_rule_bodies(b"\x07\x00") == ([], False, 0)  # a broken buffer is not an error here


def test_acknowledgements_and_refusals_are_read_with_their_sequence_numbers() -> None:
    def error(seq: int, code: int) -> bytes:
        return NLMSG_HDR.pack(NLMSG_HDR.size + 4, 2, 0, seq, 0) + struct.pack("=i", code)

    acks, count = parse_acks(error(101, 0) + error(102, -errno.ENOENT))
    assert acks == [(101, 0), (102, errno.ENOENT)] and count == 2
    assert parse_acks(b"") == ([], 0)
