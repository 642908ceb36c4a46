"""The host ends of the agent channels, one per VM, multiplexed on one selector.

A channel spec (stored at enrolment) says how the host reaches one VM's agent:

    {"type": "unix", "path": P}     the host listens on unix socket P (lab VMs, agents on this filesystem)
    {"type": "virtio", "path": P}   QEMU listens on P, the host end of the VM's virtio-serial port: the
                                    host connects (and reconnects) to it
    {"type": "tls"}                 the agent connects over TCP+TLS to the host's agent endpoint (one
                                    listener for every such VM, `listen_tls`)

Identity comes from the channel: every byte read from VM v's channel is handed on as v's. A TLS connection
is not any VM's channel until its first frame names a VM enrolled with a TLS channel; from then on it is that
VM's, and every frame is checked against that VM's key as usual (so a stranger can at worst have frames
counted as forged against the VM it names; it cannot speak for it). Handshakes and unclaimed connections are
closed after TLS_CLAIM_TIMEOUT seconds; at most TLS_MAX_PENDING wait at a time. A new connection on
a VM's listening socket replaces the previous one (an agent that restarted). Reading is fair: at most one
`recv` of READ_CHUNK bytes per ready channel per round, so a VM that floods its channel cannot starve the
others, and memory per channel is bounded by one frame (wire.MAX_FRAME) plus one chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hyperfence.agent import wire

log = logging.getLogger("hyperfence.agents")

READ_CHUNK = 64 * 1024
RECONNECT_EVERY = 1.0  # seconds between attempts to reach a virtio channel's socket
TLS_CLAIM_TIMEOUT = 10.0
TLS_MAX_PENDING = 64

OnFrame = Callable[[str, bytes], None]
OnRefused = Callable[[str, str, str], None]


@dataclass
class _Conn:
    vm: str
    sock: socket.socket
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)


@dataclass
class _Pending:
    """A TLS connection in its handshake, or not yet claimed by a VM."""

    sock: ssl.SSLSocket
    since: float
    handshaken: bool = False
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)


@dataclass
class _Listener:
    vm: str
    path: str
    sock: socket.socket


class Hub:
    def __init__(self, on_frame: OnFrame, on_refused: OnRefused, *, now: Callable[[], float]) -> None:
        self.on_frame = on_frame
        self.on_refused = on_refused
        self.now = now
        self.sel = selectors.DefaultSelector()
        self.specs: dict[str, dict[str, Any]] = {}
        self.listeners: dict[str, _Listener] = {}
        self.conns: dict[str, _Conn] = {}
        self._next_try: dict[str, float] = {}
        self._tls: tuple[socket.socket, ssl.SSLContext] | None = None
        self._pending: dict[int, _Pending] = {}

    def listen_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """Accept agents over TCP+TLS on `sock` (a listening socket the caller made, in the namespace where
        the VMs reach it)."""
        sock.setblocking(False)
        self._tls = (sock, context)
        self.sel.register(sock, selectors.EVENT_READ, ("tls-listen", ""))

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
            self._adopt(vm, sock)

    def _adopt(self, vm: str, sock: socket.socket) -> None:
        old = self.conns.pop(vm, None)
        if old is not None:
            self._drop_conn(old, replaced=True)
        sock.setblocking(False)
        conn = _Conn(vm, sock)
        self.conns[vm] = conn
        self.sel.register(sock, selectors.EVENT_READ, ("conn", vm))

    def _close_vm(self, vm: str) -> None:
        self.specs.pop(vm, None)
        lst = self.listeners.pop(vm, None)
        if lst is not None:
            self.sel.unregister(lst.sock)
            lst.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lst.path)
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

    def poll(self, timeout: float) -> None:
        """One round: accept, read what is ready (one chunk per channel), reconnect virtio channels."""
        for key, _ in self.sel.select(timeout):
            role, vm = key.data
            if role == "listen":
                self._accept(vm)
            elif role == "tls-listen":
                self._accept_tls()
            elif role == "tls-pending":
                pending = self._pending.get(key.fd)
                if pending is not None:
                    self._advance(key.fd, pending)
            else:
                conn = self.conns.get(vm)
                if conn is not None and conn.sock is key.fileobj:
                    self._read(conn)
        self._reconnect()
        self._expire_pending()

    def _accept(self, vm: str) -> None:
        lst = self.listeners.get(vm)
        if lst is None:
            return
        try:
            sock, _ = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._adopt(vm, sock)

    def _read(self, conn: _Conn) -> None:
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
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() and self.conns.get(conn.vm) is conn:
            self._read(conn)  # decrypted bytes the selector cannot see

    # --- TLS ----------------------------------------------------------------------------------------------

    def _accept_tls(self) -> None:
        if self._tls is None:
            return
        listener, context = self._tls
        try:
            raw, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._pending) >= TLS_MAX_PENDING:
            raw.close()
            log.warning("agent TLS endpoint: %d connections already wait; refused one", TLS_MAX_PENDING)
            return
        raw.setblocking(False)
        try:
            sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            raw.close()
            return
        pending = _Pending(sock, self.now())
        self._pending[sock.fileno()] = pending
        self.sel.register(sock, selectors.EVENT_READ, ("tls-pending", ""))
        self._advance(sock.fileno(), pending)

    def _advance(self, fd: int, p: _Pending) -> None:
        """Drive a pending TLS connection: finish the handshake, then read until its first frame names a VM."""
        if not p.handshaken:
            try:
                p.sock.do_handshake()
            except ssl.SSLWantReadError:
                self.sel.modify(p.sock, selectors.EVENT_READ, ("tls-pending", ""))
                return
            except ssl.SSLWantWriteError:
                self.sel.modify(p.sock, selectors.EVENT_WRITE, ("tls-pending", ""))
                return
            except (ssl.SSLError, OSError) as e:
                log.info("agent TLS endpoint: a handshake failed: %s", e)
                self._close_pending(fd)
                return
            p.handshaken = True
            self.sel.modify(p.sock, selectors.EVENT_READ, ("tls-pending", ""))
        data = _recv(p.sock)
        if data is None:
            return
        if not data:
            self._close_pending(fd)
            return
        try:
            frames = list(p.reader.feed(data))
        except wire.WireError:
            self._close_pending(fd)
            return
        if not frames:
            return
        vm = _claimed_vm(frames[0])
        if vm is None or self.specs.get(vm, {}).get("type") != "tls":
            log.warning("agent TLS endpoint: a connection named no VM enrolled with a TLS channel; closed")
            self._close_pending(fd)
            return
        self.sel.unregister(p.sock)
        del self._pending[fd]
        self._adopt(vm, p.sock)
        conn = self.conns[vm]
        conn.reader = p.reader
        for frame in frames:
            self.on_frame(vm, frame)

    def _forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        sock.close()

    def _close_pending(self, fd: int) -> None:
        p = self._pending.pop(fd, None)
        if p is not None:
            self._forget(p.sock)

    def _expire_pending(self) -> None:
        now = self.now()
        for fd in [fd for fd, p in self._pending.items() if now - p.since > TLS_CLAIM_TIMEOUT]:
            self._close_pending(fd)

    def close(self) -> None:
        for vm in list(self.specs):
            self._close_vm(vm)
        for fd in list(self._pending):
            self._close_pending(fd)
        if self._tls is not None:
            self._tls[0].close()
        self.sel.close()


def _recv(sock: socket.socket) -> bytes | None:
    """Up to READ_CHUNK bytes; b"" at the end of the stream or on an error; None when nothing is there yet."""
    try:
        return sock.recv(READ_CHUNK)
    except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except OSError:
        return b""


def _claimed_vm(frame: bytes) -> str | None:
    """The VM a frame names (not verified: the tracker checks the MAC with that VM's key)."""
    try:
        body = json.loads(frame[1 + wire.MAC_LEN :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    vm = body.get("vm") if isinstance(body, dict) else None
    return vm if isinstance(vm, str) else None
