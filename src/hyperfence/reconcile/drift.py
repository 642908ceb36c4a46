"""Repair drift as soon as the kernel reports it: a hand-run `nft flush ruleset` is undone in milliseconds,
not at the next periodic resync (which stays, as the safety net for anything this loop misses).

`DriftWatcher.run(stop)` reads the kernel's nftables events in the namespace the engine manages
(`adapters/nft_monitor.py`) and, for every commit that touched one of hyperfence's tables and was not made by
hyperfence itself, asks for an immediate full converge (`repair(cause)`). The converge is level-triggered: it
reads the kernel, repairs whatever differs from the desired ruleset in one atomic batch and records the drift
as `drift-repaired` / `filter-repaired` events with the cause; when the kernel is right it writes nothing.

Why filter by the committer, and why that cannot loop: every commit ends with a generation message naming
the committing thread, and hyperfence commits only through its libnftables worker thread (`is_own(pid)`). So
the daemon's own applies, including the repair itself, start no converge: a one-rule `policy apply` at
1,000 VMs stays in the tens of milliseconds instead of paying a full read of the kernel after every change.
Were the filter ever wrong (say, a commit of ours misattributed), the result is one more full converge that
finds the kernel right and writes nothing, hence sends no event: there is no loop either way. Commits by
others that touch only other tables (a NAT table, libvirt's) start nothing; their generation numbers are told
to `untouched` (the firewall then knows its record of the kernel still holds, and the next periodic resync
skips reading the kernel: reconcile/firewall.py). Never after lost events: then nothing is told.

Coalescing: `repair` only records the cause and wakes the daemon's loop; events that arrive while a converge
runs lead to one more converge after it, never to one per event. Lost events (receive buffer overrun) and a
(re)opened watch also ask for a converge: what happened while nobody listened is found by one full read.
If the watch fails (the socket errors, the namespace is gone) it is logged and reopened with backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from hyperfence.adapters.nft_monitor import Batch, NftMonitor
from hyperfence.errors import HyperfenceError
from hyperfence.reconcile.supervisor import wake_fd

log = logging.getLogger("hyperfence.drift")

BACKOFF_MIN = 0.5  # seconds before reopening a failed watch; doubled after each failure in a row
BACKOFF_MAX = 30.0
READ_TIMEOUT = 0.5  # how often the loop looks at a plain `stop` Event while nothing happens


class Monitor(Protocol):
    def read(self, timeout: float, *, wake: int | None = None) -> Batch: ...
    def close(self) -> None: ...


class DriftWatcher:
    """Watches hyperfence's `tables` in namespace `netns` (None: the daemon's own); see the module doc."""

    name = "drift"  # a monitor (reconcile/monitor.py)

    def __init__(
        self,
        *,
        netns: str | None,
        tables: Iterable[tuple[str, str]],
        is_own: Callable[[int], bool],
        repair: Callable[[str], None],
        untouched: Callable[[list[int]], None] | None = None,
        open_monitor: Callable[[], Monitor] | None = None,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        tables = tuple(tables)
        self.netns = netns
        self.is_own = is_own
        self.repair = repair
        self.untouched = untouched
        self.open_monitor: Callable[[], Monitor] = open_monitor or (lambda: NftMonitor(tables, netns=netns))
        self.backoff = backoff
        self.restarts = 0  # watches that failed and were reopened (for tests and status)
        self._delay = backoff[0]

    def run(self, stop: threading.Event) -> None:
        self._delay = self.backoff[0]
        while not stop.is_set():
            try:
                monitor = self.open_monitor()
            except HyperfenceError as e:
                self._back_off(stop, f"cannot watch nftables events ({e})")
                continue
            try:
                log.info(
                    "watching nftables events in %s", f"netns {self.netns}" if self.netns else "own netns"
                )
                self.repair("the nftables event watch (re)started: changes before it were not seen")
                self._watch(monitor, stop)
            except HyperfenceError as e:
                self.restarts += 1
                self._back_off(stop, f"the nftables event watch failed ({e})")
            finally:
                monitor.close()

    def _back_off(self, stop: threading.Event, what: str) -> None:
        log.warning("%s; trying again in %.1f s (the periodic resync still runs)", what, self._delay)
        stop.wait(self._delay)
        self._delay = min(self._delay * 2, self.backoff[1])

    def _watch(self, monitor: Monitor, stop: threading.Event) -> None:
        wake = wake_fd(stop)
        while not stop.is_set():
            batch = monitor.read(READ_TIMEOUT, wake=wake)
            if batch.generations or batch.lost:
                self._delay = self.backoff[0]  # the watch works: the next failure starts from the minimum
            if batch.lost:
                log.warning("nftables events were lost (receive buffer overrun): checking the kernel")
                self.repair("nftables events were lost (receive buffer overrun)")
            if self.untouched is not None and not batch.lost:
                quiet = [g.gen_id for g in batch.generations if not g.touched]
                if quiet:
                    self.untouched(quiet)
            foreign = [g for g in batch.generations if g.touched and not self.is_own(g.pid)]
            if foreign:
                g = foreign[-1]
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                cause = f"{g.describe()}{more} changed hyperfence's tables"
                log.warning("%s: repairing", cause)
                self.repair(cause)
