"""Only the VMs whose port is on this host's bridges get chains, on a real lab through the running daemon and
the CLI: a declared VM that is elsewhere stays an address in the sets of the rules that name it (`can`
answers for it, `ruleset diff` finds no drift), a VM whose port leaves the bridge loses its chains and gets
them back when the port returns (the link watch converges), and its traffic flows again."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.daemon import request
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.compile import vm_sid

pytestmark = pytest.mark.kernel

AWAY = {"name": "away", "port": "hfaway0", "mac": "02:77:00:00:01:f4", "ips": ["10.77.1.244"]}
RULES = [
    {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"},
    {"id": "to-away", "from": "vm:vm1", "to": "vm:away", "protocol": "icmp"},
]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabSession]:
    with LabSession("lc" + secrets.token_hex(2), 2, state_dir=str(tmp_path / "state")) as s:
        yield s


def hyperfence(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)


def kernel_text(lab: LabSession) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", lab.plan.host_netns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout


def chained(lab: LabSession, vm: str) -> bool:
    """Does the kernel hold chains for VM `vm` (a lab VM's id is "<lab>-<name>"; the one away's, its name)?"""
    vm_id = vm if vm == AWAY["name"] else f"{lab.plan.name}-{vm}"
    return f"chain {vm_sid(vm_id)}_" in kernel_text(lab)


def wait_for(what: Callable[[], bool], seconds: float = 10.0) -> float:
    """Seconds until `what()` held; fails after `seconds`."""
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def link(lab: LabSession, *args: str) -> None:
    subprocess.run(["ip", "-n", lab.plan.host_netns, "link", "set", *args], check=True, timeout=10)


def test_vms_elsewhere_stay_addresses_and_a_port_that_returns_gets_its_chains(
    lab: LabSession, tmp_path: Path
) -> None:
    document: dict[str, Any] = lab.document(RULES)
    document["vms"].append(AWAY)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(document))
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    log = tmp_path / "daemon.log"
    lab.apply([])  # the daemon starts with a policy (so `policy apply` below goes through it)
    with log.open("w") as out:
        p = subprocess.Popen([*argv, "daemon", "--resync", "3600"], stderr=out)
    try:
        wait_for(lambda: bool((request(lab.state_dir, {"op": "status"}, timeout=5) or {}).get("policy")))
        r = hyperfence(lab, "policy", "apply", str(policy))
        assert r.returncode == 0 and "by the daemon" in r.stdout, r.stdout + r.stderr
        assert chained(lab, "vm1") and chained(lab, "vm2") and not chained(lab, "away"), log.read_text()
        assert "10.77.1.244" in kernel_text(lab)  # vm1's rule towards it holds its address
        can = hyperfence(lab, "can", "vm1", "away", "--protocol", "icmp")
        assert can.returncode == 0 and "allowed by to-away" in can.stdout, can.stdout + can.stderr
        diff = hyperfence(lab, "ruleset", "diff")
        assert diff.returncode == 0 and "in sync" in diff.stdout, diff.stdout + diff.stderr
        dry = hyperfence(lab, "policy", "apply", str(policy), "--dry-run")  # compiled as the daemon does
        assert "would send 0 commands: nothing to change" in dry.stdout, dry.stdout + dry.stderr
        assert lab.ping("vm1", "vm2")[0] == 2  # (replies received)
        status = hyperfence(lab, "status")
        assert "VMs with chains here: 2 of 3 declared (--chains local" in status.stdout, status.stdout

        port = lab.plan.vm("vm2").port
        link(lab, port, "nomaster")  # vm2 leaves this host: its chains go
        wait_for(lambda: not chained(lab, "vm2"))
        assert chained(lab, "vm1")
        link(lab, port, "master", lab.plan.bridge)  # and comes back: its chains return, its traffic flows
        wait_for(lambda: chained(lab, "vm2"))
        wait_for(lambda: lab.ping("vm1", "vm2", count=1)[0] == 1)
        assert lab.ping("vm2", "vm1", count=1)[0] == 0  # with its own policy: a rule has a direction
        diff = hyperfence(lab, "ruleset", "diff")
        assert diff.returncode == 0 and "in sync" in diff.stdout, diff.stdout + diff.stderr
        assert "VM port" in log.read_text() and p.poll() is None
    finally:
        p.terminate()
        p.wait(timeout=10)
