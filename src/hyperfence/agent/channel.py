"""The agent's one channel to the host: a transport (unix socket, virtio-serial port, TLS over TCP), reconnects
with capped exponential backoff and jitter, and a bounded backlog.

Backlog semantics: every frame is queued first (`Channel.push`) and leaves the queue only once the transport
took all of it, in order. While the channel is down the queue holds at most `backlog` frames; when full, the
OLDEST frame is dropped and counted (`take_dropped`, reported in the next beat's `data.dropped`). A frame that
was half-written when a stream broke is sent again whole on the next connection (the receiver starts a new
frame reader per connection, and a frame seen twice is refused as replayed by its seq). A frame written into
a socket just before the peer vanished can still be lost: the channel is best effort, the seq lets the host
see the gap. No call blocks for longer than the send timeout.

Transports never read what the host sends (the protocol is one-way) except to notice that it went away.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import select
import socket
from typing import TYPE_CHECKING, Callable, Protocol

from hyperfence.agent.config import ChannelConfig, TlsChannel, UnixChannel, VirtioChannel

if TYPE_CHECKING:
    import ssl  # imported when a TLS channel connects: it costs ~1 MB of RSS

log = logging.getLogger("hyperfence.agent")


class Transport(Protocol):
    """Raises OSError from connect and send; `alive` is a cheap non-blocking check after connect."""

    name: str

    def connect(self, timeout: float) -> None: ...

    def alive(self) -> bool: ...

    def send(self, data: bytes, timeout: float) -> None: ...

    def close(self, *, final: bool = False) -> None: ...


class StreamTransport:
    """A connected stream socket; subclasses say how to open it."""

    name = "stream"

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._no_data_yet: tuple[type[OSError], ...] = (BlockingIOError,)

    def _open(self, timeout: float) -> socket.socket:
        raise NotImplementedError

    def connect(self, timeout: float) -> None:
        self.close()
        self._sock = self._open(timeout)

    def alive(self) -> bool:
        s = self._sock
        if s is None:
            return False
        try:
            readable, _, _ = select.select([s], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        timeout = s.gettimeout()
        s.setblocking(False)
        try:
            return s.recv(4096) != b""  # the host sends nothing; b"" is its end of stream
        except self._no_data_yet:
            return True
        except OSError:
            return False
        finally:
            s.settimeout(timeout)

    def send(self, data: bytes, timeout: float) -> None:
        if self._sock is None:
            raise OSError("not connected")
        self._sock.settimeout(timeout)
        self._sock.sendall(data)

    def close(self, *, final: bool = False) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class UnixTransport(StreamTransport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.name = f"unix:{path}"

    def _open(self, timeout: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s


class TlsTransport(StreamTransport):
    """TLS >= 1.2 to host:port; the server's certificate must chain to `ca` and name `server_name`."""

    def __init__(self, *, host: str, port: int, ca: str, server_name: str) -> None:
        super().__init__()
        self.host, self.port, self.ca, self.server_name = host, port, ca, server_name
        self.name = f"tls:{host}:{port}"
        self._context: ssl.SSLContext | None = None

    def _open(self, timeout: float) -> socket.socket:
        import ssl  # noqa: PLC0415 - only guests with a TLS channel pay for it

        self._no_data_yet = (BlockingIOError, ssl.SSLWantReadError)
        if self._context is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context = context
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            return self._context.wrap_socket(raw, server_hostname=self.server_name)
        except OSError:
            raw.close()
            raise


