"""VMs that take their address from DHCP (no `ips` in the policy), against the real kernel: the lab's
dnsmasq, a real client (busybox udhcpc) that configures the address it is given, the lease learner reading
the learn group, and real packets for what the learned address may and may not do."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.model.policy import AddressRange
from hyperfence.policy.resolve import contains
from hyperfence.reconcile.leases import LeaseLearner

pytestmark = pytest.mark.kernel

RULES: list[dict[str, Any]] = [
    {"id": "lease", "from": "vm:vm1", "to": "host", "services": ["dhcp"]},
    {"id": "to-vm2", "from": "vm:vm1", "to": "vm:vm2", "services": ["icmp", "tcp/8080"]},
    {"id": "from-vm2", "from": "vm:vm2", "to": "vm:vm1", "protocol": "icmp"},
    # vm3 takes pings from anyone: only anti-spoofing stands between vm1's other addresses and vm3
    {"id": "to-vm3", "from": "vm:vm1", "to": "vm:vm3", "protocol": "icmp"},
    {"id": "open-vm3", "from": "any", "to": "vm:vm3", "protocol": "icmp"},
]
# Configures what it is given (busybox udhcpc calls it with the event and the lease in its environment).
SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
"""


def learning_document(
    lab: LabSession, rules: list[dict[str, Any]], *, with_vm1: bool = True
) -> dict[str, Any]:
    data = lab.document(rules)
    data["vms"] = [
        {k: v for k, v in vm.items() if k != "ips"} if vm["name"] == "vm1" else vm
        for vm in data["vms"]
        if with_vm1 or vm["name"] != "vm1"
    ]
    return data


@pytest.fixture
def lab(lab: LabSession) -> LabSession:
    """The shared lab (tests/netns/conftest.py), set up for this module."""
    assert lab.engine is not None
    lab.engine.store_policy(learning_document(lab, RULES), source="test")
    lab.engine.converge(full=True)
    return lab


