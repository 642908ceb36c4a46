"""Netlink, the way hyperfence's own readers of the kernel speak it (nftables events and rule ids, NFLOG,
conntrack): message and attribute framing (pure), and a NETLINK_NETFILTER socket opened in a namespace."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct

from hyperfence.adapters.netns import NetnsThread, netns_path
from hyperfence.errors import KernelError, NotFoundError, PermissionDeniedError

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host byte order)
NLA_HDR = struct.Struct("=HH")  # len, type
NLA_F_NESTED = 0x8000
MAX_DRAIN = 1 << 20  # bytes a GroupWatch reads per wait at most: a burst of events is one "changed"


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLA_HDR.size + len(value)
    return NLA_HDR.pack(length, kind) + value + b"\0" * (-length % 4)


def attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """The attributes in data[off:end] by type (flags masked off; the first of a type wins). Stops at the
    first malformed one: never reads outside `end`, never raises."""
    out: dict[int, bytes] = {}
    while off + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > end:
            break
        out.setdefault(kind & 0x3FFF, data[off + NLA_HDR.size : off + length])
        off += (length + 3) & ~3
    return out


NLMSG_ERROR, NLMSG_DONE = 2, 3


def split_dump(data: bytes) -> tuple[list[tuple[int, int, int]], bool, int]:
    """One receive buffer of a netlink dump, split: its messages before NLMSG_DONE or an error, each as
    (type, payload start, message end) offsets into `data`; whether the dump is done; its errno (0, or the
    positive errno of an NLMSG_ERROR). Stops at the first malformed header: never reads past the buffer."""
    messages: list[tuple[int, int, int]] = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        if msg_type == NLMSG_DONE:
            return messages, True, 0
        if msg_type == NLMSG_ERROR:
            if off + NLMSG_HDR.size + 4 > len(data):
                return messages, True, 0
            return messages, True, -struct.unpack_from("=i", data, off + NLMSG_HDR.size)[0]
        messages.append((msg_type, off + NLMSG_HDR.size, off + length))
        off += (length + 3) & ~3
    return messages, False, 0


def netfilter_socket(
    netns: str | None,
    *,
    what: str,
    groups: int = 0,
    rcvbuf: int | None = None,
    blocking: bool = True,
    protocol: int = NETLINK_NETFILTER,
) -> socket.socket:
    """A NETLINK_NETFILTER socket (or one of another netlink `protocol`, e.g. NETLINK_ROUTE) of namespace
    `netns` (None: ours), bound to the multicast `groups` (a bitmask), with a receive buffer of `rcvbuf` bytes
    (forced past rmem_max where allowed). The socket belongs to the namespace it was created in, whichever
    thread uses it later. Errors are translated, naming `what`: `NotFoundError` (no such namespace),
    `PermissionDeniedError` (not root), `KernelError`."""

    def create() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            if rcvbuf is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # capped by rmem_max
            sock.bind((0, groups))
            sock.setblocking(blocking)
        except BaseException:
            sock.close()
            raise
        return sock

    try:
        if netns is None:
            return create()
        if not os.path.exists(netns_path(netns)):
            # Checked here: a NetnsThread whose namespace is missing fails with BrokenThreadPool.
            raise NotFoundError(f"{what}: netns {netns!r} does not exist (see `ip netns list`)")
        worker = NetnsThread(netns, name="hyperfence-netlink")
        try:
            return worker.call(create)
        finally:
            worker.close()
    except PermissionError as e:
        raise PermissionDeniedError(
            f"{what}: cannot open a netlink socket ({e.strerror}); run as root"
        ) from None
    except OSError as e:
        raise KernelError(f"{what}: cannot open a netlink socket: {e.strerror or e}") from None


class GroupWatch:
    """Events of netlink multicast `groups` (of `protocol`, NETLINK_ROUTE by default) in namespace `netns`
    (None: ours), for a level-triggered reader: events are not parsed, any event means "read again"."""

    def __init__(self, netns: str | None, *, groups: int, what: str, protocol: int = NETLINK_ROUTE) -> None:
        self.what = what
        self.sock = netfilter_socket(netns, what=what, groups=groups, blocking=False, protocol=protocol)

    def wait(self, timeout: float, *, wake: int | None = None) -> bool:
        """True when events came (all that are queued are read), False after `timeout` seconds without, or
        as soon as file descriptor `wake` is readable (a stop signal). A receive buffer overrun counts as an
        event: what was lost may have been a change."""
        fds = [self.sock.fileno()] if wake is None else [self.sock.fileno(), wake]
        if self.sock.fileno() not in select.select(fds, [], [], timeout)[0]:
            return False
        read = 0
        while read < MAX_DRAIN:
            try:
                read += len(self.sock.recv(65536))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise KernelError(f"{self.what}: {e.strerror or e}") from None
        return True

    def close(self) -> None:
        self.sock.close()
