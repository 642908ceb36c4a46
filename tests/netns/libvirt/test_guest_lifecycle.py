"""What an operator of a libvirt host meets, with one real TCG guest and the real daemon (`hyperfence daemon
--libvirt`, a process of its own) and the real CLI: the guest is not called silent while it boots or after a
reset, until its boot grace is over; `label:vm=...` selects it; a metadata change reaches the firewall at once
(libvirt's metadata-change event); `hyperfence vm label` keeps the addresses, where the docs' earlier `virsh
metadata --set` lost them, which is now a warning and an `address-lost` event. One boot and three resets."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.codec.libvirt_xml import XMLNS
from hyperfence.daemon import request
from hyperfence.lab.domains import prepare_qemu_dir, qemu_dir
from hyperfence.lab.image import build_image
from hyperfence.lab.libvirtd import ensure_libvirtd
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.qemu import define_lab_guest, qemu_policy
from hyperfence.lab.topology import run_in_host
from hyperfence.reconcile.engine import Engine
from tests.netns.libvirt.qemu_lab import http_probe, qemu_lab

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

URI = "qemu:///system"
HYPERFENCE = Path(sys.executable).with_name("hyperfence")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[LabPlan, Engine]]:
    with qemu_lab(f"lv{secrets.token_hex(2)}", 1, tmp_path) as lab:
        yield lab


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", URI, *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def restart_on_reboot(uuid: str, scratch: Path) -> None:
    """The lab's domains stop on a reboot (a panicking guest must not loop); an operator's domain restarts:
    `virsh reset` then keeps it running, as a reboot inside the guest would."""
    xml = virsh("dumpxml", "--inactive", "--security-info", uuid)
    assert "<on_reboot>destroy</on_reboot>" in xml
    path = scratch / "domain.xml"
    path.write_text(xml.replace("<on_reboot>destroy</on_reboot>", "<on_reboot>restart</on_reboot>"))
    virsh("define", str(path))


def cli(state: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HYPERFENCE), "--state-dir", state, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "250"},
    )


def probe(plan: LabPlan, ip: str) -> bool:
    """Does the guest's port 8080 answer the host (busybox httpd in the guest)?"""
    run_in_host(plan, ["ip", "neigh", "flush", "all"])  # forget a failed resolution
    out = http_probe(plan, ip, timeout=2)
    return out.startswith("HTTP/1.")


def pings(plan: LabPlan, ip: str) -> bool:
    return run_in_host(plan, ["ping", "-c", "1", "-W", "1", ip], timeout=10).returncode == 0


@contextlib.contextmanager
def daemon(plan: LabPlan, state: str) -> Iterator[Path]:
    """`hyperfence daemon --libvirt` as its own process; yields its log file (stderr)."""
    log = Path(state).parent / "daemon.log"  # beside the state directory (whose files must be private)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(HYPERFENCE), "--netns", plan.host_netns, "--state-dir", state, "daemon", "--libvirt", URI],
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while request(state, {"op": "status"}) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Guest:
    """The guest under test, the daemon watching it, and what to ask them."""

    plan: LabPlan
    state: str
    uuid: str
    name: str
    ip: str
    inventory: LibvirtInventory
    log: Path

    def context(self) -> str:
        consoles = "".join(p.read_text(errors="replace")[-1500:] for p in qemu_dir(self.plan).glob("*.log"))
        return f"--- daemon\n{self.log.read_text()[-4000:]}\n--- console\n{consoles}"

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        t0 = time.monotonic()
        while not check():
            assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s\n{self.context()}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def row(self) -> dict[str, Any]:
        """The daemon's view of the guest's agent (`vm list`'s source)."""
        reply = request(self.state, {"op": "agents"})
        assert reply is not None and reply["ok"], reply
        return next(r for r in reply["agents"] if r["vm"] == self.uuid)

    def domain_state(self) -> str:
        return self.inventory.domain(self.uuid).state

    def through_boot(self, what: str, timeout: float) -> tuple[float, set[str]]:
        """From now until the agent's first beat from the guest's new boot (a beat more than 2 s from now: the
        guest takes longer than that to boot), the guest must keep running (never paused); the time that took
        and the statuses seen."""
        t0, since, seen = time.monotonic(), time.time(), set()
        while True:
            assert self.domain_state() == "running", f"{what}: the guest was paused\n{self.context()}"
            row = self.row()
            seen.add(row["status"])
            if row["status"] == "ok" and (row["last_seen"] or 0) > since + 2:
                return time.monotonic() - t0, seen
            assert time.monotonic() - t0 < timeout, (
                f"{what}: no beat in {timeout} s ({seen})\n{self.context()}"
            )
            time.sleep(0.3)

    def probe(self) -> bool:
        return probe(self.plan, self.ip)


def boot_and_reset(guest: Guest) -> tuple[float, float]:
    """Start (after the daemon's startup grace) and reset: booting, then ok, never paused."""
    time.sleep(16)  # the daemon's startup grace is over: from here on, silence would count
    guest.inventory.start(guest.uuid)
    boot, seen = guest.through_boot("start", 60)
    assert "booting" in seen and guest.row()["isolated"] is None
    guest.wait_for("port 8080 open to the host (rule to label:vm=vm1)", guest.probe, 20)
    virsh("reset", guest.uuid)  # as a reboot inside the guest
    reset, seen = guest.through_boot("reset", 60)
    assert "booting" in seen and guest.row()["isolated"] is None
    return boot, reset


