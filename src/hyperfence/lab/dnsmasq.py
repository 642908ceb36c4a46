"""The lab's dnsmasq (DHCP and DNS on the lab's bridge): started in the foreground as a child of the process
that calls `create_lab`, found again by its PID file and command line, stopped by PID and reaped.

Called from another process, a stop can only signal it: the dead dnsmasq then stays a zombie of its parent,
or of PID 1, which does not reap orphans here. A zombie holds no namespace, and counts as dead."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

from hyperfence.errors import KernelError
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.processes import STOP_TIMEOUT, cmdline, end_session, is_alive, is_process, read_pid_file
from hyperfence.lab.records import state_dir

READY_TIMEOUT = 5.0
# dnsmasq children of *this* process, per lab, so they can be reaped
CHILDREN: dict[str, subprocess.Popen[bytes]] = {}


def is_lab_dnsmasq(name: str, pid: int) -> bool:
    """Whether `pid` is a living dnsmasq of lab `name` (its PID file is in the lab's state directory)."""
    cmd = cmdline(pid)
    pid_file = f"--pid-file={state_dir(name) / 'dnsmasq.pid'}"
    return is_alive(pid) and bool(cmd) and os.path.basename(cmd[0]) == "dnsmasq" and pid_file in cmd


def stop_dnsmasq(name: str, pid: int | None) -> None:
    """Stop lab `name`'s dnsmasq: our child by `Popen` (reaped), else `pid` if it is really this lab's."""
    child = CHILDREN.pop(name, None)
    if child is not None:
        stop_child(child)
        if child.pid == pid:
            return
    if pid is None or not is_lab_dnsmasq(name, pid):
        return  # gone, a zombie, or a recycled PID that is not ours
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if is_alive(pid):
        os.kill(pid, signal.SIGKILL)


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    end_session(proc, grace=STOP_TIMEOUT)


def ensure_dnsmasq(plan: LabPlan, *, argv: Sequence[str], old_pid: int | None) -> int:
    """The PID of a dnsmasq serving `plan`: the running one if its command line is `argv`, else a new one."""
    child = CHILDREN.get(plan.name)
    if child is not None and child.poll() is not None:
        del CHILDREN[plan.name]  # died; poll() reaped it
    if old_pid is not None and is_process(old_pid, argv):
        return old_pid
    stop_dnsmasq(plan.name, old_pid)
    return start_dnsmasq(plan, argv)


def start_dnsmasq(plan: LabPlan, argv: Sequence[str]) -> int:
    """Start dnsmasq in the host namespace and wait until it wrote its PID file (its sockets are bound then)."""
    sdir = state_dir(plan.name)
    pid_file = sdir / "dnsmasq.pid"
    pid_file.unlink(missing_ok=True)
    err_path = sdir / "dnsmasq.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", plan.host_netns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    CHILDREN[plan.name] = proc
    deadline = time.monotonic() + READY_TIMEOUT
    while read_pid_file(pid_file) != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_child(proc)
            del CHILDREN[plan.name]
            stderr = err_path.read_text(errors="replace").strip()
            raise KernelError(
                f"lab {plan.name!r}: dnsmasq did not start (exit {proc.returncode}): {stderr or 'no output'}"
            )
        time.sleep(0.005)
    return proc.pid
