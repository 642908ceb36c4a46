"""Two real TCG guests under libvirt, nothing typed by hand: the daemon's inventory finds them, their agents
report over virtio-serial, and the firewall works as seen from inside the guests (through the lab shell, a
virtio-serial port, so the check does not ride on the network under test)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hyperfence.cli.lab import app as lab_app
from hyperfence.cli.main import app
from hyperfence.lab import topology
from hyperfence.lab.domains import (
    define_lab_domain,
    interface_xml,
    lab_domain_spec,
    prepare_qemu_dir,
    qemu_dir,
    shell_socket,
)
from hyperfence.lab.guest_shell import GuestResult, run_in_guest, wait_for_shell
from hyperfence.lab.image import build_image
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.qemu import define_lab_guest, qemu_policy, up_qemu
from hyperfence.lab.session import lab_state_dir
from hyperfence.lab.topology import run_in_host
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import InventoryWatcher
from tests.netns.libvirt.qemu_lab import http_probe, qemu_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[LabPlan, Engine]]:
    with qemu_lab(f"qm{secrets.token_hex(2)}", 2, tmp_path) as lab:
        yield lab


def web_policy(plan: LabPlan) -> dict[str, Any]:
    """No VMs typed in (libvirt's), and one rule: the host may reach vm1's port 8080."""
    doc = qemu_policy(plan)
    doc["rules"] = [
        {"id": "web", "from": "host", "to": f"vm:hf-{plan.name}-vm1", "protocol": "tcp", "ports": [8080]}
    ]
    return doc


def probe(plan: LabPlan, ip: str) -> str:
    return http_probe(plan, ip, timeout=3).strip()


def test_guests_found_in_libvirt_report_and_are_filtered(lab: tuple[LabPlan, Engine]) -> None:
    plan, engine = lab
    t0 = time.monotonic()
    domains = up_qemu(plan, engine)
    assert len(domains) == 2
    engine.store_policy(web_policy(plan), source="test")
    engine.converge()
    watcher = InventoryWatcher(engine)
    assert watcher.refresh()
    compiled = engine.current
    assert compiled is not None
    assert sorted(v.name for v in compiled.policy.vms) == sorted(d.name for d in domains)
    monitor = AgentMonitor(engine, startup_grace=60)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(r["status"] == "ok" for r in monitor.snapshot()):
            time.sleep(0.5)
        rows = monitor.snapshot()
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert all(r["channel"]["type"] == "virtio" for r in rows)
        first_beats = time.monotonic() - t0
        vm1, vm2 = (str(plan.vm(n).ip) for n in ("vm1", "vm2"))
        assert probe(plan, vm1).startswith("HTTP/1.")  # allowed by the policy
        assert probe(plan, vm2).startswith("FAIL")  # default deny
        # the heartbeat policy's pause action, through libvirt, recorded as the VM's event
        uuid2 = next(d.uuid for d in domains if d.name.endswith("vm2"))
        assert watcher.pause(uuid2) is True
        assert watcher.inventory.domain(uuid2).state == "paused"
        assert [e["outcome"] for e in engine.store.events(kind="vm-pause", vm=uuid2)] == ["done"]
        print(f"2 guests: define+start to both agents beating {first_beats:.1f} s")
    finally:
        stop.set()
        thread.join(timeout=5)
        watcher.inventory.close()


def consoles(plan: LabPlan) -> str:
    """The guests' console logs, for a failure message."""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in qemu_dir(plan).glob("*.log")
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float, plan: LabPlan) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s\n{consoles(plan)}"
        time.sleep(0.2)
    return time.monotonic() - t0


def ping(shell: Path, ip: str) -> GuestResult:
    return run_in_guest(shell, f"ping -c 3 -W 2 {ip}", timeout=20)


def icmp_rule(src: str, dst: str, action: str) -> dict[str, str]:
    return {"id": "icmp", "from": f"vm:{src}", "to": f"vm:{dst}", "protocol": "icmp", "action": action}


def agent_row(monitor: AgentMonitor, uuid: str) -> dict[str, object]:
    return next(r for r in monitor.snapshot() if r["vm"] == uuid)


