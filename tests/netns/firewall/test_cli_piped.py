"""The commands that read the kernel, run as the real process into a pipe (COLUMNS=80): `ruleset show` prints
the nft text one line per line and `ruleset diff` one problem per line, never wrapped at 80 columns (the
store-only commands and the tables: tests/unit/cli/test_piped.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel

ADDRESSES = [f"10.1.{i // 100}.{i % 100 * 2 + 1}" for i in range(40)]  # none adjacent: no ranges


@pytest.fixture
def lab_vms() -> int:
    return 2


@pytest.fixture
def lab(lab: LabSession) -> LabSession:
    """The shared lab (tests/netns/conftest.py), set up for this module."""
    lab.apply(
        [{"id": "partners", "from": "ipset:partners", "to": "vm:vm1", "services": ["tcp/443"]}],
        ipsets={"partners": ADDRESSES},
    )
    return lab


def hyperfence(lab: LabSession, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_ruleset_show_and_diff_are_never_wrapped(lab: LabSession) -> None:
    shown = hyperfence(lab, "ruleset", "show")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert all(re.match(r"(# |table |  (set|map|chain) |    |  \}$|\}$)", line) for line in lines), lines
    (elements,) = [line for line in lines if f"{ADDRESSES[0]}," in line]
    assert sorted(re.findall(r"10\.1\.\d+\.\d+", elements)) == sorted(ADDRESSES)  # the whole set, one line

    # drift, in the lab's namespace only: a flushed chain, and a chain someone added (its long name makes a
    # long line)
    lab.run("host", ["nft", "flush", "chain", "bridge", "hyperfence", "guard"])
    added = "added_by_hand_" + "x" * 80
    assert lab.run("host", ["nft", "add", "chain", "bridge", "hyperfence", added]).returncode == 0
    diff = hyperfence(lab, "ruleset", "diff")
    assert diff.returncode == 1, diff.stderr
    *problems, plan = diff.stdout.splitlines()
    assert problems and all(p.startswith("- ") for p in problems), diff.stdout
    assert f"- chain {added} is not hyperfence's" in problems
    assert plan.startswith("a reconcile would send ")
