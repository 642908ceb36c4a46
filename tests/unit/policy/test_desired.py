"""The desired policy: the document, the discovered VMs and the learned addresses, merged as every use case
sees them (`policy/desired.py`)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.lease import Lease
from hyperfence.policy.desired import desired_policy
from tests.unit.policy.test_parse import doc

WEB3 = {"name": "web3", "id": "uuid-3", "port": "vnet3", "mac": "52:54:00:00:00:03", "network": "lab"}
LEASE = Lease("uuid-3", "52:54:00:00:00:03", IPv4Address("10.77.0.13"), 3700.0, 100.0, None)


def test_discovered_vms_join_and_learn_their_addresses_from_leases() -> None:
    rules = [{"from": "vm:vm1", "to": "vm:web3", "protocol": "icmp"}]
    got = desired_policy(
        doc(settings={"inventory": "libvirt"}, rules=rules), source="t", discovered=(WEB3,), leases=(LEASE,)
    )
    assert [v.name for v in got.policy.vms] == ["vm1", "vm2", "web3"]
    assert next(v for v in got.policy.vms if v.name == "web3").ips == (IPv4Address("10.77.0.13"),)
    assert (got.skipped, got.ignored_leases) == ((), ())


def test_without_discovered_vms_the_document_alone_and_a_clash_is_said() -> None:
    assert [v.name for v in desired_policy(doc(), source="t", discovered=(), leases=()).policy.vms] == [
        "vm1",
        "vm2",
    ]
    clash = desired_policy(doc(), source="t", discovered=({**WEB3, "name": "vm1"},), leases=())
    assert [v.name for v in clash.policy.vms] == ["vm1", "vm2"]
    assert len(clash.skipped) == 1 and "'vm1': its name is already declared" in clash.skipped[0]
    ignored = desired_policy(doc(), source="t", discovered=(), leases=(LEASE,))
    assert [le for le, _ in ignored.ignored_leases] == [LEASE]  # no such VM: said why


def test_an_invalid_document_is_refused_whatever_was_discovered() -> None:
    with pytest.raises(InvalidInputError):
        desired_policy({"networks": "x"}, source="t", discovered=(WEB3,), leases=())