@contextlib.contextmanager
def running_monitor(engine: Engine, grace: float) -> Iterator[tuple[AgentMonitor, InventoryWatcher]]:
    """The inventory read once (the guests become policy VMs) and an agent monitor running on its thread."""
    watcher = InventoryWatcher(engine)
    assert watcher.refresh()
    monitor = AgentMonitor(engine, startup_grace=grace, pause=watcher.pause)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield monitor, watcher
    finally:
        stop.set()
        thread.join(timeout=5)
        watcher.inventory.close()


def test_inside_the_guests_deny_allow_deny_and_a_killed_agent_isolates_its_guest(
    lab: tuple[LabPlan, Engine],
) -> None:
    plan, engine = lab
    vm1, vm2 = (f"hf-{plan.name}-{n}" for n in ("vm1", "vm2"))
    ip1, ip2 = (str(plan.vm(n).ip) for n in ("vm1", "vm2"))
    shell1, shell2 = (shell_socket(plan, n) for n in ("vm1", "vm2"))
    domains = up_qemu(plan, engine)
    uuid2 = next(d.uuid for d in domains if d.name == vm2)
    doc = qemu_policy(plan)
    doc["heartbeats"] = [{"vms": "vms", "interval": 1, "misses": 3, "action": "isolate", "release": "auto"}]
    engine.store_policy(doc, source="test")
    engine.converge()
    grace = 30.0  # the guests boot within it; silence counts only after it

    def set_icmp(action: str | None) -> None:
        doc["rules"] = [] if action is None else [icmp_rule(vm1, vm2, action)]
        engine.store_policy(doc, source="test")
        engine.converge()

    with running_monitor(engine, grace) as (monitor, watcher):
        for shell in (shell1, shell2):
            wait_for_shell(shell, timeout=90)
        wait_for("both agents ok", lambda: all(r["status"] == "ok" for r in monitor.snapshot()), 60, plan)
        assert run_in_guest(shell2, "ip -4 -o addr show dev eth0").output.split()[3] == f"{ip2}/22"
        lab_exec = ["exec", "vm2", "--name", plan.name, "--"]  # `hyperfence lab exec` uses the lab shell too
        r = CliRunner().invoke(lab_app, [*lab_exec, "cat", "/proc/sys/kernel/hostname"])
        assert (r.exit_code, r.output) == (0, "hf-guest\n"), (r.output, r.exception)
        assert CliRunner().invoke(lab_app, [*lab_exec, "sh", "-c", "exit 3"]).exit_code == 3

        denied = ping(shell1, ip2)  # no rule: default deny
        assert not denied.ok and "0 packets received" in denied.output, denied

        set_icmp("allow")
        allowed = ping(shell1, ip2)
        assert allowed.ok and " 0% packet loss" in allowed.output, allowed
        assert not ping(shell2, ip1).ok  # the rule is vm1 -> vm2 only

        set_icmp("deny")
        again = ping(shell1, ip2)
        assert not again.ok and "0 packets received" in again.output, again

        set_icmp("allow")
        time.sleep(max(0.0, monitor.tracker.started + grace - time.time()))  # kill after the grace
        kill = run_in_guest(shell2, "kill -9 $(cat /run/hf-agent.pid)")  # the agent dies inside vm2
        assert kill.ok, kill
        took = wait_for("vm2 isolated", lambda: agent_row(monitor, uuid2)["isolated"] is not None, 10, plan)
        assert agent_row(monitor, uuid2)["status"] == "silent"
        cut = ping(shell1, ip2)
        assert not cut.ok and "0 packets received" in cut.output, cut  # allowed by policy, cut by quarantine
        assert run_in_guest(shell2, "hf-agent start").ok  # back: released after good beats
        wait_for("vm2 released", lambda: agent_row(monitor, uuid2)["isolated"] is None, 30, plan)
        assert ping(shell1, ip2).ok

        doc["heartbeats"][0]["action"] = "pause"  # the same crash under a pause policy: paused in libvirt
        set_icmp("allow")
        assert run_in_guest(shell2, "kill -9 $(cat /run/hf-agent.pid)").ok
        paused = wait_for("vm2 paused", lambda: watcher.inventory.domain(uuid2).state == "paused", 10, plan)
        assert agent_row(monitor, uuid2)["isolated"] is not None
        print(f"agent killed in vm2 -> isolated after {took:.1f} s; under pause: paused after {paused:.1f} s")


