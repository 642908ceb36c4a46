"""Processes the lab starts, each in a session of its own, and how they are stopped and reaped.

PID 1 does not reap orphans on this machine, so the process that runs lab commands becomes a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): what a dying command leaves behind becomes its child, and is
killed and reaped when the command's session is stopped. Only our own children in the command's own
process group are ever touched."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

STOP_TIMEOUT = 3.0
_PR_SET_CHILD_SUBREAPER = 36


def read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


def is_process(pid: int, argv: Sequence[str]) -> bool:
    """Whether `pid` is a living (not zombie) process with exactly this command line."""
    return is_alive(pid) and cmdline(pid) == list(argv)


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a zombie is dead, only not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rpartition(")")[2].split()
    return bool(state) and state[0] not in {"Z", "X"}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


@functools.cache
def become_subreaper() -> None:
    """Make this process a child subreaper (once), so that the orphans of a lab command become ours.

    PID 1 does not reap orphans on this machine: when a command's session leader dies, what it started would
    stay a zombie forever. As a subreaper we inherit those orphans and `kill_leftovers` reaps them (only
    them: it touches our children in the command's own process group). Best effort: without it, leftovers
    are only killed, and stay zombies of PID 1.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_session(proc: subprocess.Popen[bytes], *, grace: float) -> None:
    """Stop `proc` (a session leader we started) and everything in its session; reap them all.

    The whole group is signalled only while the leader is unreaped: until then its PID, hence the group id,
    cannot belong to anyone else.
    """
    if proc.poll() is None:
        if grace > 0:
            signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    kill_leftovers(proc.pid)


def kill_leftovers(pgid: int) -> None:
    """SIGKILL and reap our children still in process group `pgid` (orphans we inherited as subreaper)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while (pids := children_in_group(pgid)) and time.monotonic() < deadline:
        for pid in pids:  # our unreaped children: these PIDs cannot have been recycled
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def children_in_group(pgid: int) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text(errors="replace").rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if len(fields) > 2 and int(fields[1]) == me and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
