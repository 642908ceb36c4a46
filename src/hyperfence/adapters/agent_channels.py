"""The host ends of the agent channels, one per VM, multiplexed on one selector.

A channel spec (stored at enrolment) says how the host reaches one VM's agent:

    {"type": "unix", "path": P}     the host listens on unix socket P (lab VMs, agents on this filesystem)
    {"type": "virtio", "path": P}   QEMU listens on P, the host end of the VM's virtio-serial port: the
                                    host connects (and reconnects) to it
    {"type": "tls"}                 the agent connects over TCP+TLS to the host's agent endpoint (one
                                    listener for every such VM, `listen_tls`)

Trust. A connection the host accepted (unix or TLS) is nobody's channel until its first frame proves it:
the `claim` callback checks that frame's MAC with the key of the VM it is for (the listener's VM for a unix
channel; for TLS, a VM the frame names, among those enrolled with a TLS channel) and that its seq is fresh.
Only then does the connection become that VM's channel, replacing the VM's previous one (an agent that
reconnected). A claim that does not verify never reaches the VM: not its counts, not its rate budget, not
its live connection; it is counted here (`refused`) and the connection is closed. A virtio channel is the
VM's by construction (the host dials QEMU's socket for that VM).

Waiting connections are bounded three ways, so one VM cannot lock the others out: each must complete TLS
and send a verified first frame of at most MAX_CLAIM_FRAME bytes within CLAIM_TIMEOUT seconds; at most
MAX_PENDING_PER_SOURCE wait per source address (a VM can only send from its own addresses: anti-spoofing),
and MAX_PENDING TLS connections in all; new connections per source are rate-limited (ACCEPT_RATE/s, burst ACCEPT_BURST).

Reading is fair: at most one `recv` of READ_CHUNK bytes per ready channel per round (plus what TLS already
decrypted), so a VM that floods its channel cannot starve the others, and memory per channel is bounded by
one frame (wire.MAX_FRAME) plus one chunk. No input ends the loop: an unexpected error on one connection is
logged and closes that connection only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hyperfence import wire

log = logging.getLogger("hyperfence.agents")

READ_CHUNK = 64 * 1024
RECONNECT_EVERY = 1.0  # seconds between attempts to reach a virtio channel's socket
CLAIM_TIMEOUT = 5.0  # an agent sends its hello right after connecting
MAX_PENDING = 256
MAX_PENDING_PER_SOURCE = 4
ACCEPT_RATE = 2.0  # new connections per second and source address (an agent reconnects once per second)
ACCEPT_BURST = 8.0
MAX_CLAIM_FRAME = 64 * 1024  # a hello is ~200 bytes, a beat 2-10 KB
LOG_EVERY = 10.0
MAX_SOURCES = 4096  # accept-rate buckets kept; idle ones are forgotten beyond this

OnFrame = Callable[[str, bytes], None]
OnRefused = Callable[[str, str, str], None]
# (the VM whose channel the connection came in on, None for TLS; its first frame) -> the VM it is verified
# for, or None
Claim = Callable[[str | None, bytes], str | None]

# Why connections were closed before they became any VM's channel (the keys of `Hub.refused`).
STRANGER_REASONS = ("unverified", "timeout", "busy", "rate", "oversized", "handshake", "closed", "error")


@dataclass
class _Conn:
    vm: str
    sock: socket.socket
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)


@dataclass
class _Pending:
    """An accepted connection that is nobody's channel yet: in its TLS handshake, or before its first frame."""

    sock: socket.socket
    since: float
    source: str  # "tls:ADDRESS" or "unix:VM"
    vm: str | None  # the listener's VM (unix); None: TLS, any TLS-enrolled VM may claim it
    handshaken: bool
    reader: wire.FrameReader = field(default_factory=lambda: wire.FrameReader(MAX_CLAIM_FRAME))


@dataclass
class _Listener:
    vm: str
    path: str
    sock: socket.socket


@dataclass
class _Bucket:
    tokens: float
    at: float


