"""A libvirtd for the lab: start one when none runs, use the one that runs, stop only what we started.

The lab's VMs are QEMU domains whose taps must land on the lab bridge, which lives in the namespace
``hf-<lab>-host``. libvirtd creates taps in its *own* network namespace, so the lab's libvirtd runs inside
that namespace (``nsenter --net``; ``ip netns exec`` would remount /sys and hide the cgroup mounts). There is
one libvirtd per machine (its sockets are in /run/libvirt), so:

* none runs → `ensure_libvirtd` starts virtlogd (if none runs) and libvirtd, records them in
  ``<lab run dir>/libvirtd.json`` (PID + process start time, so a recycled PID is never signalled) and
  waits until ``qemu:///system`` answers; `stop_libvirtd` stops exactly those, by PID.
* one runs in the lab's namespace → it is used, and never stopped.
* one runs elsewhere → `ConflictError`: it cannot put taps on the lab's bridge.

Processes. libvirtd runs in the foreground under ``reaper.py`` (a child subreaper, see there): PID 1 here
does not reap orphans, and libvirtd's QEMU processes are orphans by design. The reaper is a child of the
calling process; when that is a CLI that exits, the reaper is re-parented to PID 1 and, once stopped, stays
one zombie there (it holds nothing). virtlogd (libvirt writes QEMU's output through it) is a plain child.

QEMU as root (``qemu_as_root=True``, lab only). libvirt runs QEMU as ``libvirt-qemu``; on this machine it
then finds /dev/kvm "usable" but probes QEMU without KVM, so it re-probes QEMU's capabilities on *every*
lookup: defining a domain took 44 s and starting one 4.4 s (measured). With ``user = "root"`` define takes
~5 ms and start ~0.4-0.6 s. The option never edits /etc/libvirt/qemu.conf: the lab's libvirtd gets a private
mount namespace (``unshare --mount``) in which a copy of qemu.conf with ``user``/``group = "root"`` is bind
mounted over the real one; nothing else on the host sees it, and a log line says so. It only applies to a
libvirtd the lab starts. QEMU as root has no privilege separation: never for guests you do not trust.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hyperfence.adapters.libvirt import DEFAULT_URI, LibvirtInventory
from hyperfence.errors import ConflictError, KernelError, NotFoundError, PermissionDeniedError, TemporaryError
from hyperfence.lab import records
from hyperfence.lab.plan import LabPlan
from hyperfence.system.netns import netns_path

log = logging.getLogger("hyperfence.lab.libvirtd")

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
REAPER = Path(__file__).with_name("reaper.py")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Children of this process (reapers, virtlogd), so they are reaped, not left as zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class LabLibvirtd:
    """The libvirtd a lab uses. `started`: the lab started it (and `stop_libvirtd` will stop it)."""

    uri: str
    pid: int
    started: bool
    qemu_as_root: bool


# ------------------------------------------------------------------------------------------------- pure


def lab_qemu_conf(original: str) -> str:
    """`original` qemu.conf text with QEMU run as root: its own ``user``/``group`` settings are dropped."""
    kept = [
        line
        for line in original.splitlines()
        if line.split("=", 1)[0].strip() not in {"user", "group"} or line.lstrip().startswith("#")
    ]
    return "\n".join(
        [
            *kept,
            "",
            "# hyperfence lab: QEMU as root (see hyperfence/lab/libvirtd.py)",
            'user = "root"',
            'group = "root"',
            "",
        ]
    )


def libvirtd_argv(netns: str, *, qemu_conf: Path | None) -> list[str]:
    """libvirtd in the foreground inside `netns`; with `qemu_conf` bind-mounted over the real qemu.conf in a
    private mount namespace (the ``sh -c`` only mounts, then execs libvirtd: same PID)."""
    enter = ["nsenter", f"--net={netns_path(netns)}"]
    if qemu_conf is None:
        return [*enter, LIBVIRTD]
    script = f'mount --bind "$1" {QEMU_CONF} && exec {LIBVIRTD}'
    return [
        *enter,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "hf-libvirtd",
        str(qemu_conf),
    ]


# --------------------------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) of `pid`, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1]), int(fields[19])


def _live(pid: int | None, comm: str) -> bool:
    st = _stat(pid) if pid else None
    return st is not None and st[0] == comm and st[1] != "Z"


def _pidfile_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def running_libvirtd() -> int | None:
    """The PID of the libvirtd running on this machine (by its PID file), or None."""
    pid = _pidfile_pid(LIBVIRTD_PIDFILE)
    return pid if _live(pid, "libvirtd") else None


def _same_netns(pid: int, netns: str) -> bool:
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat(netns_path(netns))
    except FileNotFoundError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _record_path(plan: LabPlan) -> Path:
    return records.state_dir(plan.name) / "libvirtd.json"


def _read_record(plan: LabPlan) -> dict[str, dict[str, int]]:
    try:
        data = json.loads(_record_path(plan).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConflictError(
            f"lab {plan.name!r}: {_record_path(plan)} is unreadable ({exc}); remove it"
        ) from exc
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _write_record(plan: LabPlan, record: dict[str, dict[str, int]]) -> None:
    path = _record_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def _entry(pid: int) -> dict[str, int]:
    st = _stat(pid)
    return {"pid": pid, "start": st[3] if st else 0}


def _is_recorded(entry: dict[str, int] | None, comm: str) -> bool:
    """Whether the recorded process still runs: same PID, same start time, same command (not recycled)."""
    if not entry:
        return False
    st = _stat(entry["pid"])
    return st is not None and st[0] == comm and st[1] != "Z" and st[3] == entry["start"]


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    _CHILDREN[proc.pid] = proc
    return proc


# ------------------------------------------------------------------------------------------------- API


def ensure_libvirtd(
    plan: LabPlan, *, qemu_as_root: bool = False, timeout: float = READY_TIMEOUT, uri: str = DEFAULT_URI
) -> LabLibvirtd:
    """A libvirtd that answers `uri` and creates taps in the lab's host namespace; started if none runs.

    Raises `NotFoundError` if the lab's host namespace does not exist (create the lab first),
    `ConflictError` if a libvirtd runs in another namespace, `KernelError` if the one started here dies or
    does not answer within `timeout` seconds (its log is ``<lab run dir>/libvirtd.log``).
    """
    if os.geteuid() != 0:
        raise PermissionDeniedError("lab libvirtd: needs root: run as root")
    if not os.path.exists(netns_path(plan.host_netns)):
        raise NotFoundError(
            f"lab {plan.name!r}: namespace {plan.host_netns} does not exist: create the lab first"
        )
    record = _read_record(plan)
    pid = running_libvirtd()
    if pid is not None:
        if not _same_netns(pid, plan.host_netns):
            raise ConflictError(
                f"lab {plan.name!r}: a libvirtd (pid {pid}) already runs in another network namespace; it "
                f"would put the VMs' taps there, not on {plan.bridge} in {plan.host_netns}. Stop it or use a "
                "lab without QEMU VMs"
            )
        started = _is_recorded(record.get("libvirtd"), "libvirtd") and record["libvirtd"]["pid"] == pid
        _wait_ready(uri, pid, deadline=time.monotonic() + timeout)
        as_root = bool(record.get("options", {}).get("qemu_as_root")) and started
        return LabLibvirtd(uri=uri, pid=pid, started=started, qemu_as_root=as_root)

    sdir = records.state_dir(plan.name)
    sdir.mkdir(parents=True, exist_ok=True)
    if not _live(_pidfile_pid(VIRTLOGD_PIDFILE), "virtlogd"):
        virtlogd = _spawn([VIRTLOGD], sdir / "virtlogd.log")
        record["virtlogd"] = _entry(virtlogd.pid)
    conf = None
    if qemu_as_root:
        conf = sdir / "qemu.conf"
        conf.write_text(lab_qemu_conf(QEMU_CONF.read_text()))
        log.warning(
            "lab %s: libvirtd runs QEMU as root (a private bind mount of %s over %s, seen by this libvirtd "
            "only; the host's file is unchanged)",
            plan.name,
            conf,
            QEMU_CONF,
        )
    t0 = time.monotonic()
    reaper = _spawn(
        [sys.executable, str(REAPER), *libvirtd_argv(plan.host_netns, qemu_conf=conf)], sdir / "libvirtd.log"
    )
    record["reaper"] = _entry(reaper.pid)
    record["options"] = {"qemu_as_root": int(qemu_as_root)}
    _write_record(plan, record)
    pid = _wait_started(reaper, deadline=t0 + timeout, log_path=sdir / "libvirtd.log")
    record["libvirtd"] = _entry(pid)
    _write_record(plan, record)
    _wait_ready(uri, pid, deadline=t0 + timeout)
    log.info("lab %s: libvirtd started (pid %d) in %.2f s", plan.name, pid, time.monotonic() - t0)
    return LabLibvirtd(uri=uri, pid=pid, started=True, qemu_as_root=qemu_as_root)


def _wait_started(reaper: subprocess.Popen[bytes], *, deadline: float, log_path: Path) -> int:
    """The PID of the libvirtd `reaper` runs, once its PID file names it."""
    while time.monotonic() < deadline:
        pid = _pidfile_pid(LIBVIRTD_PIDFILE)
        st = _stat(pid) if pid else None
        if st is not None and st[0] == "libvirtd" and st[2] == reaper.pid and st[1] != "Z":
            return int(pid or 0)
        if reaper.poll() is not None:
            break
        time.sleep(0.02)
    tail = log_path.read_text(errors="replace")[-600:] if log_path.exists() else ""
    raise KernelError(f"libvirtd did not start (see {log_path}):\n{tail}")


def _wait_ready(uri: str, pid: int, *, deadline: float) -> None:
    inventory = LibvirtInventory(uri)
    try:
        while True:
            try:
                inventory.connect()
                return
            except TemporaryError as exc:
                if time.monotonic() > deadline or not _live(pid, "libvirtd"):
                    raise KernelError(f"libvirtd (pid {pid}) does not answer {uri}: {exc}") from exc
                time.sleep(0.05)
    finally:
        inventory.close()


def stop_libvirtd(plan: LabPlan, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the libvirtd and virtlogd this lab started (SIGTERM, then SIGKILL); False if it started none.

    Processes are signalled only while PID, start time and command match the record. Stop (destroy) the
    lab's domains first: QEMU outlives libvirtd, and its reaper exits only when they are gone.
    """
    record = _read_record(plan)
    stopped = False
    for key, comm in (("libvirtd", "libvirtd"), ("virtlogd", "virtlogd")):
        entry = record.get(key)
        if _is_recorded(entry, comm) and entry is not None:
            _terminate(entry["pid"], comm, timeout=timeout)
            stopped = True
    reaper = record.get("reaper")
    if reaper is not None:
        proc = _CHILDREN.pop(reaper["pid"], None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    for pid, proc in list(_CHILDREN.items()):  # virtlogd, earlier reapers
        if proc.poll() is not None:
            del _CHILDREN[pid]
    _record_path(plan).unlink(missing_ok=True)
    return stopped


def kill_libvirtd(plan: LabPlan) -> int:
    """SIGKILL the libvirtd this lab started (a crash, for tests); its PID. `NotFoundError` if none runs."""
    entry = _read_record(plan).get("libvirtd")
    if entry is None or not _is_recorded(entry, "libvirtd"):
        raise NotFoundError(f"lab {plan.name!r}: no libvirtd started by this lab is running")
    os.kill(entry["pid"], signal.SIGKILL)
    _wait_gone(entry["pid"], "libvirtd", timeout=STOP_TIMEOUT)
    return entry["pid"]


def _terminate(pid: int, comm: str, *, timeout: float) -> None:
    proc = _CHILDREN.pop(pid, None)
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, comm, timeout=timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, comm, timeout=timeout)
    if proc is not None:
        proc.wait()


def _wait_gone(pid: int, comm: str, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _live(pid, comm):
        proc = _CHILDREN.get(pid)
        if proc is not None:
            proc.poll()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
