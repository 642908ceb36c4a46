"""Never cut the host off its network, against the real kernel: a network device on the lab's bridge that
the policy does not declare as an uplink refuses `policy apply` and `policy check` (the real CLI), changing
nothing; declared, it passes traffic as an uplink does (docs/policy.md); and one that joins the bridge while
the daemon runs is reported (event, daemon log, `hyperfence status`) and gets nothing until declared; a
daemon whose policy would cut off a device the kernel lets through passes it as a provisional uplink.

The stand-in for a physical NIC is a VXLAN device (this kernel builds neither `dummy` nor `bond` nor `vlan`):
a real uplink kind, whose far end (a "far host" namespace, 10.77.0.200 on the lab's subnet) is reached over
an underlay veth. Real namespaces, real packets, real nftables."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hyperfence.daemon import request as daemon_request
from hyperfence.lab import topology
from hyperfence.lab.session import PROBE, LabSession

pytestmark = pytest.mark.kernel

HF = [sys.executable, "-m", "hyperfence"]
FAR_IP = "10.77.0.200"
DEVICE = "vx0"
ALLOWED, OTHER = 7000, 7001
FAR_TO_VM2 = {"id": "far", "from": FAR_IP, "to": "vm:vm2", "services": [f"udp/{ALLOWED}"]}


@dataclass
class Far:
    netns: str

    def udp(self, dst: str, port: int) -> str:
        """A datagram from the far host to `dst:port` and the answer: OK, TIMEOUT, ..."""
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, *PROBE, "udp", dst, str(port), "1.5"],
            capture_output=True,
            check=False,
            timeout=30,
        )
        return r.stdout.decode().split(" ")[0].strip() or "ERR " + r.stderr.decode()

    def forget_neighbours(self) -> None:
        """Drop the far host's ARP entries. One left from while its port got nothing may still be resolving
        (incomplete, its last retry pending) and would drop the next datagram it queues when it fails a
        moment later: the far host's own ARP, not the firewall (seen 1 in 5 runs without this)."""
        subprocess.run(["ip", "-n", self.netns, "neigh", "flush", "dev", "vx1"], check=True)


def vxlan(local: str, remote: str, dev: str) -> list[str]:
    return ["type", "vxlan", "id", "42", "dstport", "4789", "local", local, "remote", remote, "dev", dev]


