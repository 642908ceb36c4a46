"""Domains -> policy VMs (pure), and libvirt's view added to `vm list`'s rows."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hyperfence.codec.libvirt_xml import DomainInfo, DomainNic, NetworkLeases
from hyperfence.errors import TemporaryError
from hyperfence.model.kernel import Flavour
from hyperfence.model.lease import Lease
from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import (
    InventoryWatcher,
    guarded,
    lost_addresses,
    started_domains,
    unprotected_nics,
    vm_docs,
)
from tests.unit.policy.test_parse import doc

BRIDGES = {"br0": "lab"}


def dom(name: str, state: str = "running", *, bridge: str = "br0", tap: str | None = "vnet1") -> DomainInfo:
    return DomainInfo(
        uuid=f"uuid-{name}",
        name=name,
        state=state,
        interfaces=(
            DomainNic("52:54:00:00:00:01", None, "virbr9"),
            DomainNic("52:54:00:00:00:02", tap, bridge),
        ),
        agent_socket=None,
        labels={"tier": "web", "lab": "x", "vm": "vm1"},
        ips=("10.77.0.21",),
    )


def test_running_domains_on_managed_bridges_become_vms() -> None:
    docs = vm_docs(
        [dom("web1"), dom("off", "shutoff"), dom("other", bridge="virbr0"), dom("notap", tap=None)], BRIDGES
    )
    assert docs == (
        {
            "name": "web1",
            "id": "uuid-web1",
            "network": "lab",
            "port": "vnet1",
            "mac": "52:54:00:00:00:02",
            "ips": ["10.77.0.21"],
            "labels": {"tier": "web", "lab": "x", "vm": "vm1"},  # every label: none is reserved
        },
    )
    merged, skipped = merge_discovered(doc(vms=[]), docs)
    assert skipped == []
    (vm,) = parse_policy(merged).vms
    assert (vm.id, vm.port, vm.labels) == (
        "uuid-web1",
        "vnet1",
        (("lab", "x"), ("tier", "web"), ("vm", "vm1")),
    )


def test_a_domain_without_addresses_learns_them_from_dhcp() -> None:
    d = dom("web1")
    bare = DomainInfo(d.uuid, d.name, d.state, d.interfaces, None, d.labels, ips=())
    (item,) = vm_docs([bare], BRIDGES)
    assert "ips" not in item
    merged, skipped = merge_discovered(doc(vms=[]), (item,))
    assert skipped == []
    (vm,) = parse_policy(merged).vms
    assert vm.learns and vm.ips == ()


def test_nics_after_the_first_on_a_managed_bridge_are_reported_unprotected() -> None:
    two = dataclasses.replace(
        dom("multi"),
        interfaces=(
            DomainNic("52:54:00:00:00:02", "vnet1", "br0"),
            DomainNic("52:54:00:00:00:03", "vnet2", "virbr0"),  # unmanaged bridge: not ours
            DomainNic("52:54:00:00:00:04", "vnet3", "br0"),
        ),
    )
    off = dataclasses.replace(two, uuid="uuid-off", name="off", state="shutoff")
    assert [d["port"] for d in vm_docs([two, off], BRIDGES)] == ["vnet1"]
    extra = unprotected_nics([two, off, dom("single")], BRIDGES)
    assert [(d.name, n.tap) for d, n in extra] == [("multi", "vnet3")]


def test_label_vm_selects_a_discovered_domain() -> None:
    """`lab` and `vm` are labels like any other: `label:vm=vm1` selects the domain labelled so."""
    document = doc(vms=[])
    document["rules"] = [{"id": "r", "from": "host", "to": "label:vm=vm1", "protocol": "icmp"}]
    merged, _ = merge_discovered(document, vm_docs([dom("web1")], BRIDGES))
    policy = parse_policy(merged)
    assert policy.vms[0].label("vm") == "vm1"
    (vm,) = resolve_policy(policy).vms
    assert [e.rule.id for e in vm.ingress] == ["r"]


def test_a_start_is_a_new_libvirt_id_and_a_reset_is_not() -> None:
    web = dataclasses.replace(dom("web1"), domain_id=3)
    off = dataclasses.replace(dom("db1", "shutoff"), domain_id=None)
    before = {web.uuid: 3, off.uuid: None}
    assert started_domains(before, [web, off]) == []  # same id: still the same run (or reset)
    again = dataclasses.replace(web, domain_id=9)  # destroyed and started between two reads
    up = dataclasses.replace(off, state="running", domain_id=10)
    new = dataclasses.replace(dom("new1"), uuid="uuid-new1", domain_id=11)  # defined and started
    assert [d.name for d in started_domains(before, [again, up, new])] == ["web1", "db1", "new1"]


def test_a_running_vm_whose_metadata_loses_its_addresses_is_reported() -> None:
    web, db = dom("web1"), dataclasses.replace(dom("db1"), uuid="uuid-db1", ips=("10.77.0.22",))
    before = guarded([web, db, dom("off", "shutoff")], BRIDGES)
    assert sorted(before) == ["uuid-db1", "uuid-web1"]
    bare = dataclasses.replace(web, ips=())
    stopped = dataclasses.replace(db, state="shutoff", ips=())  # stopped: nothing to report
    lost = lost_addresses(before, [bare, stopped], BRIDGES)
    assert [(d.name, was) for d, was in lost] == [("web1", ("10.77.0.21",))]
    assert lost_addresses(guarded([bare], BRIDGES), [bare], BRIDGES) == []  # reported once, when lost


class FakeStore:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object], str | None]] = []

    def add_event(self, kind: str, data: dict[str, object], *, vm: str | None = None) -> None:
        self.events.append((kind, data, vm))


class FakeEngine:
    """What the watcher uses of the engine; records the order of what it is told."""

    def __init__(self, told: list[str]) -> None:
        self.told = told
        self.store = FakeStore()
        self.skipped: list[str] = []
        network = SimpleNamespace(bridge="br0", name="lab")
        self.current = SimpleNamespace(policy=SimpleNamespace(networks=[network], vms=[]))
        self.discovered: tuple[dict[str, object], ...] = ()
        self.lock = threading.RLock()
        self.leases: tuple[Lease, ...] = ()
        self.clock = time.time

    def set_leases(self, leases: tuple[Lease, ...]) -> bool:
        changed, self.leases = leases != self.leases, leases
        if changed:
            self.told.append("leases")
        return changed

    def set_discovered(self, docs: tuple[dict[str, object], ...]) -> bool:
        changed, self.discovered = docs != self.discovered, docs
        if changed:
            self.told.append("vms " + ",".join(str(d["name"]) for d in docs))
        return changed

    def converge(self) -> None:
        self.told.append("converge")

    def compiled(self) -> object:
        self.told.append("compile")
        return self.current


class FakeInventory:
    def __init__(self) -> None:
        self.now: list[DomainInfo] = []

    def domains(self) -> list[DomainInfo]:
        return list(self.now)

    def network_leases(self) -> NetworkLeases:
        return NetworkLeases(())


def test_the_watcher_tells_a_start_before_the_vm_joins_the_policy_and_reports_a_lost_address() -> None:
    told: list[str] = []
    engine = FakeEngine(told)
    watcher = InventoryWatcher(engine, "test:///nowhere")  # type: ignore[arg-type]
    inventory = FakeInventory()
    watcher.inventory = inventory  # type: ignore[assignment]
    watcher.on_boot = lambda uuid: told.append(f"boot {uuid}")
    web = dataclasses.replace(dom("web1"), domain_id=3)
    off = dataclasses.replace(dom("db1", "shutoff", tap=None), uuid="uuid-db1")
    inventory.now = [web, off]
    assert watcher.refresh()
    assert told == ["vms web1", "converge"]  # the first read tells no start: the daemon's startup grace
    db = dataclasses.replace(off, state="running", interfaces=web.interfaces, domain_id=4)
    inventory.now = [web, db]
    told.clear()
    assert watcher.refresh()
    assert told == ["boot uuid-db1", "vms db1,web1", "converge"]  # before: no round sees it unbooted
    told.clear()
    watcher.refresh()
    assert told == []  # same ids: no start, nothing changed
    inventory.now = [dataclasses.replace(web, ips=()), db]
    watcher.refresh()
    ((kind, data, vm),) = engine.store.events
    assert (kind, vm, data["domain"], data["was"]) == ("address-lost", "uuid-web1", "web1", ["10.77.0.21"])
    assert "out of the firewall" in str(data["message"]) and "vm label" in str(data["message"])


def test_priming_reads_the_vms_without_converging_so_the_first_converge_has_them() -> None:
    """The daemon primes the watcher before its first converge: the policy is compiled (it names the
    bridges) and libvirt read, but nothing converges; the watcher's first read then finds nothing new."""
    told: list[str] = []
    engine = FakeEngine(told)
    watcher = InventoryWatcher(engine, "test:///nowhere")  # type: ignore[arg-type]
    inventory = FakeInventory()
    watcher.inventory = inventory  # type: ignore[assignment]
    inventory.now = [dataclasses.replace(dom("web1"), domain_id=3)]
    watcher.prime()
    assert told == ["compile", "vms web1"]
    told.clear()
    assert watcher.refresh() and told == []  # already known: no converge, no start told


