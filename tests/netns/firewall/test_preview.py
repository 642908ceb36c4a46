"""`policy apply --dry-run` on a real lab: the plan and what differs from the kernel, after the kernel checked
the batch as a dry run (`nft --check`); nothing is stored or applied, and a batch this kernel would refuse
(bridge conntrack, which it lacks, forced by `--flavour bridge_native`) is a kernel error, exit 7."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.adapters.store import Store
from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel

RULE = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "services": ["icmp/echo-request"]}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabSession]:
    with LabSession("sv" + secrets.token_hex(2), 2, state_dir=str(tmp_path / "state")) as s:
        s.apply([])
        yield s


def hyperfence(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, check=False)


def state(lab: LabSession) -> tuple[int, str]:
    """(the latest stored generation, the kernel's ruleset without its counters)"""
    store = Store(lab.state_dir)
    try:
        generation = store.latest_generation()
    finally:
        store.close()
    r = lab.run("host", ["nft", "-s", "list", "ruleset"])
    assert r.returncode == 0, r.stderr
    return generation, str(r.stdout)


def test_a_dry_run_shows_the_plan_and_the_differences_and_changes_nothing(
    lab: LabSession, tmp_path: Path
) -> None:
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(lab.document([RULE])))
    before = state(lab)
    r = hyperfence(lab, "policy", "apply", "--dry-run", str(policy))
    assert r.returncode == 0, r.stdout + r.stderr
    first, *differences = r.stdout.splitlines()
    assert first.startswith("would send ") and "nothing to change" not in first, first
    assert differences and all(d.startswith(("- chain ", "- set ")) for d in differences), differences
    assert any("rule(s) missing" in d for d in differences), differences
    assert state(lab) == before

    same = tmp_path / "same.json"
    same.write_text(json.dumps(lab.document([])))
    r = hyperfence(lab, "policy", "apply", "--dry-run", str(same))
    assert (r.returncode, r.stdout) == (0, "would send 0 commands: nothing to change\n"), r.stderr


def test_a_batch_the_kernel_would_refuse_is_exit_7_and_nothing_changes(
    lab: LabSession, tmp_path: Path
) -> None:
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(lab.document([RULE])))
    before = state(lab)
    r = hyperfence(lab, "--flavour", "bridge_native", "policy", "apply", "--dry-run", str(policy))
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stderr.startswith("error: the kernel would refuse this policy's batch ("), r.stderr
    assert "nothing was stored or changed" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert state(lab) == before
