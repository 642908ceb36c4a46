"""The host ends of the agent channels, one per VM, multiplexed on one selector.

A channel spec (stored at enrolment) says how the host reaches one VM's agent:

    {"type": "unix", "path": P}     the host listens on unix socket P (lab VMs, agents on this filesystem)
    {"type": "virtio", "path": P}   QEMU listens on P, the host end of the VM's virtio-serial port: the
                                    host connects (and reconnects) to it

Identity comes from the channel: every byte read from VM v's channel is handed on as v's. A new connection on
a VM's listening socket replaces the previous one (an agent that restarted). Reading is fair: at most one
`recv` of READ_CHUNK bytes per ready channel per round, so a VM that floods its channel cannot starve the
others, and memory per channel is bounded by one frame (wire.MAX_FRAME) plus one chunk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hyperfence.agent import wire

log = logging.getLogger("hyperfence.agents")

READ_CHUNK = 64 * 1024
RECONNECT_EVERY = 1.0  # seconds between attempts to reach a virtio channel's socket

OnFrame = Callable[[str, bytes], None]
OnRefused = Callable[[str, str, str], None]


@dataclass
class _Conn:
    vm: str
    sock: socket.socket
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
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
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
            else:
                conn = self.conns.get(vm)
                if conn is not None and conn.sock is key.fileobj:
                    self._read(conn)
        self._reconnect()

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
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_conn(conn)
            return
        try:
            for frame in conn.reader.feed(data):
                self.on_frame(conn.vm, frame)
        except wire.WireError as e:  # an impossible length: the stream cannot be followed any more
            self.on_refused(conn.vm, e.reason, e.detail + "; channel closed")
            self._drop_conn(conn, replaced=True)

    def close(self) -> None:
        for vm in list(self.specs):
            self._close_vm(vm)
        self.sel.close()
