"""What a monitor is: a long-running part of the daemon that the supervisor starts, stops and restarts.

A monitor watches one thing (the kernel's nftables events, the host's addresses, libvirt's VMs, the agents'
channels, a sysctl) and acts on the engine. The daemon runs every monitor of one list
(`reconcile/monitors.py`) under its `Supervisor` (`reconcile/supervisor.py`), each on its own thread:

    start   `prime()` (optional: a `Primed` monitor) runs once on the daemon's thread before its first
            converge; then the supervisor calls `run(stop)` on a thread named hyperfence-NAME.
    stop    `stop` is set (a `StopSignal`: it also wakes a select or a queue, see the supervisor); `run`
            returns soon after. `run` returning while `stop` is not set counts as a failure.
    tick    a periodic monitor (`Ticker`) only says what one round does and how often (`tick()`,
            `interval`); `Ticking` turns it into a `run(stop)` that ticks at once and then every `interval`
            seconds, woken at once by the stop.

A `run` (or a `tick`) that raises is a failure: the supervisor logs it with its traceback, records a
`loop-failed` event, shows the monitor as down in `hyperfence status` and runs it again after a backoff that
doubles from 1 s to 60 s (back to 1 s after a minute of good health). The other monitors keep running. So a
monitor lets a bug raise instead of catching everything itself; it catches only what it can handle (a
watch to reopen, a VM's bad frame) and `run` may be called again after it raised.

This module is the interface only (no I/O); the monitors themselves live beside what they watch.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable


class Monitor(Protocol):
    @property
    def name(self) -> str:
        """The loop's name in `hyperfence status`, the `loop-failed` events and the thread's name."""
        ...

    def run(self, stop: threading.Event) -> None:
        """Watch until `stop` is set, then return. Raising is a failure: reported, restarted with backoff."""
        ...


@runtime_checkable
class Primed(Protocol):
    def prime(self) -> None:
        """Once, before the daemon's first converge, on the daemon's thread: read what that converge must
        already know (libvirt's VMs, so that a restart does not cut them off). Best effort: it must not
        raise (the daemon would not start)."""
        ...


class Ticker(Protocol):
    """A periodic monitor: one round (`tick`) every `interval` seconds."""

    @property
    def name(self) -> str: ...

    @property
    def interval(self) -> float: ...

    def tick(self) -> None:
        """One round. Raising is a failure of the monitor (reported; ticking resumes after the backoff)."""
        ...


class Ticking:
    """A `Ticker` as a `Monitor`: `run(stop)` ticks at once, then every `interval` seconds (measured from
    the end of a tick, so a slow tick never piles up), until `stop` is set; the wait between ticks ends at
    once on the stop. A tick that raises ends `run` with that error, for the supervisor to report."""

    def __init__(self, ticker: Ticker) -> None:
        self.ticker = ticker

    @property
    def name(self) -> str:
        return self.ticker.name

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.ticker.tick()
            if stop.wait(self.ticker.interval):
                return
