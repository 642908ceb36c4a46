"""VMs that learn their addresses from libvirt's lease list, for real: a lab-started libvirtd in the lab's
namespace runs an isolated libvirt network (its own bridge and dnsmasq, with libvirt's leaseshelper
recording the leases); a namespace "VM" on that bridge takes a lease with busybox udhcpc; the inventory
watcher (what `hyperfence daemon --libvirt` runs) reads `virNetworkGetDHCPLeases` and the learned address is
used for anti-spoofing and selectors, then released when libvirt no longer lists it.

The DHCP learner (NFLOG snooping) does not run here: only libvirt's list can teach the address. Skipped when
a libvirtd not started here is running: there is one per machine, and it would be someone else's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.lab import topology
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.session import PROBE, LabSession
from hyperfence.model.lease import LeaseSource
from hyperfence.reconcile.inventory import InventoryWatcher

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd and network namespaces need root"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox (udhcpc)"),
]

URI = "qemu:///system"
SUBNET, GATEWAY = "10.79.0.0/24", "10.79.0.1"
MAC = "02:79:00:00:00:05"
# Configures what it is given (busybox udhcpc calls it with the event and the lease in its environment).
SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
"""


@dataclass
class Env:
    lab: LabSession
    netns: str  # the "VM" on libvirt's network
    network: str  # libvirt's network
    bridge: str
    inventory: LibvirtInventory

    def run(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], capture_output=True, timeout=timeout, check=False
        )

    def tcp_from_vm(self, port: int) -> str:
        r = self.run([*PROBE, "tcp", GATEWAY, str(port), "1.5"])
        return r.stdout.decode().split(" ")[0].strip() or "ERR"

    def tcp_to_vm(self, ip: str, port: int) -> str:
        r = self.lab.run("host", [*PROBE, "tcp", ip, str(port), "1.5"])
        return r.stdout.decode().split(" ")[0].strip() or "ERR"


def network_xml(name: str, bridge: str) -> str:
    """An isolated libvirt network (no <forward>): a bridge, an address, DHCP from libvirt's dnsmasq."""
    return (
        f"<network><name>{name}</name><bridge name='{bridge}'/>"
        f"<ip address='{GATEWAY}' netmask='255.255.255.0'>"
        "<dhcp><range start='10.79.0.100' end='10.79.0.150'/></dhcp></ip></network>"
    )


