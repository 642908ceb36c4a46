"""libvirt for real: a lab-started libvirtd, a tiny disk-less domain on the lab bridge, inventory, events,
actions, and the event watcher surviving a libvirtd crash.

One lab (random name, 2 VMs planned, 0 namespace VMs created) and one libvirtd for the whole module; the
domain is 64 MiB with no disk (it sits in firmware). Skipped when a libvirtd not started here is running:
there is one per machine, and it would be someone else's.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import secrets
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from hyperfence.adapters.libvirt import LibvirtEvents, LibvirtInventory
from hyperfence.cli.main import app
from hyperfence.codec.libvirt_xml import DomainEvent, DomainInfo, VmAction
from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError, TemporaryError
from hyperfence.lab.domains import define_lab_domain, lab_domain_spec, lab_domains, prepare_qemu_dir
from hyperfence.lab.libvirtd import ensure_libvirtd, kill_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.lab.topology import create_lab, destroy_lab, run_in_host
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import InventoryWatcher

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd and network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("libvirtd") is None and not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"
    ),
]

URI = "qemu:///system"
EVENT_TIMEOUT = 10.0


@dataclass
class Env:
    plan: LabPlan
    inventory: LibvirtInventory
    events: queue.Queue[DomainEvent]
    watcher: LibvirtEvents
    actions: list[VmAction]
    vm1: DomainInfo

    def wait_event(self, kind: str, uuid: str = "", timeout: float = EVENT_TIMEOUT) -> DomainEvent:
        """The next event of `kind` (for `uuid`, if given), skipping others."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event.kind == kind and (not uuid or event.uuid == uuid):
                return event
        raise AssertionError(f"no {kind} event for {uuid or 'any domain'} within {timeout} s")

    def events_until(self, kind: str, uuid: str, timeout: float = EVENT_TIMEOUT) -> list[tuple[str, str]]:
        """(kind, detail) of every event of domain `uuid` up to and with the next one of `kind`."""
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1][0] != kind:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind} event for {uuid} within {timeout} s; got {seen}") from None
            if event.uuid == uuid:
                seen.append((event.kind, event.detail))
        return seen


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", URI, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if running_libvirtd() is not None:
        pytest.skip("a libvirtd this test did not start is running (one per machine): not touching it")
    plan = plan_lab(f"lv{secrets.token_hex(3)}", 2)
    actions: list[VmAction] = []
    inventory = LibvirtInventory(URI, on_action=actions.append)
    events: queue.Queue[DomainEvent] = queue.Queue()
    watcher = LibvirtEvents(URI, on_event=events.put)
    try:
        create_lab(plan, only=0)
        lv = ensure_libvirtd(plan, qemu_as_root=True)
        assert lv.started
        prepare_qemu_dir(plan)
        watcher.start()
        spec = lab_domain_spec(plan, "vm1", memory_mib=64, labels={"tier": "web"})
        vm1 = define_lab_domain(inventory, spec)
        yield Env(plan, inventory, events, watcher, actions, vm1)
    finally:
        watcher.close()
        try:
            for info in lab_domains(inventory, plan):
                inventory.destroy(info.uuid)
                inventory.undefine(info.uuid)
        except (TemporaryError, NotFoundError):
            pass
        finally:
            inventory.close()
            stop_libvirtd(plan)
            destroy_lab(plan.name)


def test_inventory_reads_the_running_domain(env: Env) -> None:
    vm = env.plan.vm("vm1")
    info = env.inventory.domain(env.vm1.uuid)
    assert info.name == f"hf-{env.plan.name}-vm1"
    assert info.state == "running"
    assert [(n.mac, n.tap, n.bridge) for n in info.interfaces] == [(vm.mac, vm.port, "br0")]
    assert info.agent_socket is not None and info.agent_socket.endswith("/vm1.agent.sock")
    assert os.path.exists(info.agent_socket)  # QEMU listens there
    assert info.labels == {"tier": "web", "lab": env.plan.name, "vm": "vm1"}
    assert info in env.inventory.domains()
    link = run_in_host(env.plan, ["ip", "-o", "link", "show", vm.port]).stdout.decode()
    assert "master br0" in link  # the tap is a port of the lab bridge, in the lab's namespace


