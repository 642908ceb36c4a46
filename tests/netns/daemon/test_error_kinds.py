"""A refusal by the real daemon keeps its kind across the control socket: `policy apply` exits with the
code and prints the text the error has without a daemon in between (`errors.to_wire` / `from_wire`), where
every daemon failure used to come back as a KernelError (exit 7). Nothing is half-applied: the kernel keeps
the ruleset it held."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.daemon import request
from hyperfence.errors import InvalidInputError, from_wire
from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel

RULE = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "services": ["icmp/echo-request"]}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabSession]:
    with LabSession("sv" + secrets.token_hex(2), 2, state_dir=str(tmp_path / "state")) as s:
        yield s


@pytest.fixture
def daemon(lab: LabSession, tmp_path: Path) -> Iterator[Path]:
    """A daemon following the policy file it returns (valid: one rule), once its first converge is done."""
    followed = tmp_path / "daemon.json"
    followed.write_text(json.dumps(lab.document([RULE])))
    hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    p = subprocess.Popen(
        [*hf, "daemon", "--policy", str(followed), "--resync", "3600"], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert p.poll() is None, f"the daemon exited with status {p.returncode}"
            reply = request(lab.state_dir, {"op": "status"}, timeout=5)
            if reply is not None and reply.get("policy"):
                break
            assert time.monotonic() < deadline, f"no first converge within 30 s: {reply}"
            time.sleep(0.05)
        yield followed
    finally:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def hyperfence(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)


def ruleset(lab: LabSession) -> str:
    r = lab.run("host", ["nft", "-s", "list", "table", "bridge", "hyperfence"])
    assert r.returncode == 0, r.stderr
    return str(r.stdout)


def test_a_refusal_by_the_daemon_keeps_its_kind_and_exit_code(
    lab: LabSession, daemon: Path, tmp_path: Path
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(lab.document([])))  # valid here: the CLI stores it, then asks the daemon
    before = ruleset(lab)
    assert "ping" in before

    # The daemon's own policy file turns invalid: the daemon refuses with every problem, located.
    broken = lab.document([RULE])
    broken["vms"][0]["mac"] = "52:54:00:zz:00:01"
    daemon.write_text(json.dumps(broken))
    r = hyperfence(lab, "policy", "apply", str(good))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert lines[0] == f"error: the daemon could not apply generation 1: {daemon} has 1 problem(s)", lines
    assert lines[1].startswith("  vms[0].mac: '52:54:00:zz:00:01' is not a MAC address"), lines
    assert len(lines) == 2 and "Traceback" not in r.stderr

    # The daemon's policy file is gone: not found, exit 3.
    daemon.unlink()
    r = hyperfence(lab, "policy", "apply", str(good))
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.splitlines() == [
        f"error: the daemon could not apply generation 2: policy file {daemon} does not exist"
    ]
    assert ruleset(lab) == before  # refused, nothing applied

    # An op the daemon does not know, as a raw request: the reply says its kind for any client.
    reply = request(lab.state_dir, {"op": "explode"})
    assert reply is not None and reply["ok"] is False and reply["error_kind"] == "InvalidInputError"
    assert isinstance(from_wire(reply), InvalidInputError) and "unknown op 'explode'" in reply["error"]