def document(env: Env) -> dict[str, Any]:
    data = env.lab.document(
        [
            {"id": "lease", "from": "vm:vmx", "to": "host", "services": ["dhcp"]},
            {"id": "up", "from": "vm:vmx", "to": "host", "services": ["tcp/8080"]},
            {"id": "down", "from": "host", "to": "vm:vmx", "services": ["tcp/9090"]},
        ]
    )
    for vm in data["vms"]:
        vm["network"] = "lab"
    data["networks"].append({"name": "lv", "bridge": env.bridge, "subnet": SUBNET, "gateway": GATEWAY})
    data["vms"].append(
        {"name": "vmx", "id": "vmx", "network": "lv", "port": f"{env.lab.plan.name}x", "mac": MAC}
    )
    return data


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    if running_libvirtd() is not None:
        pytest.skip("a libvirtd this test did not start is running (one per machine): not touching it")
    name = "ls" + secrets.token_hex(2)
    netns, bridge, port = f"hf-{name}-lvx", f"{name}lv", f"{name}x"
    with LabSession(name, 2, state_dir=os.path.join(str(tmp_path), "state")) as lab:
        inventory = LibvirtInventory(URI)
        net = None
        try:
            ensure_libvirtd(lab.plan, qemu_as_root=True)
            net = inventory._call(
                "create network", lambda conn: conn.networkCreateXML(network_xml(name, bridge))
            )
            host = lab.plan.host_netns
            subprocess.run(["ip", "netns", "add", netns], check=True)
            subprocess.run(
                [
                    "ip",
                    "-n",
                    host,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    netns,
                ],
                check=True,
            )
            subprocess.run(["ip", "-n", host, "link", "set", port, "master", bridge, "up"], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "address", MAC, "up"], check=True)
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            yield Env(lab, netns, name, bridge, inventory)
        finally:
            if net is not None:
                try:
                    net.destroy()  # libvirt stops its dnsmasq and removes the bridge
                except Exception as e:
                    print(f"network {name} not destroyed: {e}")
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
            inventory.close()
            stop_libvirtd(lab.plan)
            Path(f"/run/libvirt/network/{name}.pid").unlink(missing_ok=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


def start_in(netns: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """`argv` in `netns`, in a session of its own (`topology.stop_process` ends that session)."""
    return subprocess.Popen(["ip", "netns", "exec", netns, *argv], start_new_session=True, **kw)


@contextlib.contextmanager
def watching(lab: LabSession) -> Iterator[InventoryWatcher]:
    """The inventory watcher, as the daemon runs it with --libvirt (a read every second here)."""
    assert lab.engine is not None
    watcher = InventoryWatcher(lab.engine, URI, resync=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield watcher
    finally:
        stop.set()
        thread.join(timeout=10)


def leased(env: Env) -> str | None:
    """The address udhcpc configured on the VM's eth0 (None: none yet)."""
    got = env.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.decode().split()
    return got[got.index("inet") + 1].split("/")[0] if "inet" in got else None


def use_address(env: Env, ip: str) -> None:
    env.run(["ip", "addr", "flush", "dev", "eth0"])
    env.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])


def test_a_vm_learns_its_address_from_libvirts_lease_list_and_loses_it_when_libvirt_drops_it(
    env: Env, tmp_path: Path
) -> None:
    lab = env.lab
    assert lab.engine is not None
    lab.engine.store_policy(document(env), source="test")
    lab.engine.converge(full=True)
    lab.serve("host", tcp=[8080])
    server = start_in(env.netns, [*PROBE, "serve", "9090", ""], stdout=subprocess.PIPE)
    script = tmp_path / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    udhcpc = ["busybox", "udhcpc", "-f", "-R", "-i", "eth0", "-t", "8", "-T", "3", "-s", str(script)]
    try:
        assert server.stdout is not None and server.stdout.readline().startswith(b"ready")
        with watching(lab):
            # No lease yet: the address it will get passes nothing
            use_address(env, "10.79.0.120")
            assert env.tcp_from_vm(8080) != "OK"
            env.run(["ip", "addr", "flush", "dev", "eth0"])
            client = start_in(env.netns, udhcpc, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for("udhcpc got a lease from libvirt's dnsmasq", lambda: leased(env) is not None, 40)
                ip = leased(env)
                assert ip is not None
                listed = env.inventory.network_leases().leases
                assert [(le.mac, str(le.ip)) for le in listed if le.network == env.network] == [(MAC, ip)]
                wait_for("the watcher learned it", lambda: [str(le.ip) for le in lab.engine.leases] == [ip])  # type: ignore[union-attr]
                (lease,) = lab.engine.leases
                assert (lease.source, lease.vm, lease.mac) == (LeaseSource.LIBVIRT, "vmx", MAC)
                assert lab.engine.store.events(vm="vmx")[-1]["kind"] == "lease-learned"
                # what the policy allows, from the learned address, both ways (vm:vmx on either side)
                assert env.tcp_from_vm(8080) == "OK"
                assert env.tcp_to_vm(ip, 9090) == "OK"
                # anti-spoofing: from any other address, nothing
                use_address(env, str(IPv4Address(ip) + 1))
                assert env.tcp_from_vm(8080) != "OK"
                use_address(env, ip)
                assert env.tcp_from_vm(8080) == "OK"
            finally:
                topology.stop_process(client)  # udhcpc -R releases the lease: libvirt stops listing it
            wait_for("the address is released", lambda: not lab.engine.leases)  # type: ignore[union-attr]
            event = lab.engine.store.events(vm="vmx")[-1]
            assert (event["kind"], event["reason"]) == ("lease-released", "libvirt no longer lists it")
            use_address(env, ip)  # the guest keeps using it anyway
            assert env.tcp_from_vm(8080) != "OK"
            assert env.tcp_to_vm(ip, 9090) != "OK"
    finally:
        topology.stop_process(server)
