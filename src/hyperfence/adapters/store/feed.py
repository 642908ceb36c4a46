"""The SQLite store's change feed: wake whoever waits for a new policy generation, without polling.

Two sources wake the waiters (a `threading.Condition`):

* a put through the same `Store` object (`announce`, called by `Store.put_policy` after its commit);
* a put by another process (`hyperfence policy apply`, a benchmark) or another `Store`: a watcher thread,
  started at the first wait, blocks on inotify for writes to the state directory's database files, then
  asks its own connection `PRAGMA data_version` (which moves only when another connection committed) and,
  if it moved, `MAX(generation)`; only a new generation wakes the waiters. The daemon's own event and agent
  writes and its checkpoints thus cost the watcher one cheap query each, and wake nobody.

  The write-ahead log's write event can come before the commit is visible (SQLite publishes a commit in
  the shared-memory index, through mmap, which inotify does not see), so a put also writes its generation
  to a marker file (`<db>-generation`) after its commit: that event always finds the commit. A writer that
  is not a `Store` (the sqlite3 shell) is seen through the log's events, or at the waiters' timeout.

Without inotify (another OS, or `inotify_init1` refused) the feed degrades to the waiters' timeout (the
daemon's `--poll`), logged once. The watcher's connection is used by its thread only.

A watcher that fails (its inotify descriptor or select raises, a bug) is never a silent fall-back to the
timeout: it is logged with its traceback, the waiters in progress are woken, and one of them (or, when none
was waiting, the next wait) raises `TemporaryError` naming the failure; the wait after that starts a new
watcher. The daemon's reconcile loop runs under its supervisor, so the failure is reported like a loop's
(`loop-failed`, `hyperfence status`) and the watcher is back after the supervisor's backoff.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sqlite3
import threading
import time
from collections.abc import Callable

from hyperfence.errors import TemporaryError
from hyperfence.system.inotify import OVERFLOW, DirectoryWatch
from hyperfence.system.state_dir import open_private

log = logging.getLogger("hyperfence.store")


class ChangeFeed:
    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.marker = db_path + "-generation"
        name = os.path.basename(db_path)
        self._names = {name, name + "-wal", name + "-generation", OVERFLOW}
        self._cond = threading.Condition()
        self._bumps = 0  # new generations seen (in this process or from the watcher)
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1
        self._started = False
        self.watched = False  # whether another process's commits wake the waiters (inotify works)
        self.failure: str | None = None  # why the watcher ended, until the wait after its report restarts it
        self._reported = False  # whether a wait raised `failure` already
        self.restarts = 0  # watchers started again after a failure

    def notify(self) -> None:
        """A new generation was committed: wake every waiter in this process."""
        with self._cond:
            self._bumps += 1
            self._cond.notify_all()

    def announce(self, generation: int) -> None:
        """Generation `generation` was committed: wake every waiter, in this process and in others."""
        self.notify()
        try:
            fd = open_private(self.marker, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, f"{generation}\n".encode())
            finally:
                os.close(fd)
        except OSError as e:  # the generation is stored; other processes see it at their timeout
            log.warning("store change feed: cannot write %s: %s", self.marker, e.strerror)

    def wake(self) -> None:
        """Make every wait in progress ask its `cancelled` again."""
        with self._cond:
            self._cond.notify_all()

    def wait(
        self,
        after: int,
        timeout: float,
        latest: Callable[[], int],
        cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """Until `latest()` is above `after` (returned), `timeout` passes or `cancelled()` says so (checked
        first and at each `wake`); the latest is returned either way. `TemporaryError` when the watcher
        failed (see the module doc); the next wait starts a new one."""
        if cancelled is not None and cancelled():
            return latest()
        self._start()
        deadline = time.monotonic() + timeout
        with self._cond:
            self._raise_failure()
            bumps = self._bumps
        while True:
            gen = latest()  # read after noting the counter: a put in between is not missed
            if gen > after:
                return gen
            with self._cond:
                while self._bumps == bumps:
                    self._raise_failure()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (cancelled is not None and cancelled()):
                        # (at a timeout, the safety net: a change no event announced is seen here)
                        return latest()
                    self._cond.wait(remaining)
                bumps = self._bumps

    def _raise_failure(self) -> None:
        """With `_cond` held: raise the watcher's failure, once."""
        if self.failure is None or self._reported:
            return
        self._reported = True
        raise TemporaryError(
            f"the store's change feed failed ({self.failure}): another process's policy versions would be "
            "seen only at the wait's timeout; the next wait starts a new watcher"
        )

    def _start(self) -> None:
        with self._cond:
            if self.failure is not None and self._reported:  # the failure was told: start again
                self.failure, self._reported = None, False
                self._started = False
                self.restarts += 1
                self._close_thread()
            if self._started:
                return
            self._started = True
        try:
            watch = DirectoryWatch(os.path.dirname(self.db_path) or ".")
        except OSError as e:
            log.warning("store change feed: no inotify (%s); other processes' writes are seen by timeout", e)
            return
        # Baseline after the watch exists: a commit after this read is an event the watcher sees.
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None, check_same_thread=False)
        seen = _generation_state(db)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._watch, args=(watch, db, seen), name="store-feed", daemon=True
        )
        self.watched = True
        self._thread.start()

    def _watch(self, watch: DirectoryWatch, db: sqlite3.Connection, seen: tuple[int, int]) -> None:
        try:
            while True:
                ready = select.select([watch.fileno(), self._stop_r], [], [])[0]
                if self._stop_r in ready:
                    return
                if not watch.read() & self._names:
                    continue  # another file of the state directory (traffic log, keys)
                try:
                    now = _generation_state(db, seen)
                except sqlite3.Error as e:  # busy beyond the timeout, or the file went away: look next time
                    log.warning("store change feed: %s", e)
                    continue
                if now[1] != seen[1]:
                    self.notify()
                seen = now
        except Exception as e:  # never a silent fall-back to the timeout: the waiters are told
            log.exception("store change feed: the watcher failed")
            with self._cond:
                self.failure = f"{type(e).__name__}: {e}"[:300]
                self._reported = False
                self._cond.notify_all()
        finally:
            watch.close()
            db.close()

    def close(self) -> None:
        """Stop the watcher (it holds a connection and an inotify descriptor)."""
        self._close_thread()

    def _close_thread(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._stop_w, b"x")
            self._thread.join(timeout=2)
            for fd in (self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stop_r, self._stop_w = -1, -1
            self._thread = None


def _generation_state(db: sqlite3.Connection, seen: tuple[int, int] | None = None) -> tuple[int, int]:
    """(data_version, latest generation); the generation is read only when data_version moved."""
    version = int(db.execute("PRAGMA data_version").fetchone()[0])
    if seen is not None and version == seen[0]:
        return seen
    return version, int(db.execute("SELECT MAX(generation) FROM policy").fetchone()[0] or 0)
