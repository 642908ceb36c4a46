"""Watch the kernel's nftables events (what `nft monitor` shows) in one network namespace, commit by commit.

The kernel multicasts every committed change to the `NFNLGRP_NFTABLES` netlink group of its namespace: one
message per object added or deleted (table, chain, rule, set, element, ...), then one `NEWGEN` message that
closes the transaction and names the task that committed it ("# new generation N by process PID (comm)" in
`nft monitor`'s words). `NftMonitor` reads that group and hands out one `Generation` per commit: who
committed it and how many of its messages named one of the watched tables.

Why a netlink socket of our own and not an `nft monitor` child process: the same events reach us without a
26 ms process start, a child to supervise, reap and kill (PID 1 here reaps nothing, and a `kill -9` of the
daemon would leave it running), or a text format to parse; `nft -j monitor` (nft 1.0.6) does not even print
the generation line, which is the one that says who committed. It is how `codec/nft_rules.py` and
`adapters/nflog.py` already talk to the kernel. Decoding is pure (`GenerationParser`) and unit-tested with
built messages; the kernel test compares it with what real commits send.

Kernel behaviour this relies on (kernel 6.x, checked by tests/netns/adapters/test_nft_monitor_kernel.py):

* a transaction's object messages come before its `NEWGEN`, and commits are serialised per namespace (the
  commit mutex is held while the notifications are sent), so messages of two commits never interleave;
* `NFTA_GEN_PROC_PID` is the committing *thread's* id (`task_pid_nr(current)`): libnftables runs in the
  caller's thread, so hyperfence's own commits carry the id of its nft worker thread;
* in every nftables object message, attribute 1 is the table's name (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`,
  `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`, `NFTA_OBJ_TABLE`, ...) and the nfgenmsg
  family is the table's family; a `flush ruleset` sends a delete message for every object of every table;
* when the socket's receive buffer overflows, the kernel drops messages and the next `recv` fails once with
  ENOBUFS: then anything may have changed (`Batch.lost`). The commit whose messages were lost may end in a
  later read: the batch holding the first generation after the loss is reported as lost too, since its
  count of messages that touched a watched table is unknown.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from hyperfence.codec.netlink import NLA_HDR, NLMSG_HDR
from hyperfence.codec.netlink import attrs as _attrs
from hyperfence.errors import BugError, KernelError
from hyperfence.system.netlink import netfilter_socket

NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3
TABLE_ATTR = 1  # attribute 1 names the table in every nftables object message
FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}

NFGENMSG = 4  # family u8, version u8, res_id be16

_RECV_BUFSIZE = 1 << 20  # one datagram: the kernel packs notifications up to a page or so each
_MAX_RECVS_PER_READ = 512


@dataclass(frozen=True)
class Generation:
    """One committed nftables transaction."""

    gen_id: int
    pid: int  # the committing thread's id (0 if the kernel did not say)
    comm: str  # its command name, as the kernel reports it (at most 15 characters)
    touched: int  # how many of its messages named a watched table (or could not be read: counted too)

    def describe(self) -> str:
        return f"nftables generation {self.gen_id} by process {self.pid} ({self.comm})"


@dataclass(frozen=True)
class Batch:
    generations: tuple[Generation, ...] = ()
    lost: bool = False  # the kernel dropped events (receive buffer overrun): anything may have changed


def _table(data: bytes, off: int, end: int) -> bytes | None:
    """Attribute 1 (the table's name, NUL included) of one object message; None if it has none. The kernel
    puts it first, so this usually reads one attribute header."""
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > end:
            return None
        if kind & 0x3FFF == TABLE_ATTR:
            return data[off + NLA_HDR.size : off + length]
        off += (length + 3) & ~3
    return None


def _u32(attrs: dict[int, bytes], kind: int) -> int:
    value = attrs.get(kind, b"")
    return struct.unpack(">I", value)[0] if len(value) == 4 else 0


class GenerationParser:
    """Pure: turns the messages of the nftables group into `Generation`s. Keeps the count of the commit in
    progress between calls (a commit's messages may span several datagrams). Never raises on any input: a
    message it cannot read counts as touching a watched table (the safe side: it leads to a check)."""

    def __init__(self, tables: Iterable[tuple[str, str]]) -> None:
        self._watched = {(FAMILIES[family], name.encode() + b"\0") for family, name in tables}
        self._touched = 0

    def feed(self, data: bytes) -> list[Generation]:
        out: list[Generation] = []
        off = 0
        while off + NLMSG_HDR.size <= len(data):
            length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, off)
            if length < NLMSG_HDR.size or off + length > len(data):
                self._touched += 1  # broken framing: the rest is unreadable
                break
            if msg_type >> 8 == NFNL_SUBSYS_NFTABLES:
                self._message(data, off, length, msg_type & 0xFF, out)
            off += (length + 3) & ~3
        return out

    def _message(self, data: bytes, off: int, length: int, kind: int, out: list[Generation]) -> None:
        body, end = off + NLMSG_HDR.size, off + length
        if kind == NFT_MSG_NEWGEN:
            attrs = _attrs(data, body + NFGENMSG, end)
            comm = attrs.get(NFTA_GEN_PROC_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
            out.append(
                Generation(
                    gen_id=_u32(attrs, NFTA_GEN_ID),
                    pid=_u32(attrs, NFTA_GEN_PROC_PID),
                    comm=comm,
                    touched=self._touched,
                )
            )
            self._touched = 0
        elif body + NFGENMSG > end:
            self._touched += 1
        else:
            table = _table(data, body + NFGENMSG, end)
            if table is None or (data[body], table) in self._watched:
                self._touched += 1

    def reset(self) -> None:
        """Forget the commit in progress (after lost events its messages are incomplete anyway)."""
        self._touched = 0


class NftMonitor:
    """A listener on the nftables event group of namespace `netns` (None: the caller's own).

    Raises `NotFoundError` when the namespace does not exist, `PermissionDeniedError` without CAP_NET_ADMIN
    (needed to join the group), `KernelError` when the socket cannot be opened. `read(timeout)` returns the
    generations committed since the last call; it raises `KernelError` when the socket fails (other than an
    overrun, which is reported as `Batch.lost`). One thread reads at a time.
    """

    def __init__(
        self,
        tables: Iterable[tuple[str, str]],
        *,
        netns: str | None = None,
        rcvbuf: int = 32 * 1024 * 1024,
    ) -> None:
        self.netns = netns
        self._where = f"nftables events in netns {netns!r}" if netns else "nftables events"
        self._parser = GenerationParser(tables)
        self._buf = bytearray(_RECV_BUFSIZE)
        self._sock: socket.socket | None = self._open(netns, rcvbuf)
        # Events were lost and the commit they belonged to has not ended yet: its count is unknown, so the
        # batch that holds its generation is reported as lost too (never as a commit that touched nothing).
        self._interrupted = False

    def _open(self, netns: str | None, rcvbuf: int) -> socket.socket:
        return netfilter_socket(
            netns, what=self._where, groups=1 << (NFNLGRP_NFTABLES - 1), rcvbuf=rcvbuf, blocking=False
        )

    def read(self, timeout: float, *, wake: int | None = None) -> Batch:
        """What was committed since the last call; waits up to `timeout` seconds for something to arrive,
        or until file descriptor `wake` is readable (a stop signal: then it returns at once)."""
        sock = self._live()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if wake is not None:
            poller.register(wake, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(0, int(timeout * 1000 + 0.999)))}
        if sock.fileno() not in ready:
            return Batch()
        generations: list[Generation] = []
        lost = False
        for _ in range(_MAX_RECVS_PER_READ):
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    self._interrupted = True
                    self._parser.reset()
                    continue
                raise KernelError(f"{self._where}: receive failed: {exc.strerror or exc}") from None
            if n == 0:
                raise KernelError(f"{self._where}: the socket was closed")
            generations.extend(self._parser.feed(bytes(self._buf[:n])))
        if self._interrupted and (lost or generations):
            lost = True  # this batch holds (or may hold) the interrupted commit's generation
            self._interrupted = not generations
        return Batch(tuple(generations), lost)

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise BugError(f"{self._where}: the monitor is closed")
        return self._sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