def test_annotate_names_and_states_enrolled_domains(tmp_path: Path) -> None:
    """`vm list` through the daemon: a shut-off domain's row gets its name and state from libvirt (it is not
    in the policy, so the agent monitor knows it only by id), a running one its state, others none."""
    engine = Engine(netns=None, state_dir=str(tmp_path))
    watcher = InventoryWatcher(engine)  # never connects: only its last read domains are used
    watcher.domains = [dom("web1"), dom("off", "shutoff")]
    rows: list[dict[str, Any]] = [
        {"vm": "uuid-web1", "name": "web1", "status": "ok"},
        {"vm": "uuid-off", "name": "uuid-off", "status": "not in policy"},
        {"vm": "uuid-gone", "name": "uuid-gone", "status": "not in policy"},
    ]
    watcher.annotate(rows)
    assert rows == [
        {"vm": "uuid-web1", "name": "web1", "status": "ok", "state": "running"},
        {"vm": "uuid-off", "name": "off", "status": "vm not running", "state": "shutoff"},
        {"vm": "uuid-gone", "name": "uuid-gone", "status": "not in policy", "state": None},
    ]
    engine.close()


# --- the last known inventory, in the store --------------------------------------------------------------

LAB = {"name": "lab", "bridge": "br0", "subnet": "10.77.0.0/22", "gateway": "10.77.0.1"}
WEB1 = {
    "name": "web1",
    "id": "uuid-web1",
    "network": "lab",
    "port": "vnet1",
    "mac": "52:54:00:00:00:02",
    "ips": ["10.77.0.21"],
    "labels": {"tier": "web"},
}