@contextlib.contextmanager
def far_host(lab: LabSession) -> Iterator[Far]:
    """A host on the physical network behind `vx0`, which is created but not yet on the bridge: a namespace
    (named like a lab VM so that destroying the lab removes it even after a crash) joined to the lab's host
    namespace by an underlay veth (192.0.2.0/30), with VXLAN 42 on both ends; the far end has 10.77.0.200."""
    ns = f"hf-{lab.plan.name}-vm9"
    host = ["ip", "-n", lab.plan.host_netns]
    far = ["ip", "-n", ns]
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            [*host, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", ns],
            [*host, "addr", "add", "192.0.2.1/30", "dev", "ul0"],
            [*host, "link", "set", "ul0", "up"],
            [*far, "addr", "add", "192.0.2.2/30", "dev", "ul1"],
            [*far, "link", "set", "ul1", "up"],
            [*far, "link", "set", "lo", "up"],
            [*host, "link", "add", DEVICE, *vxlan("192.0.2.1", "192.0.2.2", "ul0")],
            [*far, "link", "add", "vx1", *vxlan("192.0.2.2", "192.0.2.1", "ul1")],
            [*far, "addr", "add", f"{FAR_IP}/{lab.plan.subnet.prefixlen}", "dev", "vx1"],
            [*far, "link", "set", "vx1", "up"],
            [*host, "link", "set", DEVICE, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        yield Far(ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def enslave(lab: LabSession) -> None:
    subprocess.run(
        ["ip", "-n", lab.plan.host_netns, "link", "set", DEVICE, "master", lab.plan.bridge], check=True
    )


def hf_on(lab: LabSession) -> list[str]:
    """`python -m hyperfence --lab NAME` with the test's state directory."""
    return [*HF, "--lab", lab.plan.name, "--state-dir", lab.state_dir]


def hf(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI on the lab."""
    return subprocess.run(
        [*hf_on(lab), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def write_policy(lab: LabSession, path: Path, *, uplinks: list[str]) -> str:
    document = lab.document([FAR_TO_VM2])
    if uplinks:
        document["networks"][0]["uplinks"] = uplinks
    path.write_text(json.dumps(document))
    return str(path)


def ruleset(lab: LabSession) -> bytes:
    return lab.run("host", ["nft", "-s", "list", "ruleset"]).stdout


REFUSAL = f'networks[0].uplinks: add "{DEVICE}" (bridge br0, port {DEVICE}: a vxlan device)'


def test_an_undeclared_network_device_refuses_the_policy_and_declared_it_passes_as_an_uplink(
    lab: LabSession, tmp_path: Path
) -> None:
    lab.serve("vm2", udp=[ALLOWED, OTHER])
    lab.apply([FAR_TO_VM2])  # generation 1: the rule is there, the far host is not yet on the bridge
    with far_host(lab) as far:
        enslave(lab)
        # The kernel already gives the new port nothing (fail closed): the rule alone does not let it in.
        assert far.udp(str(lab.plan.vm("vm2").ip), ALLOWED) != "OK"
        before = ruleset(lab)
        forgets = write_policy(lab, tmp_path / "forgets.json", uplinks=[])
        for argv in (
            ("policy", "check", forgets),
            ("policy", "apply", "--dry-run", forgets),
            ("policy", "apply", forgets),
        ):
            r = hf(lab, *argv)
            assert r.returncode == 4, (argv, r.returncode, r.stdout, r.stderr)
            assert r.stderr.startswith("error: the policy would cut the host off its network"), r.stderr
            assert REFUSAL in r.stderr and "ip link set DEV nomaster" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        assert ruleset(lab) == before  # nothing was applied ...
        assert lab.engine is not None and lab.engine.store.latest_generation() == 1  # ... nor stored
        # Without the kernel to look at, `policy check` validates the file alone, as before.
        plain = subprocess.run(
            [*HF, "policy", "check", forgets],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert plain.returncode == 0, plain.stderr

        declares = write_policy(lab, tmp_path / "declares.json", uplinks=[DEVICE])
        r = hf(lab, "policy", "check", declares)
        assert r.returncode == 0 and "no undeclared network device" in r.stdout, r.stdout + r.stderr
        r = hf(lab, "policy", "apply", declares)
        assert r.returncode == 0 and "generation 2 applied" in r.stdout, r.stdout + r.stderr
        assert ruleset(lab) != before
        # As documented for uplinks: the port itself is passed through, its peers are matched at the VM's
        # ingress: the far host's allowed datagram arrives (and is answered), another port does not.
        vm2 = str(lab.plan.vm("vm2").ip)
        far.forget_neighbours()
        assert far.udp(vm2, ALLOWED) == "OK"
        assert far.udp(vm2, OTHER) == "TIMEOUT"
        assert far.udp(str(lab.plan.vm("vm1").ip), ALLOWED) == "TIMEOUT"


def _status(lab: LabSession) -> subprocess.CompletedProcess[str]:
    return hf(lab, "status")


def _wait(what: str, check: Callable[[], object], *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_device_joining_the_bridge_under_the_daemon_is_reported_and_gets_nothing_until_declared(
    lab: LabSession, tmp_path: Path
) -> None:
    lab.serve("vm2", udp=[ALLOWED])
    forgets = write_policy(lab, tmp_path / "forgets.json", uplinks=[])
    assert hf(lab, "policy", "apply", forgets).returncode == 0
    log_path = tmp_path / "daemon.log"
    vm2 = str(lab.plan.vm("vm2").ip)
    with open(log_path, "wb") as log, far_host(lab) as far:
        # A resync far longer than the test: what the daemon notices, its link watch noticed.
        daemon = subprocess.Popen(
            [*hf_on(lab), "daemon", "--resync", "600"],
            stderr=log,
            start_new_session=True,  # stop_process ends its session
        )
        try:
            _wait(
                "the daemon's first converge",
                lambda: (daemon_request(lab.state_dir, {"op": "status"}) or {}).get("policy"),
            )
            assert _status(lab).returncode == 0
            enslave(lab)
            assert lab.engine is not None
            _wait(
                "an undeclared-device event",
                lambda: lab.engine is not None and lab.engine.store.events(kind="undeclared-device"),
            )
            (event,) = lab.engine.store.events(kind="undeclared-device")
            assert event["port"] == DEVICE and event["bridge"] == "br0" and event["kind"] == "a vxlan device"
            assert event["declare"] == f'networks[0].uplinks: add "{DEVICE}"'
            status = _status(lab)
            assert status.returncode == 1, status.stdout + status.stderr
            assert (
                f"cut off: {DEVICE} on bridge br0 (a vxlan device) is not declared as an uplink and gets "
                f'nothing; to declare it: networks[0].uplinks: add "{DEVICE}"'
            ) in status.stdout, status.stdout
            assert f"WARNING hyperfence.engine: network device {DEVICE} on bridge br0" in log_path.read_text()
            assert far.udp(vm2, ALLOWED) == "TIMEOUT"  # fail closed: it gets nothing until declared

            declares = write_policy(lab, tmp_path / "declares.json", uplinks=[DEVICE])
            r = hf(lab, "policy", "apply", declares)
            assert r.returncode == 0 and "applied by the daemon" in r.stdout, r.stdout + r.stderr
            far.forget_neighbours()
            assert far.udp(vm2, ALLOWED) == "OK"
            status = _status(lab)
            assert status.returncode == 0 and "cut off" not in status.stdout, status.stdout
            (gone,) = lab.engine.store.events(kind="undeclared-device-gone")
            assert gone["port"] == DEVICE
        finally:
            topology.stop_process(daemon)


def test_the_daemon_passes_a_device_its_policy_would_cut_off_as_a_provisional_uplink(
    lab: LabSession, tmp_path: Path
) -> None:
    """A daemon that finds no hyperfence ruleset (a fresh boot: the bridge passes everything, vx0 too) and a
    policy file that forgets vx0: the VMs get their policy at once and vx0 keeps passing, as a provisional
    uplink that `status` reports (exit 1) until vx0 is declared or leaves the bridge (a link event: it is
    then taken out of the ruleset at once)."""
    lab.serve("vm2", udp=[ALLOWED, OTHER])
    forgets = write_policy(lab, tmp_path / "forgets.json", uplinks=[])
    log_path = tmp_path / "daemon.log"
    vm2 = str(lab.plan.vm("vm2").ip)
    with open(log_path, "wb") as log, far_host(lab) as far:
        enslave(lab)
        assert b"hyperfence" not in ruleset(lab)
        daemon = subprocess.Popen(
            [*hf_on(lab), "daemon", "--policy", forgets, "--resync", "600"],
            stderr=log,
            start_new_session=True,
        )
        try:
            _wait("the provisional uplink in the status", lambda: "provisional uplink" in _status(lab).stdout)
            status = _status(lab)
            assert status.returncode == 1
            assert (
                f"provisional uplink: {DEVICE} on bridge br0 (a vxlan device) is not declared as an uplink; "
                "the policy would cut it off, so it passes unfiltered until declared "
                f'(networks[0].uplinks: add "{DEVICE}") or taken off the bridge'
            ) in status.stdout, status.stdout
            assert b"table bridge hyperfence" in ruleset(lab)  # the VMs are filtered ...
            far.forget_neighbours()
            assert far.udp(vm2, ALLOWED) == "OK"  # ... and the host's network behind vx0 still passes,
            assert far.udp(vm2, OTHER) == "TIMEOUT"  # to what the VMs' rules allow
            assert lab.engine is not None
            (event,) = lab.engine.store.events(kind="provisional-uplink")
            assert event["port"] == DEVICE and event["declare"] == f'networks[0].uplinks: add "{DEVICE}"'
            assert f"WARNING hyperfence.engine: network device {DEVICE} on bridge br0" in log_path.read_text()
            subprocess.run(["ip", "-n", lab.plan.host_netns, "link", "set", DEVICE, "nomaster"], check=True)
            _wait("the provisional uplink gone", lambda: _status(lab).returncode == 0)
            (gone,) = lab.engine.store.events(kind="provisional-uplink-gone")
            assert gone["port"] == DEVICE
            enslave(lab)  # back on the bridge now that the policy is applied: it gets nothing (fail closed)
            _wait(
                "an undeclared-device event",
                lambda: lab.engine is not None and lab.engine.store.events(kind="undeclared-device"),
            )
            far.forget_neighbours()
            assert far.udp(vm2, ALLOWED) == "TIMEOUT"
            assert "converge failed" not in log_path.read_text()
        finally:
            topology.stop_process(daemon)
