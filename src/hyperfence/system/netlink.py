"""Netlink sockets opened in a namespace, shared by hyperfence's readers of the kernel (nftables events and
rule ids, NFLOG, conntrack, links, addresses); the framing is in `codec/netlink.py`."""

from __future__ import annotations

import errno
import os
import select
import socket

from hyperfence.errors import KernelError, NotFoundError, PermissionDeniedError
from hyperfence.system.netns import NetnsThread, netns_path

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
MAX_DRAIN = 1 << 20  # bytes a GroupWatch reads per wait at most: a burst of events is one "changed"


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