def stored_engine(state: Path) -> Engine:
    """An engine on `state` that reads nothing from the kernel (no host address, br_netfilter)."""
    return Engine(
        netns=None, state_dir=str(state), read_addresses=lambda _ns: (), flavour=Flavour.BR_NETFILTER
    )


def test_discovered_vms_are_stored_and_every_later_engine_compiles_them(tmp_path: Path) -> None:
    """What a daemon read from libvirt is what a CLI command or a restarted daemon compiles: stored when it
    changes, loaded when an engine starts, and the same read again changes nothing (no converge)."""
    first = stored_engine(tmp_path)
    first.store_policy({"networks": [LAB], "vms": [], "settings": {"inventory": "libvirt"}}, source="t")
    assert first.set_discovered((WEB1,))
    stored = first.store.inventory()
    assert stored is not None and stored.vms == (WEB1,) and stored.read > 0
    first.close()
    again = stored_engine(tmp_path)
    try:
        compiled = again.compiled()
        assert compiled is not None and [v.name for v in compiled.policy.vms] == ["web1"]
        assert not again.set_discovered(
            vm_docs([dataclasses.replace(dom("web1"), labels={"tier": "web"})], {"br0": "lab"})
        )
        assert again.set_discovered(())  # the VM stopped: stored too
    finally:
        again.close()
    third = stored_engine(tmp_path)
    try:
        compiled = third.compiled()
        assert compiled is not None and compiled.policy.vms == ()
    finally:
        third.close()


class DownInventory:
    """libvirt that cannot be read (libvirtd down)."""

    def domains(self) -> list[DomainInfo]:
        raise TemporaryError("cannot connect to qemu:///system: libvirtd is not running")

    def network_leases(self) -> NetworkLeases:
        raise TemporaryError("cannot connect")


def test_a_restart_with_libvirt_down_keeps_the_last_known_vms(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = stored_engine(tmp_path)
    before.store_policy({"networks": [LAB], "vms": [], "settings": {"inventory": "libvirt"}}, source="t")
    before.set_discovered((WEB1,))
    before.close()
    engine = stored_engine(tmp_path)
    watcher = InventoryWatcher(engine, "test:///down")
    watcher.inventory = DownInventory()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="hyperfence.inventory"):
            watcher.prime()
            assert not watcher.refresh()
        assert "keeping the last known VMs" in caplog.text
        compiled = engine.compiled()
        assert compiled is not None and [v.name for v in compiled.policy.vms] == ["web1"]
        stored = engine.store.inventory()
        assert stored is not None and stored.vms == (WEB1,)
    finally:
        engine.close()
