"""The nf_tables netlink messages that list rules' ids and read the ruleset's generation (pure: the socket
is adapters/nft.py's).

Why: through libnftables, listing even one chain loads every rule of the table into its cache (~36 ms at
1,000 VMs). The kernel itself can dump a single chain. This reads, for each rule in order, its handle and its
comment (kept by nft in the rule's user data), which is what an incremental apply needs to verify that the
chain holds the right rules in the right order and to learn the handles of the rules it just added. Rule
*bodies* are compared exactly by the periodic full read through libnftables.

The generation (`NFT_MSG_GETGEN`) is the number of the namespace's last committed nftables transaction:
every commit, by anyone, to any table changes it, and nothing else does. When it still has the value it had
right after hyperfence verified the kernel, nothing in the kernel's rules, chains or sets can have changed
since (reconcile/firewall.py skips reading them again).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from hyperfence.codec.netlink import NLMSG_HDR, split_dump
from hyperfence.codec.netlink import attr as _attr
from hyperfence.codec.netlink import attrs as _attrs

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETRULE = 7
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_USERDATA = 1, 2, 3, 7
NFTNL_UDATA_RULE_COMMENT = 0
FAMILIES = {"ip": 2, "inet": 1, "bridge": 7, "netdev": 5, "arp": 3, "ip6": 10}


def dump_request(family: str, table: str, chain: str, seq: int) -> bytes:
    body = struct.pack("=BBH", FAMILIES[family], 0, 0)  # nfgenmsg: family, version, res_id
    body += _attr(NFTA_RULE_TABLE, table.encode() + b"\0") + _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


class Generation(NamedTuple):
    """A namespace's nftables generation: `namespace` says which namespace (boot id and the namespace's
    cookie: unique until a reboot), `number` counts its commits."""

    namespace: str
    number: int

    def follows(self, before: Generation) -> bool:
        """Exactly one commit happened since `before`."""
        return self.namespace == before.namespace and self.number == (before.number + 1) % (1 << 32)


def generation_request(seq: int) -> bytes:
    body = struct.pack("=BBH", 0, 0, 0)  # NFPROTO_UNSPEC: the generation is the namespace's
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, NLM_F_REQUEST, seq, 0) + body


def parse_generation(data: bytes) -> tuple[int | None, int]:
    """(the generation id, errno) from the answer to `generation_request`; (None, 0) when the buffer holds
    no generation message."""
    messages, _, err = split_dump(data)
    for msg_type, payload, end in messages:
        if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            value = _attrs(data, payload + 4, end).get(NFTA_GEN_ID, b"")
            if len(value) == 4:
                return struct.unpack(">I", value)[0], 0
    return None, err


def comment_of(udata: bytes) -> str:
    """nftnl user data: TLVs of (type u8, len u8, value); the comment is NUL-terminated."""
    off = 0
    while off + 2 <= len(udata):
        kind, length = udata[off], udata[off + 1]
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return udata[off + 2 : off + 2 + length].rstrip(b"\0").decode(errors="replace")
        off += 2 + length
    return ""


def parse_dump(data: bytes) -> tuple[list[tuple[int, str]], bool, int]:
    """(rules as (handle, comment), done, errno) from one receive buffer."""
    rules, done, err = parse_table_dump(data)
    return [(handle, comment) for _, handle, comment in rules], done, err


def parse_table_dump(data: bytes) -> tuple[list[tuple[str, int, str]], bool, int]:
    """(rules as (chain, handle, comment), done, errno) from one receive buffer."""
    rules: list[tuple[str, int, str]] = []
    messages, done, err = split_dump(data)
    for msg_type, payload, end in messages:
        if msg_type == (NFNL_SUBSYS_NFTABLES << 8) | 6:  # NFT_MSG_NEWRULE (what a dump returns)
            attrs = _attrs(data, payload + 4, end)  # after nfgenmsg
            if NFTA_RULE_HANDLE in attrs and len(attrs[NFTA_RULE_HANDLE]) == 8:
                handle = struct.unpack(">Q", attrs[NFTA_RULE_HANDLE])[0]
                chain = attrs.get(NFTA_RULE_CHAIN, b"").rstrip(b"\0").decode(errors="replace")
                rules.append((chain, handle, comment_of(attrs.get(NFTA_RULE_USERDATA, b""))))
    return rules, done, err