class VirtioTransport:
    """A virtio-serial port, found by its name in /sys/class/virtio-ports/*/name and opened ONCE (a second
    open is EBUSY) read-write, non-blocking. While no host client is connected the port polls as POLLHUP and
    writes would block: that is "down". A frame whose write stalls half-way keeps its rest here and the rest
    goes first on the next send, so the byte stream always stays whole frames."""

    def __init__(self, name: str, *, root: str = "/") -> None:
        self.port_name = name
        self.root = root
        self.name = f"virtio:{name}"
        self._fd: int | None = None
        self._rest = b""

    def find_device(self) -> str:
        ports = os.path.join(self.root, "sys/class/virtio-ports")
        try:
            entries = sorted(os.listdir(ports))
        except OSError:
            entries = []
        for entry in entries:
            try:
                with open(os.path.join(ports, entry, "name"), encoding="utf-8") as f:
                    if f.read().strip() == self.port_name:
                        return os.path.join(self.root, "dev", entry)
            except OSError:
                continue
        raise FileNotFoundError(
            f"no virtio-serial port named {self.port_name!r} in {ports} (is the <channel> in the domain XML?)"
        )

    def connect(self, timeout: float) -> None:
        if self._fd is None:
            self._fd = os.open(self.find_device(), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if not self._wait_writable(timeout):
            raise ConnectionRefusedError(f"{self.name}: no host client connected")

    def alive(self) -> bool:
        return self._fd is not None and not self._poll(0) & (
            select.POLLHUP | select.POLLERR | select.POLLNVAL
        )

    def send(self, data: bytes, timeout: float) -> None:
        if self._fd is None:
            raise OSError("not connected")
        if self._rest:
            self._rest = self._write(self._rest, timeout)
            if self._rest:
                raise TimeoutError(f"{self.name}: the host stopped reading")
        rest = self._write(data, timeout)
        if rest == data:
            raise TimeoutError(f"{self.name}: the host stopped reading")
        self._rest = rest

    def close(self, *, final: bool = False) -> None:
        if final and self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._rest = b""

    def _write(self, data: bytes, timeout: float) -> bytes:
        """What is left of `data` after writing for at most `timeout` seconds."""
        assert self._fd is not None  # noqa: S101 - callers check
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                if not self._wait_writable(timeout):
                    break
        return bytes(view)

    def _wait_writable(self, timeout: float) -> bool:
        revents = self._poll(timeout, select.POLLOUT)
        return bool(revents & select.POLLOUT) and not revents & select.POLLHUP

    def _poll(self, timeout: float, events: int = 0) -> int:
        assert self._fd is not None  # noqa: S101 - callers check
        poller = select.poll()
        poller.register(self._fd, events)
        got = poller.poll(int(timeout * 1000))
        return got[0][1] if got else 0


def make_transport(channel: ChannelConfig, *, root: str = "/") -> Transport:
    if isinstance(channel, UnixChannel):
        return UnixTransport(channel.path)
    if isinstance(channel, VirtioChannel):
        return VirtioTransport(channel.name, root=root)
    if isinstance(channel, TlsChannel):
        return TlsTransport(
            host=channel.host, port=channel.port, ca=channel.ca, server_name=channel.server_name
        )
    raise TypeError(f"unknown channel {channel!r}")


class Backoff:
    """Delays first, 2 first, 4 first ... capped at `cap`, each with "equal jitter" (between half and all of it)
    so many guests that lost the same host do not come back in step."""

    def __init__(self, *, first: float = 0.5, cap: float = 10.0, rand: random.Random | None = None) -> None:
        self.first, self.cap = first, cap
        self._rand = rand or random.Random()  # noqa: S311 - jitter, not a secret
        self._n = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * (2.0**self._n))
        self._n = min(self._n + 1, 30)
        return delay / 2 + self._rand.uniform(0, delay / 2)

    def reset(self) -> None:
        self._n = 0


class Channel:
    def __init__(
        self,
        transport: Transport,
        *,
        backlog: int,
        monotonic: Callable[[], float],
        send_timeout: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.transport = transport
        self.queue: collections.deque[bytes] = collections.deque(maxlen=backlog)
        self.monotonic = monotonic
        self.send_timeout = send_timeout
        self.backoff = backoff or Backoff()
        self.connected = False
        self.retry_at = 0.0
        self.dropped_total = 0
        self._dropped = 0
        self._failures = 0

    def push(self, frame: bytes) -> None:
        """Queue a frame; when the backlog is full the oldest one is dropped and counted."""
        if len(self.queue) == self.queue.maxlen:
            self._dropped += 1
            self.dropped_total += 1
        self.queue.append(frame)

    def take_dropped(self) -> int:
        """Frames dropped since the previous call."""
        n, self._dropped = self._dropped, 0
        return n

    def flush(self) -> int:
        """Send what the queue holds, in order, as far as the channel allows now. Returns frames sent."""
        if self.connected and not self.transport.alive():
            self._down("the host closed the channel")
        if not self.connected:
            if self.monotonic() < self.retry_at:
                return 0
            try:
                self.transport.connect(self.send_timeout)
            except OSError as e:
                self._down(f"connect failed: {e}")
                return 0
            self.connected = True
            self.backoff.reset()
            log.info("channel %s up (%d queued)", self.transport.name, len(self.queue))
            self._failures = 0
        sent = 0
        while self.queue:
            try:
                self.transport.send(self.queue[0], self.send_timeout)
            except OSError as e:
                self._down(f"send failed: {e}")
                break
            self.queue.popleft()
            sent += 1
        return sent

    def close(self) -> None:
        self.transport.close(final=True)
        self.connected = False

    def _down(self, why: str) -> None:
        was_up = self.connected
        self.transport.close()
        self.connected = False
        delay = self.backoff.next_delay()
        self.retry_at = self.monotonic() + delay
        self._failures += 1
        if was_up or self._failures == 1:
            log.warning(
                "channel %s down: %s; retrying (backoff up to %gs)",
                self.transport.name,
                why,
                self.backoff.cap,
            )
        else:
            log.debug("channel %s: %s; retry in %.1fs", self.transport.name, why, delay)
