"""The chaddr guard against the real kernel: a DHCP request a VM sends must name the VM's own MAC as the
client (BOOTP chaddr), or it is dropped in the VM's `<vm>_dhcp` chain, counted and logged; the lab's dnsmasq
(a `static` range: it answers each planned MAC with that VM's address) then never sees it. Both ways a
request leaves a VM: from 0.0.0.0 (a DISCOVER, `sys:dhcp-discover`) and from its own address (a renewal,
`sys:ident-ip`). The guard's chains are the same in both flavours (tests/unit/ruleset/test_compile.py); the
DISCOVER case also runs on Debian's kernel under bridge_native (tests/guest/test_debian_kernel.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from hyperfence.adapters.nflog import NflogReader
from hyperfence.codec.nflog import NflogPacket
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.build import TABLES, log_prefix, vm_sid
from hyperfence.ruleset.readback import rule_counters

pytestmark = pytest.mark.kernel

ASK = [sys.executable, str(Path(__file__).with_name("dhcp_ask.py"))]
RULES = [{"id": "lease", "from": "vm:vm1", "to": "host", "services": ["dhcp"]}]


@pytest.fixture
def lab_vms() -> int:
    return 2


@pytest.fixture
def lab(lab: LabSession) -> LabSession:
    """The shared lab (tests/netns/conftest.py), set up for this module."""
    assert lab.engine is not None
    lab.engine.store_policy(lab.document(RULES), source="test")
    lab.engine.converge(full=True)
    return lab


def ask(lab: LabSession, chaddr: str) -> str:
    """The address the lab's dnsmasq offers to a DISCOVER from vm1 naming `chaddr` (NONE: no offer)."""
    r = lab.run("vm1", [*ASK, "eth0", chaddr, "3"], timeout=20)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


def dropped(lab: LabSession) -> int:
    """Packets counted by vm1's `sys:dhcp-chaddr` drop."""
    assert lab.engine is not None
    objs = []
    for t in TABLES:
        objs.extend(lab.engine.nft.list({"table": {"family": t.family, "name": t.name}}))
    return sum(
        p
        for (_, chain, c), (p, _) in rule_counters(objs).items()
        if chain.endswith("_dhcp") and c == "sys:dhcp-chaddr"
    )


def read_for(reader: NflogReader, seconds: float) -> list[NflogPacket]:
    out: list[NflogPacket] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        out.extend(reader.read(left))
    return out


@pytest.mark.parametrize("source", ["0.0.0.0", "own address"])
def test_a_dhcp_request_naming_another_mac_gets_no_offer_and_is_logged(lab: LabSession, source: str) -> None:
    assert lab.engine is not None and lab.engine.current is not None
    own, other = lab.plan.vm("vm1").mac, lab.plan.vm("vm2").mac
    if source == "0.0.0.0":
        lab.run("vm1", ["ip", "addr", "flush", "dev", "eth0"])
    settings = lab.engine.current.policy.settings
    vm1 = next(v.id for v in lab.engine.current.policy.vms if v.name == "vm1")
    prefix = log_prefix(vm_sid(vm1), "out", "spoof", "sys:dhcp-chaddr")

    assert ask(lab, own) == str(lab.plan.vm("vm1").ip)  # its own MAC: offered its address
    assert dropped(lab) == 0
    with NflogReader(settings.nflog_group, netns=lab.plan.host_netns) as reader:
        # another VM's MAC: dnsmasq would offer vm2's address (static range); the guard drops it first
        assert ask(lab, other) == "NONE"
        logged = [p for p in read_for(reader, 1.0) if p.prefix == prefix]
    assert dropped(lab) >= 1
    assert logged, f"no NFLOG record with prefix {prefix}"
    assert ask(lab, own) == str(lab.plan.vm("vm1").ip)  # and the VM's own requests still pass
