"""`hyperfence lab up` / `lab down` as an operator runs them (the real command): `lab down` removes the lab's
state directory (store, agent keys, traffic log) when `lab up` made it, and nothing it did not make."""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hyperfence.daemon import request
from hyperfence.lab import records, topology
from hyperfence.lab.session import OWNED_MARK, lab_state_dir

pytestmark = pytest.mark.kernel

HF = [sys.executable, "-m", "hyperfence"]


def hf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HF, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def name() -> Iterator[str]:
    lab = "op" + secrets.token_hex(2)
    try:
        yield lab
    finally:
        hf("lab", "down", "--name", lab)
        shutil.rmtree(lab_state_dir(lab), ignore_errors=True)  # what a failed test left


def test_down_removes_the_state_up_made_with_the_agents_keys(name: str) -> None:
    state = lab_state_dir(name)
    up = hf("lab", "up", "--name", name, "--vms", "2")
    assert up.returncode == 0, up.stderr
    assert (state / OWNED_MARK).is_file()
    keys = sorted(p.name for p in (state / "agents").iterdir())
    assert "vm1.json" in keys and "vm2.json" in keys  # each VM's agent config, its key in it
    policy = records.state_dir(name) / "policy.yaml"
    assert hf("--lab", name, "policy", "apply", str(policy)).returncode == 0
    assert (state / "hyperfence.db").exists()

    down = hf("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"lab {name!r} is down (its state {state} removed)\n"
    assert not state.exists() and not records.state_dir(name).exists()
    assert not any(ns.startswith(f"hf-{name}-") for ns in topology._list_netns())
    again = hf("lab", "down", "--name", name)  # idempotent
    assert (again.returncode, again.stdout) == (0, f"lab {name!r} is down\n")


def test_down_leaves_a_state_directory_up_did_not_make(name: str) -> None:
    state = lab_state_dir(name)
    state.mkdir(mode=0o700, parents=True)
    (state / "notes.txt").write_text("the operator's\n")
    assert hf("lab", "up", "--name", name, "--vms", "1", "--no-agents").returncode == 0
    assert not (state / OWNED_MARK).exists()  # it existed before: not the lab's
    down = hf("lab", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert "was not made by `lab up` and is left as it is" in down.stdout
    assert (state / "notes.txt").read_text() == "the operator's\n"


def test_down_keeps_the_state_of_a_daemon_that_still_runs(name: str) -> None:
    state = lab_state_dir(name)
    assert hf("lab", "up", "--name", name, "--vms", "1", "--no-agents").returncode == 0
    assert hf("--lab", name, "policy", "apply", str(records.state_dir(name) / "policy.yaml")).returncode == 0
    daemon = subprocess.Popen([*HF, "--lab", name, "daemon"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while request(str(state), {"op": "status"}, timeout=5) is None:
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        down = hf("lab", "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert f"a daemon (pid {daemon.pid}) still runs for it, so its state {state} is kept" in down.stdout
        assert (state / "hyperfence.db").exists() and daemon.poll() is None  # neither touched
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    down = hf("lab", "down", "--name", name)
    assert down.stdout == f"lab {name!r} is down (its state {state} removed)\n"
    assert not state.exists()
