"""Test doubles for the agent: a real receiver (unix socket or TLS on 127.0.0.1) that verifies every frame with
`wire.verify` and enforces increasing seqs, a fake clock, and certificates made with the openssl CLI."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyperfence import wire

KEY = bytes(range(32))
VM = "vm-test"


class Receiver:
    """Accepts connections one at a time in a thread; `messages` holds every verified body in arrival order.
    `stop()` closes the listener and the connection (the host goes away); `start()` brings it back."""

    def __init__(
        self, *, unix_path: Path | None = None, tls: ssl.SSLContext | None = None, key: bytes = KEY
    ) -> None:
        self.unix_path = unix_path
        self.tls = tls
        self.key = key
        self.port = 0
        self.messages: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.last_seq = -1
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    def start(self) -> Receiver:
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(self.unix_path))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            self.port = s.getsockname()[1]
        s.listen(4)
        s.settimeout(0.05)
        self._listener = s
        self._thread = threading.Thread(target=self._serve, args=(s,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        s, self._listener = self._listener, None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if s is not None:
            s.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._conns.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()

    def wait_for(
        self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [m["kind"] for m in self.messages]
                    raise AssertionError(
                        f"timed out; got {len(kinds)} messages {kinds[-10:]}, errors {self.errors}"
                    )
                self._cond.wait(left)
            return list(self.messages)

    def kinds(self) -> list[str]:
        with self._cond:
            return [m["kind"] for m in self.messages]

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.tls is not None:
                try:
                    conn.settimeout(5)
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError as e:
                    self.errors.append(f"handshake: {e}")
                    conn.close()
                    continue
            conn.settimeout(0.05)
            self._conns.append(conn)
            self._read(conn, listener)

    def _read(self, conn: socket.socket, listener: socket.socket) -> None:
        reader = wire.FrameReader()
        while self._listener is listener:
            try:
                data = conn.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                return
            if not data:
                return
            for frame in reader.feed(data):
                try:
                    body = wire.verify(self.key, frame, VM)
                except wire.WireError as e:
                    self.errors.append(str(e))
                    continue
                with self._cond:
                    if body["seq"] <= self.last_seq:
                        self.errors.append(f"replayed seq {body['seq']} after {self.last_seq}")
                        continue
                    self.last_seq = body["seq"]
                    self.messages.append(body)
                    self._cond.notify_all()


class FakeClock:
    """Wall and monotonic time that move only when someone waits."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.wall = now
        self.mono = 1000.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def wait(self, event: threading.Event, seconds: float) -> bool:
        if event.is_set():
            return True
        self.advance(max(0.0, seconds))
        return event.is_set()


def make_certs(tmp: Path, *, name: str = "hf-test") -> tuple[Path, Path, Path]:
    """(ca.pem, server cert, server key) made with the openssl CLI; the server cert names `name`."""
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1", "-subj", "/CN=hf-test-ca")
    run(
        "req",
        *ec,
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        f"/CN={name}",
        "-addext",
        f"subjectAltName=DNS:{name}",
    )
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-copy_extensions", "copy",
    )  # fmt: skip
    return ca, cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
