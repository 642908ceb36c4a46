"""A new policy version that changes only rules is applied without reading the bridges' ports (what each
device on them gets cannot change: same VMs, networks and uplinks; at 10,000 VMs the read and its check
cost 3.5 ms a change), while one that changes the VMs reads them first, as always (never cut the host off
its network: docs/policy.md)."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel

PING = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}


def test_only_versions_that_change_the_declared_ports_read_them(lab: LabSession) -> None:
    engine = lab.engine
    assert engine is not None
    reads: list[Any] = []
    real = engine._read_ports

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(args)
        return real(*args, **kwargs)

    engine._read_ports = counted
    lab.apply([])
    assert len(reads) == 1  # the first version this engine applies
    lab.apply([PING])
    assert len(reads) == 1 and lab.ping("vm1", "vm2")[0] == 2  # rules only: applied without a read
    document = lab.document([PING])
    document["vms"] = document["vms"][:2]  # vm3 leaves the policy
    engine.store_policy(document, source="test")
    engine.converge()
    assert len(reads) == 2
    lab.apply([PING], full=True)
    assert len(reads) == 3  # and every full converge
