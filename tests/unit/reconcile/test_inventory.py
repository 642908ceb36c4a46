"""Domains -> policy VMs (pure)."""

from __future__ import annotations

import dataclasses

from hyperfence.adapters.libvirt_xml import DomainInfo, DomainNic
from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.parse import parse_policy
from hyperfence.reconcile.inventory import unprotected_nics, vm_docs
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
