"""nftables event messages -> generations (pure: messages built here as the kernel builds them)."""

from __future__ import annotations

import errno
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from hyperfence.adapters.nft_monitor import FAMILIES, NFT_MSG_NEWGEN, Generation, GenerationParser, NftMonitor

NEWTABLE, NEWCHAIN, DELRULE, NEWSETELEM = 0, 3, 8, 12
TABLES = [("bridge", "hyperfence"), ("inet", "hyperfence"), ("netdev", "hyperfence")]


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def message(kind: int, family: str, attrs: bytes, *, subsys: int = 10) -> bytes:
    body = struct.pack("=BBH", FAMILIES[family], 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), (subsys << 8) | kind, 0, 0, 0) + body


def obj(kind: int, family: str, table: str, *more: bytes) -> bytes:
    return message(kind, family, attr(1, table.encode() + b"\0") + b"".join(more))


def newgen(gen: int, pid: int, comm: str) -> bytes:
    attrs = attr(1, struct.pack(">I", gen)) + attr(2, struct.pack(">I", pid)) + attr(3, comm.encode() + b"\0")
    return message(NFT_MSG_NEWGEN, "inet", attrs)


def test_a_commit_is_counted_by_the_messages_that_name_a_watched_table() -> None:
    p = GenerationParser(TABLES)
    data = (
        obj(NEWTABLE, "bridge", "hyperfence")
        + obj(NEWCHAIN, "bridge", "hyperfence", attr(3, b"egress\0"))
        + obj(NEWTABLE, "ip", "hyperfence")  # same name, another family: not ours
        + obj(DELRULE, "inet", "other")
        + newgen(7, 1234, "nft")
    )
    assert p.feed(data) == [Generation(7, 1234, "nft", 2)]


def test_a_commit_may_span_datagrams_and_each_generation_starts_from_zero() -> None:
    p = GenerationParser(TABLES)
    assert p.feed(obj(NEWSETELEM, "netdev", "hyperfence")) == []
    assert p.feed(obj(NEWTABLE, "ip", "nat") + newgen(3, 10, "python")) == [Generation(3, 10, "python", 1)]
    assert p.feed(obj(NEWTABLE, "ip", "nat") + newgen(4, 11, "nft")) == [Generation(4, 11, "nft", 0)]


def test_unreadable_messages_count_as_touching_and_other_subsystems_are_ignored() -> None:
    p = GenerationParser(TABLES)
    no_table = message(DELRULE, "bridge", attr(2, b"chain\0"))
    other_subsystem = message(0, "bridge", attr(1, b"hyperfence\0"), subsys=1)
    assert p.feed(no_table + other_subsystem + newgen(5, 1, "x")) == [Generation(5, 1, "x", 1)]
    assert p.feed(b"\x05\x00\x00\x00" + b"\0" * 12) == []  # broken framing: counted, not raised
    assert p.feed(newgen(6, 1, "x"))[0].touched == 1


def test_reset_forgets_the_commit_in_progress() -> None:
    p = GenerationParser(TABLES)
    p.feed(obj(NEWTABLE, "bridge", "hyperfence"))
    p.reset()
    assert p.feed(newgen(2, 1, "nft"))[0].touched == 0


def test_describe_names_the_committer() -> None:
    assert Generation(9, 4242, "nft", 3).describe() == "nftables generation 9 by process 4242 (nft)"


@given(st.binary(max_size=300))
def test_any_bytes_are_a_valid_argument(data: bytes) -> None:
    GenerationParser(TABLES).feed(data)


class ScriptedSocket:
    """Readable (a socketpair end with a byte in it) and handing out scripted datagrams or errors."""

    def __init__(self, script: list[bytes | OSError]) -> None:
        self.pair = socket.socketpair()
        self.pair[1].send(b"x")
        self.script = script

    def fileno(self) -> int:
        return self.pair[0].fileno()

    def recv_into(self, buf: bytearray) -> int:
        if not self.script:
            raise BlockingIOError
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self) -> None:
        for s in self.pair:
            s.close()


class ScriptedMonitor(NftMonitor):
    def __init__(self, script: list[bytes | OSError]) -> None:
        self.script = script
        super().__init__(TABLES)

    def _open(self, netns: str | None, rcvbuf: int) -> socket.socket:
        return ScriptedSocket(self.script)  # type: ignore[return-value]

    def then(self, *items: bytes | OSError) -> None:
        self.script.extend(items)


def test_the_generation_that_ends_an_interrupted_commit_is_reported_as_lost() -> None:
    """Events lost mid-commit: the rest of that commit's messages (none naming our tables) and its NEWGEN
    come in a later read; that read must not pass for one commit that touched nothing of ours."""
    m = ScriptedMonitor([obj(NEWTABLE, "bridge", "hyperfence"), OSError(errno.ENOBUFS, "overrun")])
    try:
        first = m.read(0.1)
        assert first.lost and first.generations == ()
        m.then(obj(NEWTABLE, "ip", "nat"), newgen(8, 42, "nft"))
        second = m.read(0.1)
        assert second.lost  # generation 8's count is unknown
        assert [g.gen_id for g in second.generations] == [8]
        m.then(obj(NEWTABLE, "ip", "nat"), newgen(9, 42, "nft"))
        third = m.read(0.1)  # after it, counts are whole again
        assert not third.lost and third.generations == (Generation(9, 42, "nft", 0),)
    finally:
        m.close()
