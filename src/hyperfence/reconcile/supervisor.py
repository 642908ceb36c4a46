"""The daemon's long-running loops, each on its own thread, restarted when they fail.

A loop is a callable `run(stop)` that returns only once `stop` is set. If it raises (or returns early), the
supervisor counts it, logs it with its traceback, reports it (`on_failure`: the daemon records an event)
and runs it again after a backoff that doubles from BACKOFF_MIN to BACKOFF_MAX; a loop that then ran for
HEALTHY_AFTER seconds starts again from the shortest backoff. `status()` says per loop whether it is
running or down (waiting to be restarted), how often it failed and its last error: the daemon's health.
(mitmproxy's `safecall` around every addon hook; kopf's backoff for failing handlers.)
"""

from __future__ import annotations

import logging
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

    def join(self, timeout: float) -> None:
        deadline = self.clock() + timeout
        for st in list(self.loops.values()):
            if st.thread is not None:
                st.thread.join(max(0.0, deadline - self.clock()))