@pytest.fixture
def learner(lab: LabSession) -> Iterator[LeaseLearner]:
    assert lab.engine is not None
    stop = threading.Event()
    learn = LeaseLearner(lab.engine)
    thread = threading.Thread(target=learn.run, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.3)  # bound to the learn group
    try:
        yield learn
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def dhcp_client(lab: LabSession, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """udhcpc in vm1, in the foreground, releasing its lease when it is stopped (-R)."""
    script = tmp_path / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    argv = ["busybox", "udhcpc", "-f", "-R", "-i", "eth0", "-t", "5", "-T", "1", "-s", str(script)]
    p = topology.popen_in_vm(lab.plan, "vm1", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield p
    finally:
        topology.stop_process(p)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def learned(lab: LabSession) -> set[IPv4Address]:
    assert lab.engine is not None
    return {le.ip for le in lab.engine.leases}


def addresses(lab: LabSession, vm: str) -> str:
    return lab.run(vm, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.decode()


def ping_from(lab: LabSession, src_ip: str, dst: str) -> int:
    """Replies to 2 pings from vm1, sent from `src_ip` (one of its addresses)."""
    r = lab.run(
        "vm1", ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-I", src_ip, lab.ip(dst)], timeout=15
    )
    text = r.stdout.decode()
    return int(text.split(" received")[0].rsplit(" ", 1)[-1]) if " received" in text else 0


def test_a_vm_without_declared_addresses_uses_the_one_its_lease_gives_and_no_other(
    lab: LabSession, learner: LeaseLearner, tmp_path: Path
) -> None:
    vm1 = str(lab.plan.vm("vm1").ip)  # what the lab's dnsmasq leases to vm1's MAC (the policy does not say)
    lab.run("vm1", ["ip", "addr", "flush", "dev", "eth0"])
    assert lab.engine is not None
    # No lease yet: even the address it will get passes nothing (only its DHCP exchange would)
    lab.run("vm1", ["ip", "addr", "add", f"{vm1}/22", "dev", "eth0"])
    assert ping_from(lab, vm1, "vm2") == 0
    lab.run("vm1", ["ip", "addr", "flush", "dev", "eth0"])

    lab.serve("vm2", tcp=[8080])
    with dhcp_client(lab, tmp_path) as client:
        wait_for("the lease is learned", lambda: learned(lab) == {IPv4Address(vm1)})
        wait_for("udhcpc configured it", lambda: vm1 in addresses(lab, "vm1"))
        events = lab.engine.store.events(vm=f"{lab.plan.name}-vm1")
        assert [e["kind"] for e in events] == ["lease-learned"], events
        assert events[0]["ip"] == vm1 and events[0]["server"] == str(lab.plan.gateway)
        # A renewal: unicast to the server, whose answer belongs to a known flow (the established shortcut
        # would accept it unseen): learned too, the lease runs from now
        first = lab.engine.leases[0]
        client.send_signal(signal.SIGUSR1)
        wait_for(
            "the renewal is learned",
            lambda: lab.engine is not None and lab.engine.leases[0].learned > first.learned,
        )
        renewal = lab.engine.store.events(vm=f"{lab.plan.name}-vm1")[-1]
        assert renewal["kind"] == "lease-learned" and renewal["renewed"] is True
        # what the policy allows, from the learned address: both ways, by `vm:vm1` on either side
        assert lab.tcp("vm1", "vm2", 8080) == "OK"
        assert ping_from(lab, vm1, "vm2") == 2
        assert lab.ping("vm2", vm1)[0] == 2
        assert ping_from(lab, vm1, "vm3") == 2
        assert lab.tcp("vm1", "vm2", 9090) != "OK" and ping_from(lab, vm1, "host") == 0  # and nothing else
        # anti-spoofing: the same VM from any other address gets nothing
        lab.run("vm1", ["ip", "addr", "add", "10.77.0.50/22", "dev", "eth0"])
        # (vm3 knows the MAC of that address already: no ARP, which vm1's own rules would refuse, is needed
        # for its answer, so only the guard can stop it)
        mac = lab.plan.vm("vm1").mac
        lab.run(
            "vm3", ["ip", "neigh", "replace", "10.77.0.50", "lladdr", mac, "dev", "eth0", "nud", "permanent"]
        )
        assert ping_from(lab, "10.77.0.50", "vm3") == 0
        assert ping_from(lab, "10.77.0.50", "vm2") == 0
        lab.run("vm1", ["ip", "addr", "del", "10.77.0.50/22", "dev", "eth0"])
        assert ping_from(lab, vm1, "vm3") == 2
    # udhcpc -R sent a DHCPRELEASE when it stopped: the address is released
    wait_for("the release is learned", lambda: learned(lab) == set())
    assert lab.engine.store.leases() == ()
    kinds = [e["kind"] for e in lab.engine.store.events(vm=f"{lab.plan.name}-vm1")]
    assert kinds[-1] == "lease-released"
    lab.run("vm1", ["ip", "addr", "add", f"{vm1}/22", "dev", "eth0"])  # the guest keeps using it anyway
    assert ping_from(lab, vm1, "vm2") == 0
    assert lab.ping("vm2", vm1)[0] == 0


def test_a_removed_vm_loses_its_learned_address(
    lab: LabSession, learner: LeaseLearner, tmp_path: Path
) -> None:
    assert lab.engine is not None
    vm1 = IPv4Address(str(lab.plan.vm("vm1").ip))
    lab.run("vm1", ["ip", "addr", "flush", "dev", "eth0"])
    with dhcp_client(lab, tmp_path):
        wait_for("the lease is learned", lambda: learned(lab) == {vm1})
        # vm2 may reach `vms`: the learned address is in that set while vm1 is there
        to_all = {"id": "all", "from": "vm:vm2", "to": "vms", "protocol": "tcp"}
        lab.engine.store_policy(learning_document(lab, [*RULES, to_all]), source="test")
        lab.engine.converge()
        assert vm1 in peers_of_vm2(lab)
        lab.engine.store_policy(learning_document(lab, [to_all], with_vm1=False), source="test")
        lab.engine.converge()
        wait_for("the removed VM's lease is dropped", lambda: learned(lab) == set())
        assert lab.engine.store.leases() == ()
        events = lab.engine.store.events(vm=f"{lab.plan.name}-vm1")
        assert events[-1]["kind"] == "lease-released" and events[-1]["reason"] == "the VM was removed"
        assert vm1 not in peers_of_vm2(lab)


def test_an_expired_lease_is_released_and_its_address_passes_nothing(
    lab: LabSession, learner: LeaseLearner, tmp_path: Path
) -> None:
    """A client that dies without a DHCPRELEASE keeps its address configured; when the lease ends (the
    learner's clock is moved past it and its grace: dnsmasq's shortest lease is 2 minutes), the address is
    released and the guest's packets from it get nothing."""
    assert lab.engine is not None
    vm1 = str(lab.plan.vm("vm1").ip)
    lab.run("vm1", ["ip", "addr", "flush", "dev", "eth0"])
    with dhcp_client(lab, tmp_path) as client:
        wait_for("the lease is learned", lambda: learned(lab) == {IPv4Address(vm1)})
        wait_for("udhcpc configured it", lambda: vm1 in addresses(lab, "vm1"))
        assert ping_from(lab, vm1, "vm2") == 2
        client.kill()  # no release: the guest keeps the address past its lease
        client.wait()
        (lease,) = lab.engine.leases
        shift = lease.expires - time.time() + 3600
        learner.clock = lambda: time.time() + shift
        wait_for("the lease expires", lambda: learned(lab) == set())
    assert lab.engine.store.leases() == ()
    events = lab.engine.store.events(vm=f"{lab.plan.name}-vm1")
    assert events[-1]["kind"] == "lease-expired" and events[-1]["ip"] == vm1, events
    assert vm1 in addresses(lab, "vm1")
    assert ping_from(lab, vm1, "vm2") == 0


def peers_of_vm2(lab: LabSession) -> PeerRanges:
    """The addresses `vms` stands for in vm2's egress rule `all`."""
    assert lab.engine is not None
    compiled = lab.engine.compiled()
    assert compiled is not None
    (vm2,) = [vp for vp in compiled.resolved.vms if vp.vm.name == "vm2"]
    return PeerRanges(tuple(r for e in vm2.egress if e.rule.id == "all" for r in e.peers))


class PeerRanges(tuple[AddressRange, ...]):
    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, IPv4Address) and contains(tuple(self), addr)
