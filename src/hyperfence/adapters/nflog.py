"""Read packets that nftables rules log with `log group N` (NFLOG, nfnetlink_log), in one network namespace.

An `NflogReader` owns one AF_NETLINK/NETLINK_NETFILTER socket created *inside* the target namespace (NFLOG
groups are per namespace: a rule in namespace A logging to group 5 reaches only the group-5 reader of A). It
binds the group, asks for packet copies, and turns what the kernel sends into frozen `NflogPacket`s (decoding
is pure and lives in `nflog_parse`).

Kernel behaviour this relies on (measured on this host, kernel 6.x):

* A group has at most one listener per namespace. A *second socket* binding a taken group gets **EPERM**
  (the same socket binding twice gets EBUSY); closing the owner releases the group at once.
* The kernel batches log messages: it sends when `max_batch` messages are queued or `max_delay` has passed
  (`NFULA_CFG_QTHRESH`, `NFULA_CFG_TIMEOUT`; kernel defaults are 100 messages / 1 s, far too slow for a
  detector), and ends each batch with `NLMSG_DONE`.
* If we read too slowly the socket's receive buffer overflows: the kernel drops the batch and the next
  `recv` fails once with ENOBUFS. That is counted in `dropped_overruns` (one count = at least one lost batch)
  and reading continues.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from types import TracebackType
from typing import Self

from hyperfence.codec.nflog import (
    NFNL_SUBSYS_ULOG,
    NFULNL_MSG_CONFIG,
    NLA_HDR,
    NLMSG_HDR,
    NflogBatch,
    NflogPacket,
    parse_nflog,
    parse_nflog_batch,
)
from hyperfence.errors import (
    BugError,
    InvalidInputError,
    KernelError,
    PermissionDeniedError,
    Problem,
)
from hyperfence.system.netlink import netfilter_socket

__all__ = ["NflogPacket", "NflogReader", "parse_nflog", "parse_nflog_batch"]

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
COPY_RANGE_MAX = 0xFFFF

# One datagram holds one kernel batch: at most max(nlbufsiz (4 KiB default), one message with a 64 KiB copy).
_RECV_BUFSIZE = 256 * 1024
# Datagrams read per `read()` call once data is there, so one busy group cannot starve its caller.
_MAX_RECVS_PER_READ = 256
_CAP_NET_ADMIN = 12


def _nla(kind: int, value: bytes) -> bytes:
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, kind) + value + b"\0" * (-length % 4)


def _config_message(group: int, attrs: bytes, seq: int) -> bytes:
    # struct nfgenmsg: family AF_UNSPEC, version 0, res_id = group (big-endian).
    body = struct.pack(">BBH", socket.AF_UNSPEC, 0, group) + attrs
    msg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


class NflogReader:
    """A listener on NFLOG group `group` of namespace `netns` (None: the caller's namespace).

    The constructor binds the group and configures it, or raises: `InvalidInputError` for out-of-range
    arguments, `NotFoundError` when the namespace does not exist, `PermissionDeniedError` without
    CAP_NET_ADMIN, `KernelError` when the kernel refuses (typically: the group is already bound in that
    namespace by another socket). Nothing is left open when it raises.

    `copy_range` is how many bytes of each packet (from the network header) the kernel copies, 1..65535;
    128 covers IPv4/IPv6 + TCP/UDP/ICMP headers and ARP. `max_batch` / `max_delay` (seconds, 10 ms
    granularity) bound how long a logged packet waits in the kernel. `rcvbuf` is the socket receive buffer
    in bytes (forced past `net.core.rmem_max` when we may).

    Counters, cumulative: `dropped_overruns` (receive-buffer overruns, each losing at least one batch),
    `malformed` (messages that could not be decoded; should stay 0 with a real kernel).

    One thread reads at a time. For an event loop, call `read(0)` once after construction (packets that
    arrived while the group was being configured are held back without making the socket readable), then
    whenever `fileno()` is readable.
    """

    def __init__(
        self,
        group: int,
        *,
        netns: str | None = None,
        copy_range: int = 128,
        max_batch: int = 32,
        max_delay: float = 0.01,
        rcvbuf: int = 8 * 1024 * 1024,
        ack_timeout: float = 2.0,
    ) -> None:
        problems = []
        if not 0 <= group <= 0xFFFF:
            problems.append(Problem("group", f"{group} is not an NFLOG group (0..65535)"))
        if not 1 <= copy_range <= COPY_RANGE_MAX:
            problems.append(Problem("copy_range", f"{copy_range} is outside 1..{COPY_RANGE_MAX}"))
        if not 1 <= max_batch <= 0xFFFFFFFF:
            problems.append(Problem("max_batch", f"{max_batch} is not a positive 32-bit count"))
        if not 0 <= max_delay <= 3600:
            problems.append(Problem("max_delay", f"{max_delay} s is outside 0..3600 s"))
        if not 4096 <= rcvbuf <= 1 << 30:
            problems.append(Problem("rcvbuf", f"{rcvbuf} bytes is outside 4 KiB..1 GiB"))
        if not ack_timeout > 0:
            problems.append(Problem("ack_timeout", f"{ack_timeout} s is not positive"))
        if problems:
            raise InvalidInputError("NflogReader: invalid arguments", problems)

        self.group = group
        self.netns = netns
        self.copy_range = copy_range
        self.dropped_overruns = 0
        self.malformed = 0
        self._where = f"NFLOG group {group} in netns {netns!r}" if netns else f"NFLOG group {group}"
        self._seq = 0
        self._pending: list[NflogPacket] = []
        self._buf = bytearray(_RECV_BUFSIZE)
        self._sock: socket.socket | None = None

        sock = self._open_socket(netns, rcvbuf)
        self._sock = sock
        try:
            self._request(_nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), "bind", ack_timeout)
            settings = (
                _nla(NFULA_CFG_MODE, struct.pack(">IBB", copy_range, NFULNL_COPY_PACKET, 0))
                + _nla(NFULA_CFG_QTHRESH, struct.pack(">I", max_batch))
                + _nla(NFULA_CFG_TIMEOUT, struct.pack(">I", round(max_delay * 100)))
            )
            self._request(settings, "configure", ack_timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_socket(netns: str | None, rcvbuf: int) -> socket.socket:
        return netfilter_socket(netns, what="NFLOG", rcvbuf=rcvbuf, blocking=False)

    def _request(self, attrs: bytes, what: str, timeout: float) -> None:
        """Send one config request and wait for its ACK; packets that arrive meanwhile are kept."""
        sock = self._live_socket()
        self._seq += 1
        seq = self._seq
        try:
            sock.send(_config_message(self.group, attrs, seq))
        except OSError as exc:
            raise KernelError(f"{self._where}: {what} request failed: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wait_readable(remaining, None):
                raise KernelError(f"{self._where}: no answer from nfnetlink_log to the {what} request")
            for batch in self._recv_available():
                self._pending.extend(batch.packets)
                for ack in batch.acks:
                    if ack.seq == seq:
                        if ack.error:
                            self._raise_refused(what, -ack.error)
                        return

    def _raise_refused(self, what: str, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        if what == "bind" and err in (errno.EPERM, errno.EBUSY):
            if err == errno.EPERM and not _has_cap_net_admin():
                raise PermissionDeniedError(f"{self._where}: binding needs CAP_NET_ADMIN; run as root")
            raise KernelError(
                f"{self._where} is already bound by another socket ({name}): another hyperfence, ulogd or an "
                "unclosed reader listens on it; stop it or use another group"
            )
        raise KernelError(
            f"{self._where}: the kernel refused the {what} request: {name} ({os.strerror(err)})"
        )

    def _live_socket(self) -> socket.socket:
        if self._sock is None:
            raise BugError(f"{self._where}: the reader is closed")
        return self._sock

    def _wait_readable(self, timeout: float | None, wake: int | None) -> bool:
        sock = self._live_socket()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if wake is not None:
            poller.register(wake, select.POLLIN)
        ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        return any(fd == sock.fileno() for fd, _ in ready)

    def _recv_available(self) -> list[NflogBatch]:
        """Decode every datagram already queued (up to a bound); counts overruns and malformed messages."""
        sock = self._live_socket()
        batches = []
        for _ in range(_MAX_RECVS_PER_READ):
            try:
                n = sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.dropped_overruns += 1  # the kernel dropped what did not fit; the socket still works
                    continue
                raise KernelError(f"{self._where}: receive failed: {exc.strerror or exc}") from None
            batch = parse_nflog_batch(bytes(self._buf[:n]))
            self.malformed += batch.malformed
            batches.append(batch)
        return batches

    def read(self, timeout: float | None, *, wake: int | None = None) -> list[NflogPacket]:
        """The packets logged since the last call, oldest first; waits up to `timeout` seconds for the first.

        `timeout=None` waits until at least one packet arrives, `0` only takes what is queued. Returns `[]`
        when the time runs out, or at once when file descriptor `wake` is readable (a stop signal). Raises `BugError` after `close()`, `KernelError` if the socket fails in a way
        other than an overrun (overruns are counted in `dropped_overruns`, not raised).
        """
        self._live_socket()
        packets, self._pending = self._pending, []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for batch in self._recv_available():
                packets.extend(batch.packets)
            if packets:
                return packets
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return packets
            if not self._wait_readable(remaining, wake):
                return packets

    def fileno(self) -> int:
        """The socket's file descriptor (readable when `read(0)` has something to return)."""
        return self._live_socket().fileno()

    def close(self) -> None:
        """Release the group (the kernel unbinds it when the socket closes). Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