def test_the_inventory_gives_a_started_domain_its_rules_and_nothing_before(
    env: Env, tmp_path: pathlib.Path
) -> None:
    doc = lab_policy(env.plan)
    doc["vms"] = []  # nothing typed by hand: the VMs come from libvirt
    doc["settings"] = {"inventory": "libvirt"}
    doc["rules"] = [
        {"id": "web-ping", "from": "label:tier=web", "to": "host", "protocol": "icmp"},
        {"id": "by-vm", "from": "host", "to": "label:vm=vm1", "protocol": "icmp"},  # the lab's label: kept
    ]
    engine = Engine(netns=env.plan.host_netns, state_dir=str(tmp_path))
    try:
        engine.store_policy(doc, source="test")
        engine.converge()
        tap = env.plan.vm("vm1").port

        def ports() -> str:
            return json.dumps(
                engine.nft.list({"map": {"family": "bridge", "table": "hyperfence", "name": "out_ports"}})
            )

        assert tap not in ports()  # the domain runs, its tap is on the bridge: an unknown port, dropped
        watcher = InventoryWatcher(engine, URI)
        assert watcher.refresh()
        assert tap in ports()
        compiled = engine.current
        assert compiled is not None
        (vm,) = compiled.policy.vms
        labels = (("lab", env.plan.name), ("tier", "web"), ("vm", "vm1"))
        assert (vm.id, vm.name, vm.port, vm.labels) == (env.vm1.uuid, env.vm1.name, tap, labels)
        assert [str(a) for a in vm.ips] == [str(env.plan.vm("vm1").ip)]
        rules = compiled.ruleset.chain_rules()
        for rule in ("rule:web-ping#1", "rule:by-vm#1"):
            assert any(r.comment == rule for k, rs in rules.items() for r in rs), rule
        watcher.inventory.close()
    finally:
        engine.close()


def store_inventory_policy(plan: LabPlan, state: pathlib.Path) -> None:
    """The lab's networks, no VMs (they come from libvirt), stored in `state` for the CLI to find."""
    doc = lab_policy(plan)
    doc["vms"] = []
    doc["settings"] = {"inventory": "libvirt"}
    engine = Engine(netns=None, state_dir=str(state))
    engine.store_policy(doc, source="test")
    engine.close()


