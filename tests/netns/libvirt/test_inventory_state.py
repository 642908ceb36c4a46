"""The VMs found in libvirt are part of the desired state every use case sees, with two real TCG guests and
the real daemon (`hyperfence daemon --libvirt`, a process of its own) and CLI:

- `can`, `ruleset diff` and `ruleset stats` agree with the kernel for the discovered VMs (the CLI compiles the
  last known inventory the daemon stored, as the daemon does);
- a daemon restart, with libvirtd up and with libvirtd down, writes nothing to the kernel (`nft monitor` in
  the lab's host namespace prints nothing between two markers) and loses no ping between the guests
  (50 a second across the restart);
- with the daemon stopped, `policy apply` (and its `--dry-run`) keeps the discovered VMs' rules, `vm list`
  shows them as policy VMs, and `vm isolate` / `vm events` / `vm release` take a discovered VM's name and the
  kernel follows.

One lab and one boot of two guests for the module; the tests run in order on it (each leaves the daemon
running, except where it says). Skipped when a libvirtd not started here is running (one per machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyperfence.daemon import request
from hyperfence.lab import topology
from hyperfence.lab.domains import shell_socket
from hyperfence.lab.guest_shell import GuestResult, run_in_guest, wait_for_shell
from hyperfence.lab.libvirtd import ensure_libvirtd, kill_libvirtd
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.qemu import qemu_policy, up_qemu
from hyperfence.lab.topology import run_in_host
from tests.netns.libvirt.qemu_lab import qemu_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd and network namespaces need root"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

URI = "qemu:///system"
HYPERFENCE = Path(sys.executable).with_name("hyperfence")
PINGS = 1500  # at 50 a second: 30 s, long enough to span a daemon restart on a loaded machine


@dataclass
class Env:
    plan: LabPlan
    state: str
    names: tuple[str, str]  # the domains' names (vm1, vm2)
    ips: tuple[str, str]
    shells: tuple[Path, Path]
    doc: dict[str, object]
    daemon: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HYPERFENCE), "--netns", self.plan.host_netns, "--state-dir", self.state, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "250"},
        )

    def start_daemon(self) -> None:
        """`daemon --libvirt`, once its first converge has ended (its status names the policy)."""
        log = Path(self.state) / f"daemon{len(self.logs)}.log"
        self.logs.append(log)
        argv = [str(HYPERFENCE), "--netns", self.plan.host_netns, "--state-dir", self.state]
        with open(log, "wb") as err:
            self.daemon = subprocess.Popen(
                [*argv, "daemon", "--libvirt", URI, "--resync", "3600"], stderr=err
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.daemon.poll() is None, self.log_tail()
            reply = request(self.state, {"op": "status"}, timeout=5)
            if reply is not None and reply.get("policy"):
                return
            assert time.monotonic() < deadline, (reply, self.log_tail())
            time.sleep(0.1)

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=30)
            self.daemon = None

    def log_tail(self) -> str:
        return self.logs[-1].read_text(errors="replace")[-3000:] if self.logs else ""

    def ping(self, src: int, dst: int) -> GuestResult:
        return run_in_guest(self.shells[src], f"ping -c 3 -W 2 {self.ips[dst]}", timeout=20)


def icmp(src: str, dst: str, rule_id: str) -> dict[str, str]:
    return {"id": rule_id, "from": f"vm:{src}", "to": f"vm:{dst}", "protocol": "icmp"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("inventory")
    with qemu_lab(f"iv{secrets.token_hex(2)}", 2, tmp) as (plan, engine):
        domains = up_qemu(plan, engine)
        names = (f"hf-{plan.name}-vm1", f"hf-{plan.name}-vm2")
        assert sorted(d.name for d in domains) == sorted(names)
        doc = qemu_policy(plan)
        doc["rules"] = [icmp(names[0], names[1], "echo")]  # vm1 may ping vm2, not the reverse
        engine.store_policy(doc, source="test")
        e = Env(
            plan,
            engine.state_dir,
            names,
            (str(plan.vm("vm1").ip), str(plan.vm("vm2").ip)),
            (shell_socket(plan, "vm1"), shell_socket(plan, "vm2")),
            doc,
        )
        try:
            e.start_daemon()
            for shell in e.shells:
                wait_for_shell(shell, timeout=120)
            deadline = time.monotonic() + 30  # the watcher's first read after the guests came up
            while not e.ping(0, 1).ok:
                assert time.monotonic() < deadline, e.log_tail()
            yield e
        finally:
            e.stop_daemon()


# --- nft monitor -------------------------------------------------------------------------------------


class Monitor:
    """`nft monitor` in the lab's host namespace, printing to a file; `mark` puts a scratch table in and out
    (the kernel reports changes in order: once the marker is printed, every change before it is too)."""

    def __init__(self, plan: LabPlan, path: Path) -> None:
        self.plan, self.path = plan, path
        with open(path, "wb") as out:
            self.proc = topology.popen_in_host(plan, ["nft", "monitor"], stdout=out)
        for attempt in range(1, 41):  # it listens once a marker shows (one made before it subscribed is lost)
            try:
                self.mark(f"hfsync{attempt}", wait=1)
                return
            except AssertionError:
                pass
        raise AssertionError("nft monitor never printed a marker")

    def mark(self, tag: str, *, wait: float = 10) -> None:
        run_in_host(self.plan, ["nft", "add", "table", "ip", tag])
        run_in_host(self.plan, ["nft", "delete", "table", "ip", tag])
        deadline = time.monotonic() + wait
        while f"delete table ip {tag}\n" not in self.path.read_text():
            assert time.monotonic() < deadline, f"nft monitor did not print {tag}"
            time.sleep(0.05)

    def between(self, before: str, after: str) -> list[str]:
        """The kernel changes printed between the markers `before` and `after` (no generation lines)."""
        text = self.path.read_text()
        rest = text[text.index(f"delete table ip {before}\n") :].split("\n", 1)[1]
        rest = rest[: rest.index(f"add table ip {after}\n")]
        return [line for line in rest.splitlines() if line and not line.startswith("# new generation")]

    def close(self) -> None:
        topology.stop_process(self.proc)


class Pinger:
    """vm1 pings vm2 50 times a second (from inside the guest, through its lab shell) on a thread."""

    def __init__(self, env: Env) -> None:
        self.result: GuestResult | None = None
        command = f"ping -i 0.02 -c {PINGS} -W 2 {env.ips[1]} | tail -2"
        self.thread = threading.Thread(target=self._run, args=(env.shells[0], command), daemon=True)
        self.thread.start()

    def _run(self, shell: Path, command: str) -> None:
        self.result = run_in_guest(shell, command, timeout=PINGS * 0.02 + 60)

    def lost(self) -> str:
        """ping's summary, once it has ended."""
        self.thread.join(timeout=PINGS * 0.02 + 90)
        assert self.result is not None, "ping did not end"
        return self.result.output


