"""The data plane's kernel preconditions on a real kernel: br_netfilter's `bridge-nf-call-iptables` in the
bridges' namespace. Without it the replies of an allowed connection between VMs are judged as new and
dropped (issue 12's finding): the daemon restores it within 0.1 s, and without a daemon `ruleset diff` and
`ruleset show` say the stateful path is broken instead of "in sync"."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hyperfence.lab.session import LabSession
from tests.netns.firewall.test_drift import DaemonProcess

pytestmark = pytest.mark.kernel

TCP_1_2 = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/8080"]}
SYSCTL = "net.bridge.bridge-nf-call-iptables"


@pytest.fixture
def lab_vms() -> int:
    return 2


@pytest.fixture
def lab(lab: LabSession) -> LabSession:
    """The shared lab (tests/netns/conftest.py), set up for this module."""
    lab.serve("vm2", tcp=[8080])
    lab.apply([TCP_1_2])
    return lab


def sysctl(lab: LabSession, value: str | None = None) -> str:
    argv = ["sysctl", "-n", SYSCTL] if value is None else ["sysctl", "-qw", f"{SYSCTL}={value}"]
    r = lab.run("host", argv)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def hf(lab: LabSession, *argv: str) -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run([*base, *argv], capture_output=True, text=True, timeout=60, check=False)


def test_without_a_daemon_the_broken_stateful_path_is_never_in_sync(lab: LabSession) -> None:
    assert lab.tcp("vm1", "vm2", 8080) == "OK"
    diff = hf(lab, "ruleset", "diff")
    assert diff.returncode == 0 and "in sync" in diff.stdout, diff
    sysctl(lab, "0")
    try:
        # the finding: the SYN passes, the SYN-ACK is judged as a new flow and dropped
        assert lab.tcp("vm1", "vm2", 8080) == "TIMEOUT"
        diff = hf(lab, "ruleset", "diff")
        assert diff.returncode == 1, diff
        assert "in sync" not in diff.stdout and f"{SYSCTL} is 0" in diff.stdout, diff.stdout
        show = hf(lab, "ruleset", "show")
        assert show.returncode == 0, show
        first = show.stdout.splitlines()[:2]
        assert first[0].startswith("# data plane br_netfilter; kernel: bridge conntrack")
        assert first[1].startswith(f"# BROKEN: {SYSCTL} is 0"), first
    finally:
        sysctl(lab, "1")
    assert lab.tcp("vm1", "vm2", 8080) == "OK"


def test_the_daemon_restores_the_sysctl_at_once_and_says_so(lab: LabSession) -> None:
    d = DaemonProcess(lab)
    try:
        status = json.loads(hf(lab, "status", "--json").stdout)
        kernel = status["kernel"]
        assert kernel["stateful"] == "ok" and kernel["br_netfilter"] and kernel["bridge_nf_call_iptables"]
        assert kernel["flavour"] == "br_netfilter" and kernel["repairs"] == 0
        sysctl(lab, "0")
        t0 = time.monotonic()
        while sysctl(lab) != "1":
            assert time.monotonic() - t0 < 2.0, "not restored within 2 s"
            time.sleep(0.01)
        took = time.monotonic() - t0
        print(f"{SYSCTL} restored {took * 1000:.0f} ms after it was turned off")
        assert lab.tcp("vm1", "vm2", 8080) == "OK"
        status = json.loads(hf(lab, "status", "--json").stdout)
        assert status["kernel"]["repairs"] == 1 and status["kernel"]["stateful"] == "ok", status["kernel"]
        assert status["healthy"] is True
        assert f"{SYSCTL} was 0" in d.log()
        assert lab.engine is not None
        events = lab.engine.store.events(kind="precondition-repaired")
        assert events and events[-1]["what"] == SYSCTL, events
    finally:
        d.stop()


def test_the_daemon_turns_it_on_at_start(lab: LabSession) -> None:
    sysctl(lab, "0")
    d = DaemonProcess(lab)
    try:
        assert sysctl(lab) == "1"
        assert lab.tcp("vm1", "vm2", 8080) == "OK"
        assert f"{SYSCTL} was 0" in d.log()
    finally:
        d.stop()
        sysctl(lab, "1")
