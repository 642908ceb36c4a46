"""The daemon's long-running loops, each on its own thread, restarted when they fail.

A loop is a callable `run(stop)` that returns only once `stop` is set. If it raises (or returns early), the
supervisor counts it, logs it with its traceback, reports it (`on_failure`: the daemon records an event)
and runs it again after a backoff that doubles from BACKOFF_MIN to BACKOFF_MAX; a loop that then ran for
HEALTHY_AFTER seconds starts again from the shortest backoff. `status()` says per loop whether it is
running or down (waiting to be restarted), how often it failed and its last error: the daemon's health.
(mitmproxy's `safecall` around every addon hook; kopf's backoff for failing handlers.)

Stopping promptly. A loop blocks on its own sockets or queue, not on `stop`; polling `stop` every half second
would make every stop wait for the slowest poll. The daemon's `stop` is a `StopSignal`: a `threading.Event`
that also wakes what blocks elsewhere. A loop waiting in select/poll adds `wake_fd(stop)` to its descriptors
(readable from the moment `stop` is set); a loop waiting on a queue registers `on_stop(stop, put_sentinel)`.
With a plain `threading.Event` (tests) both are no-ops and the loops' own timeouts still end them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hyperfence.daemon")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
HEALTHY_AFTER = 60.0

Loop = Callable[[threading.Event], None]
OnFailure = Callable[[str, str, int], None]  # loop name, error text, failures so far


class StopSignal(threading.Event):
    """A stop event that also wakes loops blocked elsewhere: `fileno()` is the read end of a pipe that
    becomes readable when the event is set (and stays so), and callbacks given to `on_set` run then (or at
    once, if it is set already). Setting it is safe from a signal handler: a write of one byte and the
    callbacks, which must be quick (putting into a queue)."""

    def __init__(self) -> None:
        super().__init__()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            was_set = self.is_set()
            super().set()
            callbacks = [] if was_set else list(self._callbacks)
        if was_set:
            return
        with contextlib.suppress(OSError):  # closed (a test's teardown) or full: readable either way
            os.write(self._write, b"x")
        for callback in callbacks:
            callback()

    def fileno(self) -> int:
        return self._read

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when the event is set (now, if it is). Returns a function that forgets it."""
        with self._lock:
            now = self.is_set()
            if not now:
                self._callbacks.append(callback)
        if now:
            callback()

        def forget() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return forget

    def close(self) -> None:
        """Close the pipe (once nothing waits on it any more)."""
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def wake_fd(stop: threading.Event) -> int | None:
    """A descriptor that becomes readable when `stop` is set, for a loop's select/poll; None for a plain
    `threading.Event`."""
    return stop.fileno() if isinstance(stop, StopSignal) else None


def on_stop(stop: threading.Event, callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` when `stop` is set (a `StopSignal`; a plain Event runs nothing). Returns a function
    that forgets it."""
    if isinstance(stop, StopSignal):
        return stop.on_set(callback)
    return lambda: None


@dataclass
class _State:
    name: str
    run: Loop
    state: str = "starting"  # running | down | stopped
    failures: int = 0
    last_error: str | None = None
    last_failure: float | None = None  # wall clock
    restart_at: float | None = None  # wall clock, while down
    thread: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    def __init__(
        self,
        stop: threading.Event,
        *,
        on_failure: OnFailure | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.stop = stop
        self.on_failure = on_failure
        self.clock = clock
        self.wall = wall
        self.loops: dict[str, _State] = {}
        self._lock = threading.Lock()

    def start(self, name: str, run: Loop) -> None:
        """Run `run(stop)` on a thread named hyperfence-NAME, restarting it whenever it fails."""
        st = _State(name, run)
        st.thread = threading.Thread(target=self._keep, args=(st,), name=f"hyperfence-{name}", daemon=True)
        with self._lock:
            self.loops[name] = st
        st.thread.start()

    def _keep(self, st: _State) -> None:
        delay = BACKOFF_MIN
        while not self.stop.is_set():
            started = self.clock()
            with self._lock:
                st.state, st.restart_at = "running", None
            try:
                st.run(self.stop)
                if self.stop.is_set():
                    break
                error = "returned while the daemon runs"
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:500]
                log.exception("loop %s failed (restarted in %g s)", st.name, delay)
            else:
                log.error("loop %s %s (restarted in %g s)", st.name, error, delay)
            if self.clock() - started >= HEALTHY_AFTER:
                delay = BACKOFF_MIN
            with self._lock:
                st.failures += 1
                st.last_error = error
                st.last_failure = self.wall()
                st.state, st.restart_at = "down", self.wall() + delay
            if self.on_failure is not None:
                try:
                    self.on_failure(st.name, error, st.failures)
                except Exception:  # reporting must not stop the restart
                    log.exception("loop %s: its failure could not be reported", st.name)
            self.stop.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        with self._lock:
            st.state, st.restart_at = "stopped", None

    def status(self) -> dict[str, dict[str, Any]]:
        """Per loop: state (running | down | stopped), failures, last_error, last_failure, restart_at."""
        with self._lock:
            return {
                name: {
                    "state": st.state,
                    "failures": st.failures,
                    "last_error": st.last_error,
                    "last_failure": st.last_failure,
                    "restart_at": st.restart_at,
                }
                for name, st in self.loops.items()
            }

    def down(self) -> list[str]:
        with self._lock:
            return sorted(name for name, st in self.loops.items() if st.state == "down")

    def running(self) -> list[str]:
        """The loops whose thread has not ended (after a `join` that timed out: the ones that hang)."""
        with self._lock:
            return sorted(n for n, st in self.loops.items() if st.thread is not None and st.thread.is_alive())

    def join(self, timeout: float) -> None:
        deadline = self.clock() + timeout
        for st in list(self.loops.values()):
            if st.thread is not None:
                st.thread.join(max(0.0, deadline - self.clock()))