def restart(env: Env, *, libvirtd_up: bool, tmp_path: Path) -> tuple[list[str], str]:
    """Restart the daemon (with libvirtd stopped meanwhile, unless `libvirtd_up`) while vm1 pings vm2 and
    `nft monitor` watches; (the kernel changes from the old daemon's stop to the new one being ready, ping's
    summary)."""
    monitor = Monitor(env.plan, tmp_path / "monitor.txt")
    try:
        pinger = Pinger(env)
        time.sleep(2)  # ping runs
        monitor.mark("hfbefore")
        t0 = time.monotonic()
        env.stop_daemon()
        if not libvirtd_up:
            kill_libvirtd(env.plan)  # QEMU outlives it: the guests go on running
        env.start_daemon()
        took = time.monotonic() - t0
        time.sleep(2)  # its loops are running: a late write would show
        monitor.mark("hfafter")
        written = monitor.between("hfbefore", "hfafter")
        summary = pinger.lost()
        up = "up" if libvirtd_up else "down"
        print(
            f"restart with libvirtd {up}: stop to ready {took:.1f} s; {len(written)} nft changes; {summary!r}"
        )
        return written, summary
    finally:
        monitor.close()


def no_loss(summary: str) -> bool:
    return f"{PINGS} packets transmitted, {PINGS} packets received" in summary


# --- the tests, in order -----------------------------------------------------------------------------


def test_can_agrees_with_the_kernel(env: Env) -> None:
    ip1, ip2 = env.ips
    allowed = env.cli("can", ip1, ip2, "--protocol", "icmp")
    assert allowed.returncode == 0 and "allowed by echo" in allowed.stdout, allowed.stdout + allowed.stderr
    assert env.ping(0, 1).ok  # the kernel agrees
    denied = env.cli("can", ip2, ip1, "--protocol", "icmp")
    assert denied.returncode == 1 and "denied" in denied.stdout, denied.stdout + denied.stderr
    assert not env.ping(1, 0).ok
    by_name = env.cli("can", env.names[0], env.names[1], "--protocol", "icmp")
    assert by_name.returncode == 0, by_name.stdout + by_name.stderr


