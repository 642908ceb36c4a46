"""nf_tables netlink messages to delete and append rules in one transaction, and to read rule bodies out of
a dump (pure: bytes in, bytes out; the sockets are adapters/nft.py's).

Why: libnftables lists every chain and set of the namespace into its cache before it evaluates a rule
command (60,000 chains and 10,000 sets at 10,000 VMs: ~130 ms a change), and the cache is stale after each
of our own commits. The kernel itself needs none of that to delete a rule by handle or append a rule whose
expressions are already encoded. adapters/nft.py gets the encoding from libnftables in a private, nearly
empty namespace (where its cache costs nothing), reads the rules back from there with `parse_rule_bodies`,
and sends them to the real namespace with `rule_batch`: one NFNL batch, which the kernel applies atomically,
as it does libnftables' own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hyperfence.codec.netlink import NLA_F_NESTED, NLMSG_HDR, split_dump
from hyperfence.codec.netlink import attr as _attr
from hyperfence.codec.netlink import attrs as _attrs
from hyperfence.codec.nft_rules import (
    FAMILIES,
    NFNL_SUBSYS_NFTABLES,
    NFTA_RULE_CHAIN,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_RULE_USERDATA,
    comment_of,
)

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFTA_RULE_EXPRESSIONS = 4
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800


def _msg(msg_type: int, flags: int, seq: int, family: int, body: bytes, *, res_id: int = 0) -> bytes:
    payload = struct.pack("=BB", family, 0) + struct.pack(">H", res_id) + body  # nfgenmsg; res_id big-endian
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


def _name(value: str) -> bytes:
    return value.encode() + b"\0"


def delete_rule(family: str, table: str, chain: str, handle: int, seq: int) -> bytes:
    body = _attr(NFTA_RULE_TABLE, _name(table)) + _attr(NFTA_RULE_CHAIN, _name(chain))
    body += _attr(NFTA_RULE_HANDLE, struct.pack(">Q", handle))
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE
    return _msg(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, FAMILIES[family], body)


def append_rule(family: str, table: str, chain: str, body: tuple[bytes, bytes], seq: int) -> bytes:
    """Append a rule whose `body` = (expressions: the payload of NFTA_RULE_EXPRESSIONS, userdata: its
    comment as nftnl encodes it) came from `parse_rule_bodies`."""
    expressions, userdata = body
    attrs = _attr(NFTA_RULE_TABLE, _name(table)) + _attr(NFTA_RULE_CHAIN, _name(chain))
    attrs += _attr(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, expressions)
    if userdata:
        attrs += _attr(NFTA_RULE_USERDATA, userdata)
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK
    return _msg(msg_type, flags, seq, FAMILIES[family], attrs)


def batch(messages: list[bytes], begin_seq: int, end_seq: int) -> bytes:
    """`messages` as one transaction (BATCH_BEGIN ... BATCH_END for the nftables subsystem)."""
    begin = _msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)
    end = _msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)
    return begin + b"".join(messages) + end


def parse_rule_bodies(data: bytes) -> tuple[list[tuple[str, str, bytes, bytes]], bool, int]:
    """(rules as (chain, comment, expressions payload, userdata), done, errno) from one buffer of a rule
    dump."""
    rules: list[tuple[str, str, bytes, bytes]] = []
    messages, done, err = split_dump(data)
    for msg_type, payload, end in messages:
        if msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
            continue
        a = _attrs(data, payload + 4, end)
        if NFTA_RULE_EXPRESSIONS not in a:
            continue
        userdata = a.get(NFTA_RULE_USERDATA, b"")
        chain = a.get(NFTA_RULE_CHAIN, b"").rstrip(b"\0").decode(errors="replace")
        rules.append((chain, comment_of(userdata), a[NFTA_RULE_EXPRESSIONS], userdata))
    return rules, done, err


def parse_acks(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(seq, errno) of every NLMSG_ERROR in one buffer (errno 0: an acknowledgement), and how many
    messages it held."""
    out: list[tuple[int, int]] = []
    count = 0
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, msg_type, _, seq, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        count += 1
        if msg_type == 2 and off + NLMSG_HDR.size + 4 <= len(data):  # NLMSG_ERROR
            out.append((seq, -struct.unpack_from("=i", data, off + NLMSG_HDR.size)[0]))
        off += (length + 3) & ~3
    return out, count


@dataclass(frozen=True)
class DeleteRule:
    family: str
    table: str
    chain: str
    handle: int


@dataclass(frozen=True)
class AppendRule:
    family: str
    table: str
    chain: str
    body: tuple[bytes, bytes]  # (expressions payload, userdata), from `parse_rule_bodies`


def rule_batch(changes: list[DeleteRule | AppendRule], first_seq: int) -> tuple[bytes, list[int]]:
    """One transaction of `changes`, in order, numbered from `first_seq`; and the sequence numbers whose
    acknowledgements to wait for (one per change: each asks for one)."""
    messages: list[bytes] = []
    seqs: list[int] = []
    seq = first_seq + 1
    for c in changes:
        if isinstance(c, DeleteRule):
            messages.append(delete_rule(c.family, c.table, c.chain, c.handle, seq))
        else:
            messages.append(append_rule(c.family, c.table, c.chain, c.body, seq))
        seqs.append(seq)
        seq += 1
    return batch(messages, first_seq, seq), seqs