def test_a_guest_started_while_the_daemon_is_down_gets_nothing_until_its_rules_are_in(
    lab: tuple[LabPlan, Engine],
) -> None:
    plan, engine = lab
    engine.store_policy(web_policy(plan), source="test")
    engine.converge()  # what a daemon left in the kernel before it stopped: no guest is known
    up_qemu(plan, engine)  # the guests start while no daemon runs
    vm1 = str(plan.vm("vm1").ip)
    console = qemu_dir(plan) / "vm1.console.log"
    deadline = time.monotonic() + 60
    while "HF: http on" not in (console.read_text(errors="replace") if console.exists() else ""):
        assert time.monotonic() < deadline, "the guest did not boot"
        time.sleep(0.5)
    assert probe(plan, vm1).startswith("FAIL")  # it serves, but its tap is an unknown port: nothing passes
    state = engine.state_dir
    repo = Path(__file__).resolve().parents[3]
    argv = [str(repo / ".venv/bin/hyperfence"), "--netns", plan.host_netns, "--state-dir", state]
    with open(Path(state) / "daemon.log", "wb") as err:
        daemon = subprocess.Popen([*argv, "daemon", "--libvirt", "qemu:///system"], stderr=err)
    try:
        deadline = time.monotonic() + 30
        result = probe(plan, vm1)
        while not result.startswith("HTTP/1.") and time.monotonic() < deadline:
            time.sleep(0.5)
            run_in_host(plan, ["ip", "neigh", "flush", "all"])  # forget the failed resolution
            result = probe(plan, vm1)
        assert result.startswith("HTTP/1."), (result, (Path(state) / "daemon.log").read_text()[-2000:])
        assert probe(plan, str(plan.vm("vm2").ip)).startswith("FAIL")  # vm2 known now, but no rule allows
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=15)


