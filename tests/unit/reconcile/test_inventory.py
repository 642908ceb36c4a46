"""Domains -> policy VMs (pure), and libvirt's view added to `vm list`'s rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hyperfence.adapters.libvirt_xml import DomainInfo, DomainNic
from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.parse import parse_policy
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import InventoryWatcher, unprotected_nics, vm_docs
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
            "labels": {"tier": "web"},
        },
    )
    merged, skipped = merge_discovered(doc(vms=[]), docs)
    assert skipped == []
    (vm,) = parse_policy(merged).vms
    assert (vm.id, vm.port, vm.labels) == ("uuid-web1", "vnet1", (("tier", "web"),))


def test_a_domain_without_addresses_is_left_out_with_a_reason() -> None:
    d = dom("web1")
    bare = DomainInfo(d.uuid, d.name, d.state, d.interfaces, None, d.labels, ips=())
    merged, skipped = merge_discovered(doc(vms=[]), vm_docs([bare], BRIDGES))
    assert merged["vms"] == [] and "ips" in skipped[0]


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
