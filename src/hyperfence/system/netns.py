"""Run code inside a network namespace without leaving the caller's.

Linux `setns(CLONE_NEWNET)` switches only the calling *thread*, and a socket stays in the namespace it was
created in. So every adapter that talks netlink to one namespace (nftables, NFLOG) owns a `NetnsThread`: one
worker thread that entered the namespace once and runs the adapter's calls in order. The caller's threads
never change namespace.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from hyperfence.errors import InvalidInputError, NotFoundError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def netns_path(name: str) -> str:
    """Where `ip netns` keeps the namespace called `name`."""
    if not name or "/" in name or name in {".", ".."}:
        raise InvalidInputError(
            f"netns: {name!r} is not a namespace name (expected a name as `ip netns list` shows)"
        )
    return os.path.join(NETNS_RUN_DIR, name)


def enter_netns(name: str) -> None:
    """Move the *calling thread* into namespace `name` (as `ip netns exec` would)."""
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFoundError(f"netns: {name!r} does not exist (see `ip netns list`)") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsThread:
    """A worker thread living in one network namespace (or the caller's, when `netns` is None).

    `call(fn)` runs `fn` on that thread and returns its result or raises its exception. Calls run one at a
    time, in order, which also serialises access to non-thread-safe handles such as a libnftables context.
    """

    def __init__(self, netns: str | None, *, name: str = "hyperfence-netns", private: bool = False) -> None:
        """`private`: the thread lives in a new, empty namespace of its own (gone with its last socket)."""
        self.netns = netns
        self.private = private
        if netns is not None:
            netns_path(netns)  # validate early, in the caller's thread
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        # Enter now, as the first call, so that a missing namespace fails here (NotFoundError) and not on
        # first use. A worker that could not enter is never used: it might be in the wrong namespace.
        try:
            self.call(self._enter)
        except BaseException:
            self._pool.shutdown(wait=True)
            raise
        # The kernel's id of the worker thread: what nftables reports as the committing "process" of a
        # transaction sent from this thread (see adapters/nft_monitor.py).
        self.native_id: int = self.call(threading.get_native_id)

    def _enter(self) -> None:
        if self.private:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        elif self.netns is not None:
            enter_netns(self.netns)

    def call(self, fn: Callable[[], T]) -> T:
        future = self._pool.submit(fn)
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
