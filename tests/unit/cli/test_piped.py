"""What the CLI prints into a pipe (a script, `| grep`, a file) is never wrapped, cut or squeezed: each command
runs as the real process, its stdout a pipe and COLUMNS=80 (what rich would otherwise fit everything into).
No kernel and no daemon: the commands that read only the store and files, and `status` against a stand-in for
the daemon's control socket (the kernel's `ruleset show` and `ruleset diff`: tests/netns/firewall/test_cli_piped.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.adapters.store import Store
from hyperfence.health.tracker import AgentRecord
from hyperfence.policy.local import CHAINS_ENV
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.traffic import TRAFFIC_FILE
from tests.unit.policy.test_parse import doc

UUID1 = "4f013e6f-bba2-40be-9bdf-12e714f77813"
UUID2 = "13f98949-f4a7-4def-8935-e872a363f62c"
LONG_NAME = "web-frontend-" + "x" * 48  # 61 characters: a name as long as a VM name may be
# 40 addresses, none adjacent (an interval set would merge neighbours into a range)
ADDRESSES = [f"10.1.{i // 100}.{i % 100 * 2 + 1}" for i in range(40)]
SOURCE = "/srv/policies/" + "production-" * 8 + "firewall.yaml"


def hyperfence(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperfence", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # every declared VM gets chains: nothing here reads the bridges' ports (this host has none of them)
        env={**os.environ, "COLUMNS": "80", CHAINS_ENV: "declared"},
    )


def policy() -> dict[str, Any]:
    document = doc(
        ipsets={"partners": ADDRESSES},
        rules=[
            {"id": "partners", "from": "ipset:partners", "to": f"vm:{LONG_NAME}", "services": ["tcp/443"]}
        ],
    )
    first, *others = document["vms"]  # a new list: doc()'s own is shared by every test
    document["vms"] = [{**first, "name": LONG_NAME, "id": UUID1}, *others]
    return document


@pytest.fixture
def state(tmp_path: Path) -> Path:
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store_policy(policy(), source=SOURCE)
    engine.store.enroll_agent(AgentRecord(vm=UUID1, key=b"k" * 32))
    engine.store.enroll_agent(AgentRecord(vm=UUID2, key=b"k" * 32))  # enrolled, not in the policy
    for i in range(3):
        engine.store.add_event(
            "agent:listen", {"exe": "/opt/" + "service/" * 12 + f"daemon{i}", "port": 8000 + i}, vm=UUID1
        )
    engine.store.add_event("vm-pause", {"outcome": "done"}, vm=UUID2)
    engine.close()
    return tmp_path


def test_ruleset_show_prints_the_nft_text_one_line_per_line(state: Path) -> None:
    r = hyperfence(state, "ruleset", "show", "--desired")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # every line is nft text: a table, its sets, maps and chains, their rules, closing braces; a wrapped
    # line would start a new line somewhere in the middle of a rule
    assert all(re.match(r"(# |table |  (set|map|chain) |    |  \}$|\}$)", line) for line in lines), lines
    (elements,) = [line for line in lines if ADDRESSES[0] + "," in line]
    assert sorted(re.findall(r"10\.1\.\d+\.\d+", elements)) == sorted(ADDRESSES)
    assert len(elements) > 400


def test_policy_show_keeps_long_lines_whole(state: Path) -> None:
    r = hyperfence(state, "policy", "show")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# generation 1 from {SOURCE}"
    assert f"  name: {LONG_NAME}" in lines and f"  to: vm:{LONG_NAME}" in lines


def test_logs_print_one_event_per_line(state: Path) -> None:
    records = [
        {
            "time": "2026-12-05T16:50:27.697+00:00",
            "vm": LONG_NAME,
            "direction": "in",
            "verdict": "deny",
            "rule": "sys:default-deny",
            "protocol": "ipv6-icmp",
            "src": f"fe80::77:ff:fe00:{i}",
            "dst": "ff02::1:ff00:" + "a" * 4,
        }
        for i in range(1, 4)
    ]
    (state / TRAFFIC_FILE).write_text("".join(json.dumps(rec) + "\n" for rec in records))
    r = hyperfence(state, "logs")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(len(line) > 80 for line in lines)
    for i, line in enumerate(lines, 1):
        assert line.startswith("2026-12-05T16:50:27.697+00:00 deny   " + LONG_NAME)
        assert line.endswith(f"fe80::77:ff:fe00:{i} -> ff02::1:ff00:aaaa  rule=sys:default-deny")
    raw = hyperfence(state, "logs", "--json")
    assert [json.loads(line) for line in raw.stdout.splitlines()] == records


def test_vm_events_print_one_event_per_line(state: Path) -> None:
    r = hyperfence(state, "vm", "events", LONG_NAME)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.endswith(f'agent:listen {{"exe": "/opt/{"service/" * 12}daemon{i}", "port": {8000 + i}}}')


def test_vm_list_shows_full_names_and_ids_and_every_enrolled_vm(state: Path) -> None:
    r = hyperfence(state, "vm", "list")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if UUID1 in line or UUID2 in line or "vm2" in line]
    assert len(rows) == 3, r.stdout  # one line each: the long name, the VM not in the policy, vm2 (no agent)
    (first,) = [line for line in rows if UUID1 in line]
    assert LONG_NAME in first and "daemon not running" in first
    assert "…" not in r.stdout  # nothing cut


def test_vm_events_finds_an_enrolled_vm_that_is_not_in_the_policy(state: Path) -> None:
    """A libvirt VM is in the policy only while it runs: shut off, its events are still asked for by id."""
    r = hyperfence(state, "vm", "events", UUID2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(' vm-pause {"outcome": "done"}\n')
    unknown = hyperfence(state, "vm", "events", "ghost")
    assert unknown.returncode == 3
    assert "VM 'ghost' is neither in the policy nor enrolled (expected one of: vm2, web-" in unknown.stderr


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Path]:
    """A control socket that answers `status` as a daemon with a failing loop does."""
    reply = {
        "ok": True,
        "pid": 4242,
        "policy": "gen:7",
        "healthy": False,
        "down": ["traffic"],
        "loops": {
            "control": {"state": "running", "failures": 0, "last_error": None},
            "traffic": {
                "state": "down",
                "failures": 3,
                "last_error": "KernelError: netns hf-lab-host: cannot bind NFLOG group 7: another reader "
                "(pid 999) listens on it; stop it or use another group",
            },
        },
        "agent_channels": {"claimed": 2, "refused": {"unverified": 1}, "endpoint": None},
    }
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / "daemon.sock"))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield tmp_path
    thread.join(timeout=5)
    srv.close()


def test_status_keeps_a_loops_last_error_on_one_line(fake_daemon: Path) -> None:
    r = hyperfence(fake_daemon, "status")
    assert r.returncode == 1, r.stderr  # a loop is down
    (traffic,) = [line for line in r.stdout.splitlines() if "traffic" in line]
    assert "another reader (pid 999) listens on it; stop it or use another group" in traffic
    assert "│ down " in traffic and "…" not in r.stdout


def test_a_store_written_by_this_test_is_readable(state: Path) -> None:
    """The fixture's enrolments are in the store the commands read (or the tests above prove nothing)."""
    store = Store(str(state))
    try:
        assert set(store.agents()) == {UUID1, UUID2}
    finally:
        store.close()
