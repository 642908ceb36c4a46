"""The lease learner: frames in, learned addresses stored, converged, expired and released (fake clock)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from hyperfence.codec.libvirt_xml import NetworkLeases
from hyperfence.codec.nflog import NflogPacket
from hyperfence.errors import TemporaryError
from hyperfence.model.lease import LeaseSource, NetworkLease
from hyperfence.policy.leases import GRACE_SECONDS
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.leases import LeaseLearner, LibvirtLeases
from hyperfence.ruleset.compile import vm_sid
from tests.unit.adapters.dhcp_frames import VM_MAC, ack, bootp, dhcp_options, ip_udp
from tests.unit.policy.test_parse import BASE

IP = IPv4Address("10.77.0.13")
LEARNER = {"name": "vm3", "port": "vp3", "mac": VM_MAC}
DOC: dict[str, Any] = {
    **BASE,
    "vms": [*BASE["vms"], LEARNER],
    "rules": [
        {"id": "lease", "from": "vm:vm3", "to": "host", "services": ["dhcp"]},
        {"id": "web", "from": "vm:vm1", "to": "vm:vm3", "protocol": "tcp", "ports": [80]},
    ],
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def packet(frame: bytes, *, direction: str = "in", vm: str = "vm3") -> NflogPacket:
    return NflogPacket(
        prefix=f"hf:{vm_sid(vm)}:{direction}:learn:rule:lease#1:pair",
        family=7,
        group=8,
        hook=4,
        hw_protocol=0x0800,
        payload=frame,
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Engine, LeaseLearner, Clock, list[set[IPv4Address]]]:
    clock = Clock()
    engine = Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _: (), clock=clock)
    engine.store_policy(DOC, source="test")
    converges: list[int] = []
    engine.converge = lambda **_: (converges.append(1), engine.compiled(), None)[1:]  # type: ignore[method-assign,assignment,return-value]
    engine.compiled()
    cut: list[set[IPv4Address]] = []
    learner = LeaseLearner(engine, cut_flows=lambda ips: cut.append(set(ips)) or 0)  # type: ignore[func-returns-value]
    learner.tick()
    return engine, learner, clock, cut


def vm3_ips(engine: Engine) -> tuple[IPv4Address, ...]:
    compiled = engine.compiled()
    assert compiled is not None
    vm = compiled.policy.vm_by_name("vm3")
    assert vm is not None
    return vm.ips


def kinds(engine: Engine) -> list[str]:
    return [e["kind"] for e in engine.store.events(vm="vm3")]


def test_an_ack_teaches_the_address_which_every_selector_then_uses(setup: Any) -> None:
    engine, learner, _, _ = setup
    assert vm3_ips(engine) == ()
    assert learner.handle([packet(ack())])
    assert vm3_ips(engine) == (IP,)
    assert engine.store.leases()[0].ip == IP  # stored
    compiled = engine.compiled()
    ident = next(s for s in compiled.ruleset.sets if s.name == "ident_ip")
    assert any("vp3" in e and "10.77.0.13" in e for e in ident.elements)  # anti-spoofing knows it
    vm1_out = next(e for e in next(vp for vp in compiled.resolved.vms if vp.vm.name == "vm1").egress)
    assert IP in {r.first for r in vm1_out.peers}  # `vm:vm3` on vm1's side means the learned address
    assert kinds(engine) == ["lease-learned"]


def test_the_address_is_released_after_the_lease_and_its_grace(setup: Any) -> None:
    engine, learner, clock, cut = setup
    learner.handle([packet(ack())])  # 3600 s
    clock.now += 3600 + GRACE_SECONDS
    assert not learner.tick()
    assert vm3_ips(engine) == (IP,)
    clock.now += 1
    assert learner.tick()
    assert vm3_ips(engine) == () and engine.store.leases() == ()
    assert kinds(engine)[-1] == "lease-expired" and cut == [{IP}]


def test_a_renewal_extends_the_lease(setup: Any) -> None:
    engine, learner, clock, _ = setup
    learner.handle([packet(ack())])
    clock.now += 1800
    learner.handle([packet(ack())])
    clock.now += 3600
    learner.tick()
    assert vm3_ips(engine) == (IP,)
    assert engine.store.events(vm="vm3")[-1]["renewed"] is True


def test_a_release_from_the_vm_and_a_nak_to_it_give_the_address_back(setup: Any) -> None:
    engine, learner, _, cut = setup
    release = ip_udp(
        bootp(op=1, ciaddr=str(IP), options=dhcp_options(7, lease=None)), src=str(IP), sport=68, dport=67
    )
    learner.handle([packet(ack())])
    assert learner.handle([packet(release, direction="out")])
    assert vm3_ips(engine) == () and cut == [{IP}]
    learner.handle([packet(ack())])
    assert learner.handle([packet(ack(options=dhcp_options(6, lease=None)))])
    assert vm3_ips(engine) == ()
    assert kinds(engine) == ["lease-learned", "lease-released", "lease-learned", "lease-released"]


def test_hostile_frames_teach_nothing(setup: Any) -> None:
    engine, learner, _, _ = setup
    frames = [
        ack(chaddr="02:77:00:00:00:0b"),  # for another VM's MAC
        ack(yiaddr="10.77.0.11"),  # vm1's declared address
        ack(yiaddr="192.0.2.1"),  # outside the network
        ack()[:200],  # truncated
        ack(options=b"\x35\xff\x05"),  # a huge option length
    ]
    assert not learner.handle([packet(f) for f in frames])
    assert not learner.handle([packet(ack(), vm="vm1")])  # a VM that declares its addresses learns nothing
    assert vm3_ips(engine) == ()
    assert learner.malformed == 2
    assert kinds(engine) == ["lease-ignored", "lease-ignored"]  # vm1's address, outside: recorded


def test_leases_survive_a_restart_until_they_end(setup: Any, tmp_path: Path) -> None:
    _engine, learner, clock, _ = setup
    learner.handle([packet(ack())])
    again = Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _: (), clock=clock)
    assert again.compiled() is not None and vm3_ips(again) == (IP,)
    clock.now += 4000
    later = Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _: (), clock=clock)
    assert vm3_ips(later) == ()  # ended while no daemon ran: not applied


def test_a_removed_vm_loses_its_learned_address(setup: Any) -> None:
    engine, learner, _, cut = setup
    learner.handle([packet(ack())])
    engine.store_policy({**DOC, "vms": BASE["vms"], "rules": []}, source="test")
    engine.compiled()
    assert learner.tick()
    assert engine.store.leases() == () and cut == [{IP}]
    assert engine.store.events(vm="vm3")[-1]["reason"] == "the VM was removed"


def test_a_vm_that_now_declares_its_address_keeps_only_the_declared_one(setup: Any) -> None:
    engine, learner, _, _ = setup
    learner.handle([packet(ack())])
    declared = {**DOC, "vms": [*BASE["vms"], {**LEARNER, "ips": ["10.77.0.20"]}]}
    engine.store_policy(declared, source="test")
    assert vm3_ips(engine) == (IPv4Address("10.77.0.20"),)
    learner.tick()
    assert engine.store.leases() == ()


class Lists:
    """libvirt's lease lists as a test sets them (or libvirtd away: `error`)."""

    def __init__(self) -> None:
        self.now: NetworkLeases = NetworkLeases(())
        self.error: Exception | None = None

    def __call__(self) -> NetworkLeases:
        if self.error is not None:
            raise self.error
        return self.now