def metadata_changes(guest: Guest) -> float:
    """`vm label` reaches the firewall at once and keeps the address; the docs' earlier `virsh metadata
    --set` (no <ip>) takes the guest out loudly; `vm label --ip` brings it back."""
    plan, ip, name = guest.plan, guest.ip, guest.name
    assert not pings(plan, ip)  # no tier=web label yet
    t0 = time.monotonic()
    r = cli(guest.state, "vm", "label", name, "tier=web")
    assert r.returncode == 0 and "running domain" in r.stdout, (r.stdout, r.stderr)
    guest.wait_for("ping after tier=web", lambda: pings(plan, ip), 5)
    took = time.monotonic() - t0  # the command itself included (a Python start, ~1 s)
    assert (
        f"libvirt: metadata-changed {name} (hyperfence)" in guest.log.read_text()
    )  # the event, not the timer
    assert guest.probe()  # the address was kept: still in the firewall

    labels = f'<labels><label key="lab">{plan.name}</label><label key="vm">vm1</label></labels>'
    virsh("metadata", guest.uuid, XMLNS, "--key", "hf", "--config", "--live", "--set", labels)
    guest.wait_for("the guest out of the firewall", lambda: not guest.probe(), 5)
    guest.wait_for("a warning", lambda: "lists no address any more" in guest.log.read_text(), 5)
    events = cli(guest.state, "vm", "events", name)
    assert events.returncode == 0 and "address-lost" in events.stdout and ip in events.stdout, events
    r = cli(guest.state, "vm", "label", name, "--ip", ip)
    assert r.returncode == 0, (r.stdout, r.stderr)
    guest.wait_for("the guest back in the firewall", guest.probe, 10)
    return took


def test_a_guest_boots_and_resets_unpunished_and_its_metadata_reaches_the_firewall_at_once(
    lab: tuple[LabPlan, Engine], tmp_path: Path
) -> None:
    plan, engine = lab
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    doc = qemu_policy(plan)
    # pause + manual: the strictest policy; a pause at a start or reset would stay for good
    hb = {"vms": "vms", "interval": 1, "misses": 3, "action": "pause", "release": "manual", "boot_grace": 45}
    doc["heartbeats"] = [hb]
    doc["rules"] = [
        {"id": "web", "from": "host", "to": "label:vm=vm1", "protocol": "tcp", "ports": [8080]},
        {"id": "ping", "from": "host", "to": "label:tier=web", "protocol": "icmp"},
    ]
    engine.store_policy(doc, source="test")
    engine.converge()
    inventory = LibvirtInventory(URI)
    info = define_lab_guest(inventory, plan, engine, "vm1", image, start=False)  # enrolled, shut off
    restart_on_reboot(info.uuid, tmp_path)
    try:
        with daemon(plan, engine.state_dir) as log:
            guest = Guest(
                plan, engine.state_dir, info.uuid, info.name, str(plan.vm("vm1").ip), inventory, log
            )
            # a shut-off domain's labels change in its definition (virsh's --live would be refused for it)
            r = cli(guest.state, "vm", "label", guest.name, "env=test")
            assert r.returncode == 0 and "(set in the definition)" in r.stdout, (r.stdout, r.stderr)
            off = inventory.domain(guest.uuid)
            assert off.ips == (guest.ip,) and off.labels["env"] == "test" and off.labels["vm"] == "vm1"

            boot, reset = boot_and_reset(guest)
            took = metadata_changes(guest)

            # the grace ends: with 2 s, a reset's ~17 s without beats is silence, and the guest is paused
            hb["boot_grace"] = 2
            generation, _ = engine.store_policy(doc, source="test")

            def applied() -> bool:
                return (request(guest.state, {"op": "status"}) or {}).get("policy") == f"gen:{generation}"

            guest.wait_for("the new policy applied", applied, 10)
            virsh("reset", guest.uuid)
            paused = guest.wait_for("paused after the grace", lambda: guest.domain_state() == "paused", 20)
            assert "not heard since the VM started" in str(guest.row()["isolated"])
        # A restarted daemon reads libvirt's VMs before its first converge: that converge finds the kernel
        # right and writes nothing (before, it took the guest out of the firewall until the first read).
        writes = len(engine.store.events(kind="applied"))
        with daemon(plan, engine.state_dir) as log:
            guest.log = log
            guest.wait_for("the restarted daemon's first converge", applied, 20)
            time.sleep(1)  # the inventory loop's own first read
            assert len(engine.store.events(kind="applied")) == writes, guest.context()
    finally:
        inventory.close()
    print(
        f"start -> first beat {boot:.1f} s, reset -> first beat {reset:.1f} s (never paused); "
        f"vm label started -> ping allowed {took:.2f} s; boot_grace 2 s: paused {paused:.1f} s after a reset"
    )
