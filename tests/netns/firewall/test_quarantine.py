"""Quarantine (the agent monitor's isolation) against the real kernel: every packet of the VM is dropped,
its established flows included, other VMs are untouched, and releasing it restores its policy."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.model.overlay import Overlay, OverlayKind
from tests.netns.firewall.test_firewall import counter

pytestmark = pytest.mark.kernel

PING = {"id": "ping", "from": "vms", "to": "vms", "protocol": "icmp"}


def vm_id(lab: LabSession, name: str) -> str:
    assert lab.engine is not None and lab.engine.current is not None
    return next(v.id for v in lab.engine.current.policy.vms if v.name == name)


def quarantine(lab: LabSession, *names: str) -> None:
    assert lab.engine is not None
    lab.engine.set_overlays(  # the heartbeat producer's isolation (model/overlay.py)
        "heartbeat",
        tuple(Overlay("heartbeat", vm_id(lab, n), OverlayKind.ISOLATE, "test", time.time()) for n in names),
    )
    _, result = lab.engine.converge()
    assert result is not None


def test_quarantine_cuts_an_established_flow_and_only_that_vm(lab: LabSession) -> None:
    lab.apply([PING])
    assert lab.ping("vm1", "vm2")[0] == 2
    # a flow that is established before the quarantine: 5 pings a second for 3 s
    proc = topology.popen_in_vm(
        lab.plan, "vm1", ["ping", "-n", "-i", "0.2", "-c", "15", lab.ip("vm2")], stdout=subprocess.PIPE
    )
    time.sleep(1.0)
    quarantine(lab, "vm1")
    out, _ = proc.communicate(timeout=15)
    received = int(re.search(rb"(\d+) received", out).group(1))  # type: ignore[union-attr]
    assert 3 <= received <= 8, out  # the first second's replies, then nothing
    assert counter(lab, "egress", "sys:quarantine") >= 5
    assert lab.ping("vm2", "vm1")[0] == 0  # nothing reaches it either
    assert lab.ping("vm2", "vm3")[0] == 2  # other VMs are untouched
    quarantine(lab)  # released
    assert lab.ping("vm1", "vm2")[0] == 2
    assert lab.engine is not None
    _, again = lab.engine.converge(full=True)
    assert again is not None and not again.changed and again.drift == []  # exact readback