def test_libvirts_lease_list_teaches_stores_records_and_releases(setup: Any) -> None:
    engine, learner, clock, cut = setup
    lists = Lists()
    sync = LibvirtLeases(engine, lists, cut_flows=lambda ips: cut.append(set(ips)) or 0)  # type: ignore[func-returns-value]
    lists.now = NetworkLeases(
        (NetworkLease("default", "br0", VM_MAC, IP, clock.now + 600),), refused=("network default: mac 'x'",)
    )
    assert sync.sync() and vm3_ips(engine) == (IP,)
    assert sync.refused == 1
    (stored,) = engine.store.leases()
    assert stored.source is LeaseSource.LIBVIRT and stored.ip == IP
    event = engine.store.events(vm="vm3")[-1]
    assert (event["kind"], event["source"], event["renewed"]) == ("lease-learned", "libvirt", False)
    assert not sync.sync()  # the same list again: nothing changes
    # libvirtd away: the learned addresses stay
    lists.error = TemporaryError("libvirtd does not answer")
    assert not sync.sync() and vm3_ips(engine) == (IP,)
    lists.error = None
    # no longer listed: released, its connections cut
    lists.now = NetworkLeases(())
    assert sync.sync() and vm3_ips(engine) == ()
    assert engine.store.leases() == () and cut[-1] == {IP}
    event = engine.store.events(vm="vm3")[-1]
    assert (event["kind"], event["reason"]) == ("lease-released", "libvirt no longer lists it")
    # and a libvirt lease that ends is expired by the learner's clock like a snooped one
    lists.now = NetworkLeases((NetworkLease("default", "br0", VM_MAC, IP, clock.now + 10),))
    assert sync.sync() and vm3_ips(engine) == (IP,)
    clock.now += 10 + GRACE_SECONDS + 1
    assert learner.tick() and vm3_ips(engine) == ()


def test_an_ignored_libvirt_lease_is_reported_once(setup: Any) -> None:
    engine, _, clock, _ = setup
    lists = Lists()
    sync = LibvirtLeases(engine, lists, cut_flows=lambda _: 0)
    lists.now = NetworkLeases((NetworkLease("other", "virbr7", VM_MAC, IP, clock.now + 600),))
    assert not sync.sync() and not sync.sync()
    ignored = [e for e in engine.store.events(vm="vm3") if e["kind"] == "lease-ignored"]
    assert len(ignored) == 1 and "virbr7" in ignored[0]["reason"]