class Hub:
    def __init__(
        self, on_frame: OnFrame, on_refused: OnRefused, claim: Claim, *, now: Callable[[], float]
    ) -> None:
        self.on_frame = on_frame
        self.on_refused = on_refused
        self.claim = claim
        self.now = now
        self.sel = selectors.DefaultSelector()
        self.specs: dict[str, dict[str, Any]] = {}
        self.listeners: dict[str, _Listener] = {}
        self.conns: dict[str, _Conn] = {}
        self.refused: Counter[str] = Counter()  # strangers' connections, by STRANGER_REASONS
        self.claimed = 0  # connections that became a VM's channel by a verified first frame
        self._next_try: dict[str, float] = {}
        self._tls: tuple[socket.socket, ssl.SSLContext] | None = None
        self._pending: dict[int, _Pending] = {}
        self._per_source: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._logged: dict[str, float] = {}
        self._wake: int | None = None  # a stop signal's descriptor in the selector (see `poll`)

    # --- the TLS endpoint ---------------------------------------------------------------------------

    def listen_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """Accept agents over TCP+TLS on `sock` (a listening socket the caller made, in the namespace where
        the VMs reach it), instead of any earlier endpoint. Channels already claimed stay open."""
        self.close_tls()
        sock.setblocking(False)
        self._tls = (sock, context)
        self.sel.register(sock, selectors.EVENT_READ, ("tls-listen", ""))

    def close_tls(self) -> None:
        """Stop accepting over TLS (connections already claimed stay; waiting ones are closed)."""
        if self._tls is None:
            return
        self._forget(self._tls[0])
        self._tls = None
        for fd in [fd for fd, p in self._pending.items() if p.vm is None]:
            self._close_pending(fd)

    # --- the set of channels ---------------------------------------------------------------------

    def sync(self, specs: dict[str, dict[str, Any]]) -> None:
        """Open the channels of `specs` (VM id -> spec) that are not open, close those of other VMs."""
        for vm in [v for v in self.specs if self.specs[v] != specs.get(v)]:
            self._close_vm(vm)
        for vm, spec in specs.items():
            if vm not in self.specs:
                self.specs[vm] = spec
                if spec.get("type") == "unix":
                    self._listen(vm, str(spec["path"]))
        self._reconnect()

    def _listen(self, vm: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.error("agent channel of VM %s: cannot listen on %s: %s", vm, path, e)
            return
        self.listeners[vm] = _Listener(vm, path, sock)
        self.sel.register(sock, selectors.EVENT_READ, ("listen", vm))

    def _reconnect(self) -> None:
        now = self.now()
        for vm, spec in self.specs.items():
            if spec.get("type") != "virtio" or vm in self.conns or self._next_try.get(vm, 0.0) > now:
                continue
            self._next_try[vm] = now + RECONNECT_EVERY
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(spec["path"]))
            except OSError:
                sock.close()
                continue
            self._adopt(vm, sock, wire.FrameReader())

    def _adopt(self, vm: str, sock: socket.socket, reader: wire.FrameReader) -> _Conn:
        old = self.conns.pop(vm, None)
        if old is not None:
            self._drop_conn(old, replaced=True)
        sock.setblocking(False)
        reader.max_frame = wire.MAX_FRAME
        conn = _Conn(vm, sock, reader)
        self.conns[vm] = conn
        self.sel.register(sock, selectors.EVENT_READ, ("conn", vm))
        return conn

    def _close_vm(self, vm: str) -> None:
        self.specs.pop(vm, None)
        lst = self.listeners.pop(vm, None)
        if lst is not None:
            self._forget(lst.sock)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lst.path)
        for fd in [fd for fd, p in self._pending.items() if p.vm == vm]:
            self._close_pending(fd)
        conn = self.conns.pop(vm, None)
        if conn is not None:
            self._drop_conn(conn, replaced=True)

    def _drop_conn(self, conn: _Conn, *, replaced: bool = False) -> None:
        self._forget(conn.sock)
        if conn.reader.pending and not replaced:
            self.on_refused(
                conn.vm, "truncated", f"channel closed inside a frame ({conn.reader.pending} bytes)"
            )
        if self.conns.get(conn.vm) is conn:
            del self.conns[conn.vm]

    # --- traffic --------------------------------------------------------------------------------------

    def poll(self, timeout: float, *, wake: int | None = None) -> None:
        """One round: accept, read what is ready (one chunk per channel), reconnect virtio channels, close
        connections that waited too long for their claim. The wait ends early when file descriptor `wake`
        (a stop signal) is readable."""
        if wake != self._wake:
            if self._wake is not None:
                self.sel.unregister(self._wake)
            if wake is not None:
                self.sel.register(wake, selectors.EVENT_READ, ("wake", ""))
            self._wake = wake
        for key, _ in self.sel.select(timeout):
            role, vm = key.data
            if role == "wake":
                continue
            try:
                self._ready(role, vm, key)
            except Exception:  # a bug or an OS surprise: that connection goes, the receiver does not
                self._warn("error", "agent channels: unexpected error, connection closed", exc_info=True)
                self._close_fileobj(key.fileobj)
        self._reconnect()
        self._expire_pending()

    def _ready(self, role: str, vm: str, key: selectors.SelectorKey) -> None:
        if role == "listen":
            self._accept_unix(vm)
        elif role == "tls-listen":
            self._accept_tls()
        elif role == "pending":
            pending = self._pending.get(key.fd)
            if pending is not None:
                self._advance(key.fd, pending)
        else:
            conn = self.conns.get(vm)
            if conn is not None and conn.sock is key.fileobj:
                self._read(conn)

    def _read(self, conn: _Conn) -> None:
        while True:
            data = _recv(conn.sock)
            if data is None:
                return
            if not data:
                self._drop_conn(conn)
                return
            try:
                for frame in conn.reader.feed(data):
                    self.on_frame(conn.vm, frame)
            except wire.WireError as e:  # an impossible length: the stream cannot be followed any more
                self.on_refused(conn.vm, e.reason, e.detail + "; channel closed")
                self._drop_conn(conn, replaced=True)
                return
            # decrypted bytes the selector cannot see
            if not (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
                return
            if self.conns.get(conn.vm) is not conn:
                return

    # --- connections that must prove whose they are --------------------------------------------------

    def _accept_unix(self, vm: str) -> None:
        lst = self.listeners.get(vm)
        if lst is None:
            return
        try:
            sock, _ = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._wait_for_claim(sock, f"unix:{vm}", vm, handshaken=True)

    def _accept_tls(self) -> None:
        if self._tls is None:
            return
        listener, context = self._tls
        try:
            raw, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        source = f"tls:{peer[0]}" if isinstance(peer, tuple) else "tls:?"
        if not self._admit(source):
            raw.close()
            return
        raw.setblocking(False)
        try:
            sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            raw.close()
            return
        self._wait_for_claim(sock, source, None, handshaken=False)

    def _admit(self, source: str) -> bool:
        """May `source` open one more waiting connection (rate and count limits)?"""
        now = self.now()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES:
                self._buckets = {s: b for s, b in self._buckets.items() if now - b.at < 60.0}
            bucket = self._buckets[source] = _Bucket(ACCEPT_BURST, now)
        bucket.tokens = min(ACCEPT_BURST, bucket.tokens + max(0.0, now - bucket.at) * ACCEPT_RATE)
        bucket.at = now
        if bucket.tokens < 1.0:
            self._stranger("rate", source, f"more than {ACCEPT_RATE:g} new connections/s")
            return False
        bucket.tokens -= 1.0
        # The total bounds TLS only: a unix channel is one VM's own listener, so its 4 are already a bound.
        tls_waiting = (
            sum(1 for p in self._pending.values() if p.vm is None) if source.startswith("tls:") else 0
        )
        if self._per_source[source] >= MAX_PENDING_PER_SOURCE or tls_waiting >= MAX_PENDING:
            self._stranger(
                "busy",
                source,
                f"{self._per_source[source]} connections from it and {tls_waiting} over TLS wait "
                f"(at most {MAX_PENDING_PER_SOURCE} per source and {MAX_PENDING} in all)",
            )
            return False
        return True

    def _wait_for_claim(self, sock: socket.socket, source: str, vm: str | None, *, handshaken: bool) -> None:
        if vm is not None and not self._admit(source):
            sock.close()
            return
        sock.setblocking(False)
        pending = _Pending(sock, self.now(), source, vm, handshaken)
        fd = sock.fileno()
        self._pending[fd] = pending
        self._per_source[source] += 1
        self.sel.register(sock, selectors.EVENT_READ, ("pending", ""))
        self._advance(fd, pending)

    def _advance(self, fd: int, p: _Pending) -> None:
        """Drive a waiting connection: finish its TLS handshake, then read until its first frame, and hand it
        to the VM that frame is verified for."""
        if not p.handshaken:
            assert isinstance(p.sock, ssl.SSLSocket)  # noqa: S101 - only TLS connections start unshaken
            try:
                p.sock.do_handshake()
            except ssl.SSLWantReadError:
                self.sel.modify(p.sock, selectors.EVENT_READ, ("pending", ""))
                return
            except ssl.SSLWantWriteError:
                self.sel.modify(p.sock, selectors.EVENT_WRITE, ("pending", ""))
                return
            except (ssl.SSLError, OSError) as e:
                self._close_pending(fd, "handshake", f"TLS handshake failed: {e}")
                return
            p.handshaken = True
            self.sel.modify(p.sock, selectors.EVENT_READ, ("pending", ""))
        data = _recv(p.sock)
        if data is None:
            return
        if not data:
            self._close_pending(fd, "closed", "closed before sending a whole frame")
            return
        try:
            first = next(iter(p.reader.feed(data)), None)
        except wire.WireError as e:
            self._close_pending(fd, "oversized", f"first frame refused: {e.detail}")
            return
        if first is None:
            return
        vm = self.claim(p.vm, first)
        if vm is None:
            named = ", ".join(repr(v) for v in wire.named_vms(first)) or "no VM"
            self._close_pending(
                fd, "unverified", f"first frame names {named} but does not verify with that VM's key"
            )
            return
        self._unwait(fd)
        self.sel.unregister(p.sock)
        conn = self._adopt(vm, p.sock, p.reader)
        self.claimed += 1
        self.on_frame(vm, first)
        if self.conns.get(vm) is conn:
            try:
                for frame in conn.reader.feed(b""):
                    self.on_frame(vm, frame)
            except wire.WireError as e:
                self.on_refused(vm, e.reason, e.detail + "; channel closed")
                self._drop_conn(conn, replaced=True)

    def _unwait(self, fd: int) -> _Pending | None:
        p = self._pending.pop(fd, None)
        if p is not None:
            self._per_source[p.source] -= 1
            if self._per_source[p.source] <= 0:
                del self._per_source[p.source]
        return p

    def _close_pending(self, fd: int, reason: str | None = None, detail: str = "") -> None:
        p = self._unwait(fd)
        if p is None:
            return
        self._forget(p.sock)
        if reason is not None:
            self._stranger(reason, p.source, detail)

    def _expire_pending(self) -> None:
        now = self.now()
        for fd in [fd for fd, p in self._pending.items() if now - p.since > CLAIM_TIMEOUT]:
            self._close_pending(fd, "timeout", f"no verified frame within {CLAIM_TIMEOUT:g} s")

    def _stranger(self, reason: str, source: str, detail: str) -> None:
        self.refused[reason] += 1
        self._warn(reason, f"agent channels: refused a connection from {source}: {detail}")

    def _warn(self, what: str, message: str, *, exc_info: bool = False) -> None:
        """Log, at most once per LOG_EVERY seconds per kind (the counts keep the rest)."""
        now = self.now()
        if now - self._logged.get(what, -LOG_EVERY) >= LOG_EVERY:
            self._logged[what] = now
            log.warning("%s (%s so far: %d)", message, what, self.refused[what], exc_info=exc_info)

    # --- closing ------------------------------------------------------------------------------------------

    def _close_fileobj(self, fileobj: Any) -> None:
        for fd, p in list(self._pending.items()):
            if p.sock is fileobj:
                self._close_pending(fd, "error", "unexpected error")
                return
        for conn in list(self.conns.values()):
            if conn.sock is fileobj:
                self._drop_conn(conn, replaced=True)
                return

    def _forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        sock.close()

    def close(self) -> None:
        for vm in list(self.specs):
            self._close_vm(vm)
        for fd in list(self._pending):
            self._close_pending(fd)
        self.close_tls()
        self.sel.close()


def _recv(sock: socket.socket) -> bytes | None:
    """Up to READ_CHUNK bytes; b"" at the end of the stream or on an error; None when nothing is there yet."""
    try:
        return sock.recv(READ_CHUNK)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except OSError:
        return b""