def test_enroll_takes_a_domains_uuid_and_channel_socket(env: Env, tmp_path: pathlib.Path) -> None:
    store_inventory_policy(env.plan, tmp_path)
    r = CliRunner().invoke(
        app, ["--state-dir", str(tmp_path), "vm", "enroll", env.vm1.name, "--libvirt", URI]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    config = json.loads((tmp_path / "agents" / f"{env.vm1.name}.json").read_text())
    assert config["vm"] == env.vm1.uuid and config["channel"] == {
        "type": "virtio",
        "name": "org.hyperfence.agent.0",
    }
    engine = Engine(netns=None, state_dir=str(tmp_path))
    try:
        rec = engine.store.agents()[env.vm1.uuid]
        assert rec.channel == {"type": "virtio", "path": env.vm1.agent_socket}
    finally:
        engine.close()
    r = CliRunner().invoke(
        app, ["--state-dir", str(tmp_path), "vm", "enroll", "no-such-domain", "--libvirt", URI]
    )
    assert isinstance(r.exception, NotFoundError)


def test_enroll_with_fw_cfg_puts_the_config_in_the_domains_definition(
    env: Env, tmp_path: pathlib.Path
) -> None:
    """The lab's libvirtd runs QEMU as root: the config is root's (what libvirt reports, not a guess). QEMU
    running as its own user: tests/netns/libvirt/test_fw_cfg_qemu_user.py."""
    store_inventory_policy(env.plan, tmp_path)
    info = define_lab_domain(
        env.inventory, lab_domain_spec(env.plan, "vm2", memory_mib=64, labels={"t": "x"})
    )
    try:
        argv = ["--state-dir", str(tmp_path), "vm", "enroll", info.name, "--libvirt", URI, "--fw-cfg"]
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0, (r.output, r.exception)
        # in a directory of its own beside the 0700 state directory, readable by QEMU's user only
        path = tmp_path.with_name(f"{tmp_path.name}-fw-cfg") / f"{info.name}.agent.json"
        st = path.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
        said = " ".join(r.output.split())  # rich wraps
        assert "readable by QEMU's user root (the domain's DAC seclabel) only" in said  # it runs: its label
        assert "firmware config opt/org.hyperfence/agent" in said
        defined = ET.fromstring(virsh("dumpxml", "--inactive", info.uuid))  # noqa: S314 - libvirt's
        entries = defined.findall("sysinfo[@type='fwcfg']/entry")
        assert [(e.get("name"), e.get("file")) for e in entries] == [("opt/org.hyperfence/agent", str(path))]
        assert env.inventory.domain(info.uuid).labels["t"] == "x"  # the rest of the definition is kept
        r = CliRunner().invoke(app, argv)  # again: a new key, still one entry
        assert r.exit_code == 0, (r.output, r.exception)
        defined = ET.fromstring(virsh("dumpxml", "--inactive", info.uuid))  # noqa: S314
        assert len(defined.findall("sysinfo[@type='fwcfg']/entry")) == 1
        env.inventory.destroy(info.uuid)
        assert env.inventory.start(info.uuid) is True  # QEMU reads the file when it starts
        inside = tmp_path / "agents" / "x.json"  # --out in the 0700 state directory: QEMU as root enters it
        r = CliRunner().invoke(app, [*argv, "--out", str(inside)])
        assert r.exit_code == 0, (r.output, r.exception)
        r = CliRunner().invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", info.name, "--fw-cfg"])
        assert isinstance(r.exception, InvalidInputError) and "--libvirt" in str(r.exception)
    finally:
        env.inventory.destroy(info.uuid)
        env.inventory.undefine(info.uuid)


def test_actions_act_and_events_arrive(env: Env) -> None:
    uuid = env.vm1.uuid
    env.wait_event("resync")  # the watcher connected
    t0 = time.monotonic()
    assert env.inventory.pause(uuid) is True
    event = env.wait_event("paused", uuid)
    latency = time.monotonic() - t0
    assert event.name == env.vm1.name
    assert virsh("domstate", uuid) == "paused"
    assert env.inventory.pause(uuid) is False  # already paused: no-op
    assert env.inventory.resume(uuid) is True
    assert env.wait_event("unpaused", uuid).detail == "unpaused"  # a paused domain resumed
    assert virsh("domstate", uuid) == "running"
    assert env.inventory.destroy(uuid) is True
    assert env.wait_event("stopped", uuid).detail == "destroyed"
    assert virsh("domstate", uuid) == "shut off"
    assert env.inventory.domain(uuid).interfaces[0].tap is None
    with pytest.raises(ConflictError, match="shutoff"):
        env.inventory.pause(uuid)
    assert env.inventory.destroy(uuid) is False
    assert env.inventory.start(uuid) is True
    # libvirt sends RESUMED (unpaused) just before STARTED (booted): a start is one event all the same
    assert env.events_until("started", uuid) == [("started", "booted")]
    assert [(a.action, a.outcome) for a in env.actions[-6:]] == [
        ("pause", "done"),
        ("pause", "noop"),
        ("resume", "done"),
        ("destroy", "done"),
        ("pause", "failed"),
        ("destroy", "noop"),
    ]
    print(f"pause -> paused event: {latency * 1000:.1f} ms")


def test_labels_are_domain_metadata(env: Env) -> None:
    uuid = env.vm1.uuid
    ip = str(env.plan.vm("vm1").ip)
    while not env.events.empty():
        env.events.get()
    got = env.inventory.set_labels(uuid, {"lab": env.plan.name, "vm": "vm1", "tier": "db"})
    assert got.labels["tier"] == "db" and got.ips == (ip,)  # the addresses are kept
    assert env.wait_event("metadata-changed", uuid).detail == "hyperfence"  # the daemon re-reads at once
    out = virsh("metadata", uuid, "https://hyperfence.dev/xmlns/1")
    assert 'key="tier"' in out and ">db<" in out and f"<ip>{ip}</ip>" in out
    # as docs/libvirt.md tells an operator to do it
    labels = f'<labels><label key="lab">{env.plan.name}</label><label key="vm">vm1</label><label key="tier">web</label></labels>'
    virsh(
        "metadata",
        uuid,
        "https://hyperfence.dev/xmlns/1",
        "--key",
        "hf",
        "--config",
        "--live",
        "--set",
        labels,
    )
    assert env.inventory.domain(uuid).labels == {"lab": env.plan.name, "vm": "vm1", "tier": "web"}
    assert env.inventory.domain(uuid).ips == ()  # --set replaced the whole element: the <ip> is gone
    env.inventory.set_labels(uuid, {"lab": env.plan.name, "vm": "vm1", "tier": "web"}, ips=[ip])
    assert env.inventory.domain(uuid).ips == (ip,)


def test_define_and_undefine_events(env: Env) -> None:
    spec = lab_domain_spec(env.plan, "vm2", memory_mib=64)
    info = define_lab_domain(env.inventory, spec, start=False)
    assert env.wait_event("defined", info.uuid).detail == "added"
    assert info.state == "shutoff"
    assert env.inventory.undefine(info.uuid) is True
    env.wait_event("undefined", info.uuid)
    with pytest.raises(NotFoundError, match=info.uuid):
        env.inventory.domain(info.uuid)
    assert env.inventory.undefine(info.uuid) is False


def test_errors_name_the_uri_and_what_to_do() -> None:
    missing = LibvirtInventory("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(TemporaryError, match=r"socket=/nonexistent.*Is libvirtd running\?"):
        missing.domains()


def test_watcher_reconnects_after_libvirtd_restarts(env: Env) -> None:
    uuid = env.vm1.uuid
    assert env.inventory.domain(uuid).state == "running"
    while not env.events.empty():
        env.events.get()
    killed = kill_libvirtd(env.plan)
    with pytest.raises(TemporaryError):
        env.inventory.domains()
    lv = ensure_libvirtd(env.plan, qemu_as_root=True)
    assert lv.pid != killed and lv.started
    assert env.wait_event("resync", timeout=20).detail == "reconnected"
    assert env.inventory.domain(uuid).state == "running"  # QEMU outlived libvirtd; the inventory reconnected
    assert env.inventory.pause(uuid) is True
    env.wait_event("paused", uuid)
    assert env.inventory.resume(uuid) is True
