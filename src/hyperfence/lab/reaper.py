"""Run one command as a child and reap every process that ends up ours; exit when none is left.

Usage: ``python reaper.py COMMAND [ARG...]`` (run by path: standard library only, imports nothing of
hyperfence, so it works whatever ``sys.path`` the child interpreter gets).

Why: PID 1 on the lab machine does not reap orphans, and libvirtd double-forks QEMU (and its capability
probes), so they become orphans. This process is a *child subreaper*: those orphans become its children and
are reaped here, instead of staying zombies of PID 1 (or of whichever ancestor is a subreaper). A zombie
QEMU is worse than untidy: libvirt's ``destroy`` waits for its PID to vanish and fails after ~15 s.

SIGTERM, SIGINT and SIGHUP are passed on to the command. When the command exits, this process goes on
reaping until no child is left (QEMU of domains that still run outlives libvirtd, as it does under systemd),
then exits with the command's status (128 + signal number if a signal ended it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: reaper.py COMMAND [ARG...]\n")
        return 2
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write(f"reaper: prctl(PR_SET_CHILD_SUBREAPER): errno {ctypes.get_errno()}\n")
    pid = os.fork()
    if pid == 0:  # the command
        try:
            os.execvp(argv[0], argv)  # noqa: S606 - our own argv, no shell involved
        finally:
            os._exit(127)
    alive = True

    def forward(signum: int, _frame: object) -> None:
        if alive:
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    status = 0
    while True:
        try:
            child, code = os.wait()
        except ChildProcessError:
            break
        if child == pid:
            alive = False
            status = os.waitstatus_to_exitcode(code)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