def test_a_pause_policy_pauses_a_silent_guest_in_libvirt(lab: tuple[LabPlan, Engine]) -> None:
    """vm1's agent never starts (its config is left out of the guest), so it is silent from the start; the
    heartbeat policy says pause: the monitor pauses the domain through libvirt and isolates it."""
    plan, engine = lab
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    doc = qemu_policy(plan)
    name = f"hf-{plan.name}-vm1"
    doc["heartbeats"] = [
        {"vms": f"vm:{name}", "interval": 1, "misses": 2, "action": "pause", "release": "manual"}
    ]
    engine.store_policy(doc, source="test")
    engine.converge()
    watcher = InventoryWatcher(engine)
    spec = lab_domain_spec(plan, "vm1", kernel=str(image.kernel), initrd=str(image.initrd))
    spec = dataclasses.replace(spec, agent_config_path=None)  # no config handed over: no agent
    info = define_lab_domain(watcher.inventory, spec)  # runs, without an agent
    runner = CliRunner()
    r = runner.invoke(
        app, ["--state-dir", engine.state_dir, "vm", "enroll", name, "--libvirt", "qemu:///system"]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert watcher.refresh()
    monitor = AgentMonitor(engine, startup_grace=1, pause=watcher.pause)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while watcher.inventory.domain(info.uuid).state != "paused" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert watcher.inventory.domain(info.uuid).state == "paused"
        row = next(r for r in monitor.snapshot() if r["vm"] == info.uuid)
        assert row["isolated"] is not None and "never seen" in row["isolated"]
        monitor.save()
        kinds = [e["kind"] for e in engine.store.events(vm=info.uuid)]
        assert "vm-pause" in kinds and "isolated" in kinds
        how = next(iter(engine.store.events(kind="isolated", vm=info.uuid)))["how"]
        assert how == "paused and isolated"
    finally:
        stop.set()
        thread.join(timeout=5)
        watcher.inventory.close()


WAIT_FOR_ETH = (
    "i=; for n in $(seq 1 75); do for d in /sys/class/net/eth*; do [ -e $d ] && i=${d##*/}; done; "
    '[ -n "$i" ] && break; sleep 0.2; done'
)


def in_port_map(plan: LabPlan, tap: str) -> bool:
    """Is `tap` a known port in the kernel (the bridge table's port map)?"""
    out = run_in_host(plan, ["nft", "-j", "list", "map", "bridge", "hyperfence", "out_ports"]).stdout.decode()
    return f'"{tap}"' in out


def test_nic_hotplug_follows_the_guest_and_an_extra_nic_gets_nothing(lab: tuple[LabPlan, Engine]) -> None:
    """Events drive the inventory: unplug the guest's NIC -> its VM and rules go; plug it back -> rules are in
    the kernel and the allowed port answers again; a second NIC on the managed bridge is reported and dropped."""
    plan, engine = lab
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    vm1 = plan.vm("vm1")
    engine.store_policy(web_policy(plan), source="test")
    engine.converge()
    watcher = InventoryWatcher(engine)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    shell = shell_socket(plan, "vm1")
    nic = interface_xml(bridge=plan.bridge, tap=vm1.port, mac=vm1.mac)
    try:
        info = define_lab_guest(watcher.inventory, plan, engine, "vm1", image)
        wait_for_shell(shell, timeout=90)
        wait_for("vm1 served", lambda: probe(plan, str(vm1.ip)).startswith("HTTP/1."), 30, plan)

        watcher.inventory.detach_device(info.uuid, nic)  # the guest releases it (ACPI hot-unplug)
        wait_for("vm1 gone from the kernel", lambda: not in_port_map(plan, vm1.port), 30, plan)
        assert engine.current is not None and engine.current.policy.vms == ()

        watcher.inventory.attach_device(info.uuid, nic)
        took = wait_for("vm1 back in the kernel", lambda: in_port_map(plan, vm1.port), 10, plan)
        # the guest sees the new PCI device and binds virtio_net a moment later: wait for its ethN
        up = run_in_guest(
            shell, f"{WAIT_FOR_ETH}; ip link set $i up && ip addr add {vm1.ip}/22 dev $i", timeout=20
        )
        assert up.ok, up
        wait_for("vm1 served again", lambda: probe(plan, str(vm1.ip)).startswith("HTTP/1."), 30, plan)

        extra = interface_xml(bridge=plan.bridge, tap=f"{vm1.port}x", mac="52:54:00:fe:00:01")
        watcher.inventory.attach_device(info.uuid, extra)
        wait_for(
            "the extra NIC reported",
            lambda: any(
                e["tap"] == f"{vm1.port}x" for e in engine.store.events(kind="nic-unprotected", vm=info.uuid)
            ),
            10,
            plan,
        )
        assert not in_port_map(plan, f"{vm1.port}x") and in_port_map(plan, vm1.port)
        print(f"NIC plugged back -> its rules in the kernel after {took:.2f} s")
    finally:
        stop.set()
        thread.join(timeout=10)


def virsh(*args: str) -> str:
    done = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def hyperfence_lab(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "lab", *args, "--name", name]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def enrolled_key(lab: str, uuid: str) -> str:
    """The agent key the lab's store holds for domain `uuid`."""
    engine = Engine(netns=None, state_dir=str(lab_state_dir(lab)))
    try:
        return engine.store.agents()[uuid].key.hex()
    finally:
        engine.close()


def vm_list_through_a_daemon(lab: str, uuid: str) -> list[str]:
    """`vm list`'s cells for domain `uuid`, from a daemon with the libvirt inventory (started and stopped
    here); `vm events` finds the VM by its domain's name too, though it is not in the policy."""
    hf = [sys.executable, "-m", "hyperfence", "--lab", lab]
    policy = topology.state_dir(lab) / "policy.yaml"
    assert subprocess.run([*hf, "policy", "apply", str(policy)], check=False).returncode == 0
    daemon = subprocess.Popen([*hf, "daemon", "--libvirt", "qemu:///system"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert daemon.poll() is None
            done = subprocess.run([*hf, "vm", "list"], capture_output=True, text=True, check=False)
            rows = [line.split("│")[1:-1] for line in done.stdout.splitlines() if uuid in line]
            cells = [c.strip() for c in rows[0]] if len(rows) == 1 else []
            if cells and cells[2] != "-":  # the daemon has read libvirt
                break
            assert time.monotonic() < deadline, done.stdout + done.stderr
            time.sleep(0.3)
        events = subprocess.run([*hf, "vm", "events", cells[0]], capture_output=True, text=True, check=False)
        assert events.returncode == 0, events.stderr
        return cells
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_the_lab_commands_on_a_qemu_lab_up_twice_status_and_down() -> None:
    """What an operator types, as the real commands, on one lab of one guest (booted twice in all): `lab up
    --qemu` again keeps the running guest (same domain, same run, same agent key) where it used to stop on
    "domain already exists"; `lab status` counts and lists the guests (it said 0/2 VMs); a shut-off guest is
    started again by `lab up`, with its own UUID and a new key that the store and the guest's config share;
    `lab down` removes the domain, the libvirtd it started, and the lab's state (agent keys included)."""
    if running_libvirtd() is not None:
        pytest.skip("a libvirtd this test did not start is running (one per machine): not touching it")
    name = f"op{secrets.token_hex(2)}"
    domain = f"hf-{name}-vm1"
    plan = plan_lab(name, 1)
    config = qemu_dir(plan) / "vm1.agent.json"
    state = lab_state_dir(name)

    def lab(*args: str) -> subprocess.CompletedProcess[str]:
        return hyperfence_lab(name, *args)

    def stored_key(uuid: str) -> str:
        return enrolled_key(name, uuid)

    try:
        up = lab("up", "--qemu", "--vms", "1")
        assert up.returncode == 0, up.stderr
        assert f"1 guest running: started {domain}" in up.stdout
        uuid, run = virsh("domuuid", domain), virsh("domid", domain)
        key = json.loads(config.read_text())["key"]
        assert stored_key(uuid) == key

        again = lab("up", "--qemu", "--vms", "1")
        assert again.returncode == 0, again.stderr
        assert f"1 guest running: already up {domain}" in again.stdout
        assert (virsh("domuuid", domain), virsh("domid", domain)) == (uuid, run)  # not restarted
        assert json.loads(config.read_text())["key"] == key == stored_key(uuid)  # not enrolled again

        status = lab("status")
        assert status.returncode == 0, status.stderr
        assert "1/1 QEMU guests running" in status.stdout
        (row,) = [line.split("│")[1:6] for line in status.stdout.splitlines() if domain in line]
        assert [c.strip() for c in row] == ["vm1", domain, "running", "yes", "yes"], status.stdout

        virsh("destroy", domain)
        status = lab("status")
        assert "0/1 QEMU guests running" in status.stdout and " shutoff " in status.stdout
        listed = vm_list_through_a_daemon(name, uuid)  # the shut-off guest is listed, by its name
        assert listed[:4] == [domain, uuid, "shutoff", "vm not running"], listed

        restarted = lab("up", "--qemu", "--vms", "1")
        assert restarted.returncode == 0, restarted.stderr
        assert f"1 guest running: started {domain}" in restarted.stdout
        assert virsh("domuuid", domain) == uuid and virsh("domstate", domain) == "running"
        new_key = json.loads(config.read_text())["key"]
        assert new_key != key and stored_key(uuid) == new_key  # what the guest boots with is enrolled

        down = lab("down")
        assert down.returncode == 0, down.stderr
        assert f"(its state {state} removed)" in down.stdout
        assert not state.exists() and not qemu_dir(plan).exists()
        assert running_libvirtd() is None  # the libvirtd `lab up` started is gone, with the domain
    finally:
        lab("down")
        shutil.rmtree(state, ignore_errors=True)