def test_ruleset_diff_and_stats_agree_with_the_kernel(env: Env) -> None:
    diff = env.cli("ruleset", "diff")
    assert (diff.returncode, diff.stdout.strip()) == (
        0,
        "in sync: the kernel holds exactly the desired ruleset",
    ), diff.stdout + diff.stderr
    stats = env.cli("ruleset", "stats", "--by-vm", "--json")
    assert stats.returncode == 0, stats.stderr
    rows = json.loads(stats.stdout)
    echo = [r for r in rows if r["rule"] == "echo" and r["vm"] == env.names[0] and r["direction"] == "egress"]
    assert echo and echo[0]["packets"] > 0, rows  # counted for the discovered VM, by its name


def test_a_restart_with_libvirtd_up_writes_nothing_and_loses_no_ping(env: Env, tmp_path: Path) -> None:
    written, summary = restart(env, libvirtd_up=True, tmp_path=tmp_path)
    assert written == [], written
    assert no_loss(summary), summary


def test_a_restart_with_libvirtd_down_writes_nothing_and_loses_no_ping(env: Env, tmp_path: Path) -> None:
    try:
        written, summary = restart(env, libvirtd_up=False, tmp_path=tmp_path)
        assert written == [], written
        assert no_loss(summary), summary
        assert "keeping the last known VMs" in env.log_tail()
        diff = env.cli("ruleset", "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr
        # libvirtd comes back: the watcher reads the same VMs, and writes nothing either
        monitor = Monitor(env.plan, tmp_path / "monitor-back.txt")
        try:
            monitor.mark("hfdown")
            ensure_libvirtd(env.plan, qemu_as_root=True)
            deadline = time.monotonic() + 60
            while "libvirt: resync" not in env.log_tail():
                assert time.monotonic() < deadline, env.log_tail()
                time.sleep(0.5)
            time.sleep(1)
            monitor.mark("hfback")
            assert monitor.between("hfdown", "hfback") == []
        finally:
            monitor.close()
    finally:
        ensure_libvirtd(env.plan, qemu_as_root=True)  # the next tests need it (a no-op when it runs)
    assert env.ping(0, 1).ok


def test_policy_apply_with_the_daemon_stopped_keeps_the_discovered_vms_rules(
    env: Env, tmp_path: Path
) -> None:
    env.stop_daemon()
    doc = {
        **env.doc,
        "rules": [icmp(env.names[0], env.names[1], "echo"), icmp(env.names[1], env.names[0], "back")],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    applied = env.cli("policy", "apply", str(path))
    assert applied.returncode == 0 and "applied" in applied.stdout, applied.stdout + applied.stderr
    assert env.ping(0, 1).ok  # kept
    assert env.ping(1, 0).ok  # and the new rule is in
    again = env.cli("policy", "apply", "--dry-run", str(path))  # the plan counts the discovered VMs too
    assert again.stdout.strip() == "would send 0 commands: nothing to change", again.stdout + again.stderr
    diff = env.cli("ruleset", "diff")
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_vm_list_isolate_events_and_release_take_a_discovered_vms_name(env: Env) -> None:
    """With no daemon: the CLI's own engine finds the VM by its name."""
    env.stop_daemon()  # (the previous test stopped it already)
    vm2 = env.names[1]
    listed = env.cli("vm", "list")
    # the guests by name, as policy VMs (with the stored inventory ignored: only their enrolled ids)
    assert listed.returncode == 0 and all(n in listed.stdout for n in env.names), (
        listed.stdout + listed.stderr
    )
    isolated = env.cli("vm", "isolate", vm2, "--reason", "test")
    assert isolated.returncode == 0, isolated.stdout + isolated.stderr
    assert not env.ping(0, 1).ok  # the kernel cut it off
    denied = env.cli("can", env.ips[0], env.ips[1], "--protocol", "icmp")
    assert denied.returncode == 1 and "denied" in denied.stdout, denied.stdout + denied.stderr
    events = env.cli("vm", "events", vm2)
    assert events.returncode == 0 and "overlay-set" in events.stdout, events.stdout + events.stderr
    released = env.cli("vm", "release", vm2)
    assert released.returncode == 0 and "released isolate by operator" in released.stdout, (
        released.stdout + released.stderr
    )
    assert env.ping(0, 1).ok
    allowed = env.cli("can", env.ips[0], env.ips[1], "--protocol", "icmp")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
