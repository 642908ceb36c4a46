"""Build, inspect, use and destroy a lab on the real kernel. Root only. The layout is in `hyperfence.lab.plan`.

A lab is recorded (`lab/records.py`) *before* anything is created, so `destroy_lab` can always find what a
crashed `create_lab` left.

Tools, and why each:

- Namespaces are created by one ``ip -batch`` process for all of them (~0.7 ms each). pyroute2's
  ``netns.create`` forks a multiprocessing child per namespace (~8 ms each) and that child leaks a socket,
  which ``-W error`` reports. They are removed with pyroute2's ``netns.remove`` (umount + unlink, in-process,
  exactly what ``ip netns del`` does).
- Links, addresses, routes and sysctls: pyroute2 ``IPRoute`` opened on a `NetnsThread`, a thread that entered
  the namespace; a netlink socket stays in the namespace it was opened in, and the caller's threads never
  change namespace.
- NAT: ``nft -f -`` under ``ip netns exec`` (the nftables Python binding is not on PyPI).
- dnsmasq and commands "in a VM": ``ip netns exec NS ARGV...``, which execs ARGV (same PID, so a PID we hold is
  the command's own), each in a new session so that stopping it stops its children too.

Split by concern: the record and state paths are in `lab/records.py`, dnsmasq's supervision in
`lab/dnsmasq.py`, process sessions and reaping in `lab/processes.py`; this module makes and inspects the lab
and runs commands in it. Processes started with ``popen_in_*`` are remembered per lab and stopped by
`destroy_lab` (or earlier with `stop_process`).

Not safe to call concurrently for the *same* lab name; different labs are independent.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from hyperfence.adapters import kernel_probe
from hyperfence.errors import (
    ConflictError,
    InvalidInputError,
    KernelError,
    NotFoundError,
    PermissionDeniedError,
    Problem,
)
from hyperfence.lab.dnsmasq import ensure_dnsmasq, stop_dnsmasq
from hyperfence.lab.plan import (
    LabPlan,
    LabVm,
    dnsmasq_command,
    is_lab_netns,
    lab_netns,
    nat_ruleset,
    plan_lab,
    validate_lab_name,
)
from hyperfence.lab.processes import (
    STOP_TIMEOUT,
    become_subreaper,
    end_session,
    is_process,
    kill_leftovers,
    read_pid_file,
    signal_group,
)
from hyperfence.lab.records import Record, read_record, state_dir, state_file, write_record
from hyperfence.model.kernel import FLAVOUR_ENV, Flavour, parse_flavour
from hyperfence.system.netns import NetnsThread

NETNS_DIR = Path("/run/netns")

_EEXIST = 17
_IFF_UP = 0x1
_IFF_LOWER_UP = 0x10000
_HOST_SYSCTLS = (
    ("net/ipv4/ip_forward", "1"),
    # br_netfilter: bridged IPv4 also passes the inet hooks (the firewall's conntrack needs it), IPv6 does not.
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("net/bridge/bridge-nf-call-ip6tables", "0"),
    # Link-local addresses of br0/up0 are usable at once instead of after duplicate address detection.
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
)

T = TypeVar("T")

# Children of *this* process, per lab, so they can be reaped (PID 1 here does not reap orphans).
_PROCESSES: dict[str, list[subprocess.Popen[bytes]]] = {}


@dataclass(frozen=True)
class VmStatus:
    """What the kernel holds for one created VM.

    `port_up` means the port is administratively up *and* has carrier (LOWER_UP), i.e. the VM's own end
    is up too; `port_bridged` that it is a port of the lab's bridge.
    """

    name: str
    netns_exists: bool
    port_present: bool
    port_up: bool
    port_bridged: bool


@dataclass(frozen=True)
class LabStatus:
    """What exists of lab `name`. `recorded` is False when there is no state file (then `vms` is empty)."""

    name: str
    recorded: bool
    planned_vms: int
    created_vms: int
    host_netns_exists: bool
    outside_netns_exists: bool
    dnsmasq_pid: int | None
    dnsmasq_alive: bool
    nat_present: bool
    vms: tuple[VmStatus, ...]

    @property
    def is_healthy(self) -> bool:
        """Whether every piece `create_lab` makes is there: namespaces, ports up, dnsmasq, NAT table."""
        return (
            self.recorded
            and self.host_netns_exists
            and self.outside_netns_exists
            and self.dnsmasq_alive
            and self.nat_present
            and all(vm.netns_exists and vm.port_present and vm.port_up and vm.port_bridged for vm in self.vms)
        )


# ---------------------------------------------------------------------------------------------- public API


def create_lab(plan: LabPlan, *, only: int | None = None) -> None:
    """Make the kernel hold `plan`: namespaces, bridge, ports, addresses, routes, NAT and dnsmasq.

    `only` creates just the first `only` VMs (0..len(plan.vms)) while dnsmasq and the record still declare
    all of them; by default every VM is created. VMs that already exist are kept, so the lab has at least
    `only` VMs afterwards.

    Idempotent and level-triggered: on an existing lab every piece is checked and only what is missing or
    wrong is made again (a dead dnsmasq is restarted; a lost address, route or NAT table comes back); what is
    right is left alone (same namespaces, same links, same dnsmasq PID). A bigger plan for an existing lab adds
    VMs (and restarts dnsmasq with the new hosts).

    Raises `InvalidInputError` for a plan not made by `plan_lab` or a bad `only`, `ConflictError` when the
    lab already declares more VMs than `plan` or its record is unreadable (destroy it first), `PermissionDeniedError` when not root,
    `KernelError` when the kernel or a tool refused something (the lab may be half made: `destroy_lab` it).
    """
    _require_root()
    if plan != plan_lab(plan.name, len(plan.vms)):
        raise InvalidInputError(
            f"lab {plan.name!r}: the plan was not made by plan_lab (build it with plan_lab(name, vms))"
        )
    wanted = len(plan.vms) if only is None else only
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= len(plan.vms):
        raise InvalidInputError(
            f"lab {plan.name!r}: invalid create",
            [Problem("only", f"{only!r} is out of range (expected 0..{len(plan.vms)} or None)")],
        )
    record = read_record(plan.name)
    if record is not None:
        declared = len(record.plan.vms)
        if declared > len(plan.vms):
            raise ConflictError(
                f"lab {plan.name!r} already declares {declared} VMs; a plan of {len(plan.vms)} would drop "
                f"some: plan at least {declared} VMs, or destroy_lab({plan.name!r}) first"
            )
        wanted = max(wanted, record.created_vms)

    sdir = state_dir(plan.name)
    sdir.mkdir(parents=True, exist_ok=True)
    old_pid = record.dnsmasq_pid if record else None
    old_argv = record.dnsmasq_argv if record else None
    write_record(Record(plan, wanted, old_pid, old_argv))

    vms = plan.vms[:wanted]
    if not _bridge_native_wanted():
        _ensure_br_netfilter()
    _ensure_netns([plan.host_netns, plan.outside_netns, *(vm.netns for vm in vms)])
    _in_netns(plan.host_netns, lambda: _configure_host(plan, vms))
    _in_netns(plan.outside_netns, lambda: _configure_outside(plan))
    for vm in vms:
        _in_netns(vm.netns, functools.partial(_configure_vm, plan, vm))
    _apply_nat(plan)
    argv = dnsmasq_command(plan, state_dir=sdir)
    pid = ensure_dnsmasq(plan, argv=argv, old_pid=old_pid)
    write_record(Record(plan, wanted, pid, argv))


def destroy_lab(name: str) -> None:
    """Remove lab `name`: stop its processes, delete its namespaces, remove its record and state directory.

    The namespaces deleted are those the record lists plus any named exactly ``hf-<name>-host``,
    ``hf-<name>-out`` or ``hf-<name>-vm<i>`` (a crash may have left some unrecorded); nothing else is
    touched. dnsmasq is stopped only if its command line shows it is this lab's (a recycled PID is left
    alone) and reaped when it is our child. Processes started by ``popen_in_*`` in this process are stopped
    too. Deleting the links inside the namespaces is the kernel's job: a namespace goes with its last user.

    Idempotent: destroying a lab that does not exist does nothing. Every step is tried even if one fails;
    then `KernelError` lists what failed.
    """
    validate_lab_name(name)
    _require_root()
    failures: list[str] = []
    try:
        record = read_record(name)
    except ConflictError:  # an unreadable record: find dnsmasq by its PID file, the namespaces by name
        record = None

    for proc in _PROCESSES.pop(name, []):
        stop_process(proc)

    sdir = state_dir(name)
    pid = record.dnsmasq_pid if record else read_pid_file(sdir / "dnsmasq.pid")
    try:
        stop_dnsmasq(name, pid)
    except OSError as exc:
        failures.append(f"stopping dnsmasq (pid {pid}): {exc}")

    names = set(record.plan.netns_names) if record else set()
    names |= {ns for ns in _list_netns() if is_lab_netns(name, ns)}
    for ns in sorted(names):
        if (NETNS_DIR / ns).exists():
            try:
                pyroute2_netns.remove(ns)
            except OSError as exc:
                failures.append(f"deleting netns {ns}: {exc}")

    state_file(name).unlink(missing_ok=True)
    shutil.rmtree(sdir, ignore_errors=True)
    if failures:
        raise KernelError(f"lab {name!r}: destroy was incomplete:\n  " + "\n  ".join(failures))


def read_lab(name: str) -> LabPlan | None:
    """The plan lab `name` was created with, or None if it is not recorded.

    Raises `InvalidInputError` for a bad name and `ConflictError` when the record is unreadable
    (`destroy_lab` removes it).
    """
    record = read_record(validate_lab_name(name))
    return record.plan if record else None


def lab_status(name: str) -> LabStatus:
    """What the kernel holds of lab `name` now (reads only; needs root for the port and NAT checks)."""
    record = read_record(validate_lab_name(name))
    existing = set(_list_netns())
    if record is None:
        return LabStatus(
            name=name,
            recorded=False,
            planned_vms=0,
            created_vms=0,
            host_netns_exists=lab_netns(name, "host") in existing,
            outside_netns_exists=lab_netns(name, "out") in existing,
            dnsmasq_pid=None,
            dnsmasq_alive=False,
            nat_present=False,
            vms=(),
        )
    plan = record.plan
    host_exists = plan.host_netns in existing
    links = _in_netns(plan.host_netns, _read_links) if host_exists else {}
    vms = tuple(
        VmStatus(
            name=vm.name,
            netns_exists=vm.netns in existing,
            port_present=vm.port in links,
            port_up=vm.port in links and links[vm.port][0],
            port_bridged=vm.port in links and links[vm.port][1] == plan.bridge,
        )
        for vm in plan.vms[: record.created_vms]
    )
    pid = record.dnsmasq_pid
    alive = pid is not None and record.dnsmasq_argv is not None and is_process(pid, record.dnsmasq_argv)
    nat = host_exists and _run_nft(plan, ["nft", "list", "table", "ip", plan.nat_table]).returncode == 0
    return LabStatus(
        name=name,
        recorded=True,
        planned_vms=len(plan.vms),
        created_vms=record.created_vms,
        host_netns_exists=host_exists,
        outside_netns_exists=plan.outside_netns in existing,
        dnsmasq_pid=pid,
        dnsmasq_alive=alive,
        nat_present=nat,
        vms=vms,
    )


def read_ports(plan: LabPlan) -> dict[str, tuple[bool, bool]]:
    """The plan's VM ports that exist in the host namespace, namespace VMs' veths and QEMU guests' taps
    alike: port name -> (up with carrier, a port of the lab's bridge). Empty without the host namespace."""
    if not (NETNS_DIR / plan.host_netns).exists():
        return {}
    links = _in_netns(plan.host_netns, _read_links)
    return {
        vm.port: (links[vm.port][0], links[vm.port][1] == plan.bridge) for vm in plan.vms if vm.port in links
    }


def run_in_vm(
    plan: LabPlan,
    vm_name: str,
    argv: Sequence[str],
    *,
    timeout: float = 30,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` inside VM `vm_name`'s namespace and wait; stdout and stderr are captured.

    A non-zero exit status is returned, not raised. Whatever the command leaves running in its session is
    killed when it ends (use ``popen_in_*`` for servers). On timeout the command and its session are killed
    and `subprocess.TimeoutExpired` is raised. `NotFoundError` if the plan has no such VM
    or its namespace does not exist.
    """
    return _run_in(plan.vm(vm_name).netns, argv, timeout=timeout, input=input)


def run_in_host(
    plan: LabPlan, argv: Sequence[str], *, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` in the lab's host namespace (the one with the bridge); as `run_in_vm`."""
    return _run_in(plan.host_netns, argv, timeout=timeout, input=input)


def run_in_outside(
    plan: LabPlan, argv: Sequence[str], *, timeout: float = 30, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` in the lab's outside namespace (beyond the routed uplink); as `run_in_vm`."""
    return _run_in(plan.outside_netns, argv, timeout=timeout, input=input)


_Stdio = int | IO[bytes] | None


def popen_in_vm(
    plan: LabPlan,
    vm_name: str,
    argv: Sequence[str],
    *,
    stdin: _Stdio = subprocess.DEVNULL,
    stdout: _Stdio = None,
    stderr: _Stdio = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in VM `vm_name`'s namespace, in its own session, and return at once (for servers).

    The process is remembered: stop it with `stop_process`, or `destroy_lab` stops it. `NotFoundError` if the
    plan has no such VM or its namespace does not exist.
    """
    return _popen_in(plan, plan.vm(vm_name).netns, argv, stdin=stdin, stdout=stdout, stderr=stderr)


def popen_in_host(
    plan: LabPlan,
    argv: Sequence[str],
    *,
    stdin: _Stdio = subprocess.DEVNULL,
    stdout: _Stdio = None,
    stderr: _Stdio = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in the lab's host namespace; as `popen_in_vm`."""
    return _popen_in(plan, plan.host_netns, argv, stdin=stdin, stdout=stdout, stderr=stderr)


def popen_in_outside(
    plan: LabPlan,
    argv: Sequence[str],
    *,
    stdin: _Stdio = subprocess.DEVNULL,
    stdout: _Stdio = None,
    stderr: _Stdio = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in the lab's outside namespace; as `popen_in_vm`."""
    return _popen_in(plan, plan.outside_netns, argv, stdin=stdin, stdout=stdout, stderr=stderr)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT) -> int:
    """Stop a process started by ``popen_in_*`` and its session: SIGTERM, then SIGKILL after `timeout`.

    Reaps it and whatever its session left behind, closes its pipes and returns its exit status (negative:
    killed by that signal). Safe to call on a process that already exited.
    """
    end_session(proc, grace=timeout)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    for procs in _PROCESSES.values():
        if proc in procs:
            procs.remove(proc)
    return proc.returncode


# ------------------------------------------------------------------------------------- namespaces, links


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionDeniedError("lab: network namespaces need root: run as root")


def _list_netns() -> list[str]:
    """Names of the mounted namespaces in /run/netns."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return [name for name in names if _is_mounted_netns(NETNS_DIR / name)]


def _is_mounted_netns(path: Path) -> bool:
    """Whether `path` is a live namespace mount (an nsfs file), not a stale empty file left by a crash."""
    try:
        return path.stat().st_dev != NETNS_DIR.stat().st_dev
    except FileNotFoundError:
        return False


def _ensure_netns(names: Iterable[str]) -> None:
    """Create every namespace of `names` that does not exist yet, with one ``ip -batch`` process."""
    missing: list[str] = []
    for name in names:
        path = NETNS_DIR / name
        if _is_mounted_netns(path):
            continue
        path.unlink(missing_ok=True)  # a stale mount point of ours: `ip netns add` would refuse it
        missing.append(name)
    if missing:
        batch = "".join(f"netns add {name}\n" for name in missing)
        _check_run(["ip", "-batch", "-"], input=batch.encode(), what="creating namespaces")


def _in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread inside `netns`; netlink and OS errors become `KernelError`."""
    thread = NetnsThread(netns, name=f"hf-lab-{netns}")
    try:
        return thread.call(fn)
    except NetlinkError as exc:
        raise KernelError(f"netns {netns}: the kernel refused a change: {exc}") from exc
    except OSError as exc:
        raise KernelError(f"netns {netns}: {exc}") from exc
    finally:
        thread.close()


def _bridge_native_wanted() -> bool:
    """The lab's data plane forced to bridge_native (`HYPERFENCE_FLAVOUR`): then nothing loads br_netfilter,
    so the lab shows that the flavour needs none."""
    return parse_flavour(os.environ.get(FLAVOUR_ENV), field=FLAVOUR_ENV) is Flavour.BRIDGE_NATIVE


def _ensure_br_netfilter() -> None:
    """Load br_netfilter when the kernel has it as a module that nothing loaded yet (a stock Debian kernel:
    the host-root guest, docs/hostroot.md), as the daemon does at start; the lab's host namespace needs its
    sysctls. KernelError with what to do when it cannot be loaded."""
    if os.path.isdir("/proc/sys/net/bridge"):
        return
    why = kernel_probe.load_br_netfilter()
    if not os.path.isdir("/proc/sys/net/bridge"):
        raise KernelError(
            f"the lab needs br_netfilter and it is not there (modprobe br_netfilter: {why or 'loaded'}, but "
            "/proc/sys/net/bridge is still missing): use a kernel with CONFIG_BRIDGE_NETFILTER"
        )


def _write_sysctl(key: str, value: str) -> None:
    """Set sysctl `key` (e.g. ``net/ipv4/ip_forward``) of the calling thread's namespace."""
    with open(f"/proc/sys/{key}", "w", encoding="ascii") as f:
        f.write(value)


def _links(ipr: IPRoute) -> dict[str, Any]:
    """Every link of `ipr`'s namespace by name (one dump: cheaper than a lookup per link)."""
    return {str(link.get("ifname")): link for link in ipr.get_links()}


def _link(ipr: IPRoute, ifname: str, where: str) -> Any:
    """The link called `ifname`; `KernelError` if it does not exist."""
    try:
        (link,) = ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        raise KernelError(f"{where}: link {ifname} is missing ({exc})") from exc
    return link


def _set_up(ipr: IPRoute, link: Any, *, mac: str | None = None, master: int | None = None) -> None:
    """Bring `link` up (with `mac` and under `master` when given); nothing is sent when it already is."""
    change: dict[str, object] = {}
    if not link["flags"] & _IFF_UP:
        change["state"] = "up"
    if mac is not None and link.get("address") != mac:
        change["address"] = mac
    if master is not None and link.get("master") != master:
        change["master"] = master
    if change:
        ipr.link("set", index=link["index"], **change)


def _ensure_address(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    try:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    except NetlinkError as exc:
        if exc.code != _EEXIST:
            raise


def _configure_host(plan: LabPlan, vms: Sequence[LabVm]) -> None:
    """In the host namespace: sysctls, bridge + gateway address, uplink veth, one port per VM (veth)."""
    for key, value in _HOST_SYSCTLS:
        if key.startswith("net/bridge/") and not os.path.isdir("/proc/sys/net/bridge"):
            continue  # no br_netfilter (bridge_native needs none)
        _write_sysctl(key, value)
    with IPRoute() as ipr:
        links = _links(ipr)
        _set_up(ipr, links["lo"])

        if plan.bridge not in links:
            ipr.link("add", ifname=plan.bridge, kind="bridge", address=plan.bridge_mac)
        bridge = _link(ipr, plan.bridge, plan.host_netns)
        _set_up(ipr, bridge, mac=plan.bridge_mac)
        _ensure_address(ipr, bridge["index"], str(plan.gateway), plan.subnet.prefixlen)

        if plan.uplink not in links:
            ipr.link(
                "add",
                ifname=plan.uplink,
                kind="veth",
                address=plan.uplink_mac,
                peer={
                    "ifname": plan.outside_ifname,
                    "address": plan.outside_mac,
                    "net_ns_fd": str(NETNS_DIR / plan.outside_netns),
                },
            )
        uplink = _link(ipr, plan.uplink, plan.host_netns)
        _set_up(ipr, uplink, mac=plan.uplink_mac)
        _ensure_address(ipr, uplink["index"], str(plan.uplink_ip), plan.outside_subnet.prefixlen)

        for vm in vms:
            port = links.get(vm.port)
            if port is None:
                ipr.link(
                    "add",
                    ifname=vm.port,
                    kind="veth",
                    peer={"ifname": vm.ifname, "address": vm.mac, "net_ns_fd": str(NETNS_DIR / vm.netns)},
                )
                port = _link(ipr, vm.port, plan.host_netns)
            # A bridge port is a pure L2 "tap": no IPv6 link-local address, no router solicitations from it.
            _write_sysctl(f"net/ipv6/conf/{vm.port}/disable_ipv6", "1")
            _set_up(ipr, port, master=bridge["index"])


def _configure_outside(plan: LabPlan) -> None:
    """In the outside namespace: lo, eth0 with its address, a route to the VM subnet via the host."""
    with IPRoute() as ipr:
        links = _links(ipr)
        _set_up(ipr, links["lo"])
        eth = links.get(plan.outside_ifname)
        if eth is None:
            raise KernelError(f"{plan.outside_netns}: link {plan.outside_ifname} is missing")
        _set_up(ipr, eth, mac=plan.outside_mac)
        _ensure_address(ipr, eth["index"], str(plan.outside_ip), plan.outside_subnet.prefixlen)
        ipr.route("replace", dst=str(plan.subnet), gateway=str(plan.uplink_ip))


def _configure_vm(plan: LabPlan, vm: LabVm) -> None:
    """In a VM namespace: lo, eth0 with its MAC and address, default route via the gateway."""
    with IPRoute() as ipr:
        links = _links(ipr)
        _set_up(ipr, links["lo"])
        eth = links.get(vm.ifname)
        if eth is None:
            raise KernelError(f"{vm.netns}: link {vm.ifname} is missing")
        _set_up(ipr, eth, mac=vm.mac)
        _ensure_address(ipr, eth["index"], str(vm.ip), plan.subnet.prefixlen)
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(plan.gateway))


def _read_links() -> dict[str, tuple[bool, str | None]]:
    """Every link of the calling thread's namespace: name -> (admin up and carrier, master's name).

    Carrier is the LOWER_UP flag, not operstate UP: a QEMU guest's tap with QEMU attached has carrier but
    reports operstate UNKNOWN (a veth has both, or neither while its peer is down)."""
    with IPRoute() as ipr:
        links = list(ipr.get_links())
    names = {link["index"]: str(link.get("ifname")) for link in links}
    up = _IFF_UP | _IFF_LOWER_UP
    return {
        str(link.get("ifname")): (link["flags"] & up == up, names.get(link.get("master"))) for link in links
    }


# --------------------------------------------------------------------------------------- nft, processes


def _check_run(argv: Sequence[str], *, input: bytes | None = None, what: str) -> None:
    try:
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        raise KernelError(f"{what}: `{' '.join(argv[:3])} …` failed ({done.returncode}): {stderr}")


def _run_nft(
    plan: LabPlan, argv: Sequence[str], *, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", plan.host_netns, *argv],
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _apply_nat(plan: LabPlan) -> None:
    done = _run_nft(plan, ["nft", "-f", "-"], input=nat_ruleset(plan).encode())
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        raise KernelError(f"lab {plan.name!r}: nft refused the NAT table (nothing applied): {stderr}")


def _require_netns(netns: str) -> None:
    if not _is_mounted_netns(NETNS_DIR / netns):
        raise NotFoundError(f"netns {netns} does not exist: create_lab the lab (with enough VMs) first")


def _run_in(
    netns: str, argv: Sequence[str], *, timeout: float, input: bytes | None
) -> subprocess.CompletedProcess[bytes]:
    _require_netns(netns)
    become_subreaper()
    cmd = ["ip", "netns", "exec", netns, *argv]
    with subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)  # unreaped leader: the group is ours
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        finally:
            if proc.returncode is not None:
                kill_leftovers(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _popen_in(
    plan: LabPlan, netns: str, argv: Sequence[str], *, stdin: _Stdio, stdout: _Stdio, stderr: _Stdio
) -> subprocess.Popen[bytes]:
    _require_netns(netns)
    become_subreaper()
    procs = _PROCESSES.setdefault(plan.name, [])
    procs[:] = [p for p in procs if p.poll() is None]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    procs.append(proc)
    return proc
