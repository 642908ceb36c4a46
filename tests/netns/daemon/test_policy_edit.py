"""`hyperfence policy set` / `policy remove` on a real lab: one rule at a time through the running daemon
(validated against the policy it holds, stored as one object, read back by the daemon as that change) and
without a daemon; a refused edit changes neither the store nor the kernel."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.adapters.store import Store
from hyperfence.daemon import request
from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel

PING = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabSession]:
    with LabSession("pe" + secrets.token_hex(2), 2, state_dir=str(tmp_path / "state")) as s:
        s.apply([])
        yield s


def hyperfence(lab: LabSession, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    return subprocess.run(
        [*argv, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def latest(lab: LabSession) -> int:
    store = Store(lab.state_dir)
    try:
        return store.latest_generation()
    finally:
        store.close()


def edits_work(lab: LabSession, *, by: str) -> None:
    assert lab.ping("vm1", "vm2")[0] == 0
    r = hyperfence(lab, "policy", "set", "rules", "-", stdin=json.dumps(PING))
    assert r.returncode == 0, r.stderr
    assert "1 object(s) changed" in r.stdout and by in r.stdout, r.stdout
    assert lab.ping("vm1", "vm2")[0] == 2
    assert lab.ping("vm2", "vm1")[0] == 0  # a rule has a direction

    generation = latest(lab)
    bad = hyperfence(lab, "policy", "set", "rules", "-", stdin=json.dumps({**PING, "to": "vm:ghost"}))
    assert bad.returncode == 2 and "rules[0].to" in bad.stderr and "ghost" in bad.stderr, bad.stderr
    assert latest(lab) == generation and lab.ping("vm1", "vm2")[0] == 2  # nothing stored, nothing changed

    r = hyperfence(lab, "policy", "remove", "rules", "ping")
    assert r.returncode == 0, r.stderr
    assert lab.ping("vm1", "vm2")[0] == 0
    gone = hyperfence(lab, "policy", "remove", "rules", "ping")
    assert gone.returncode == 3 and "no item 'ping'" in gone.stderr, gone.stderr


def test_edits_without_a_daemon(lab: LabSession) -> None:
    edits_work(lab, by="applied:")


def test_edits_through_the_daemon_are_read_as_themselves(lab: LabSession, tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    argv = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    with log.open("w") as out:
        p = subprocess.Popen([*argv, "daemon", "--resync", "3600"], stderr=out)
    try:
        deadline = time.monotonic() + 30
        while (reply := request(lab.state_dir, {"op": "status"}, timeout=5)) is None or not reply.get(
            "policy"
        ):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        edits_work(lab, by="applied by the daemon:")
        # The daemon validated the rule as itself, and compiled the new generation from the one object.
        reply = request(
            lab.state_dir, {"op": "policy-edit", "section": "rules", "item": {**PING, "protocol": "udp"}}
        )
        assert reply is not None and reply["ok"] and reply["checked"] == "item" and reply["changes"] == 1, (
            reply
        )
        status = request(lab.state_dir, {"op": "status"})
        assert status is not None
        # The first converge read the policy whole, and so was the edit that removed a rule (a deletion
        # moves what follows); the two that wrote a rule were read and parsed as their change.
        assert status["policy_reads"] == {"whole": 2, "changes": 2, "parsed_changes": 2}
    finally:
        p.terminate()
        p.wait(timeout=10)
