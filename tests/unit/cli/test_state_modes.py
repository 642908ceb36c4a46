"""The real `hyperfence` command under umask 000, on a state directory an older version (or `lab image`) left
readable: the store, its -wal/-shm, the agent config and the TLS keys end up 0600 in 0700 directories, and
every repair is named on stderr. No kernel: `vm enroll` and `vm events` only touch the store and files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.policy.test_parse import doc

STORE_POLICY = (
    "import json, sys\n"
    "from hyperfence.reconcile.engine import Engine\n"
    "e = Engine(netns=None, state_dir=sys.argv[1])\n"
    "e.store_policy(json.loads(sys.argv[2]), source='test')\n"
    "e.close()\n"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hyperfence(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hyperfence", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        umask=0,
        timeout=60,
        check=False,
    )


def test_enroll_under_umask_000_leaves_store_config_and_keys_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    policy = doc(settings={"agent_endpoint": "10.77.0.1:7474"})
    done = subprocess.run(
        [sys.executable, "-c", STORE_POLICY, str(state), json.dumps(policy)], umask=0, timeout=60, check=False
    )
    assert done.returncode == 0
    assert (mode(state), mode(state / "hyperfence.db")) == (0o700, 0o600)  # SQLite alone would make it 0644
    # what `lab image` and an older hyperfence leave behind
    state.chmod(0o755)
    (state / "hyperfence.db").chmod(0o644)
    (state / "agents").mkdir(mode=0o755)
    old = state / "agents" / "vm1.json"
    old.write_text('{"key": "old"}')
    old.chmod(0o644)

    r = hyperfence(state, "vm", "enroll", "vm1", "--channel", "tls")
    assert r.returncode == 0, r.stderr
    for repair in (
        f"{state}: mode 0755, now 0700",
        f"{state / 'hyperfence.db'}: mode 0644, now 0600",
        f"{state / 'agents'}: mode 0755, now 0700",
        f"{old}: mode 0644, now 0600",
    ):
        assert f"state repaired: {repair}" in r.stderr, r.stderr
    assert json.loads(old.read_text())["key"] != "old"
    tls = state / "tls"
    assert {p.name: mode(p) for p in tls.iterdir()} == dict.fromkeys(
        ["ca.key", "ca.pem", "server.key", "server.pem", "host"], 0o600
    )
    for d in (state, state / "agents", tls):
        assert mode(d) == 0o700, d
    assert mode(state / "hyperfence.db") == 0o600 and mode(old) == 0o600
    r = hyperfence(state, "vm", "enroll", "vm2")  # a config that did not exist: created 0600 at once
    assert r.returncode == 0, r.stderr
    assert mode(state / "agents" / "vm2.json") == 0o600

    # -wal and -shm exist while a process has the store open: `vm events --follow` keeps it open
    follow = subprocess.Popen(
        [sys.executable, "-m", "hyperfence", "--state-dir", str(state), "vm", "events", "vm1", "--follow"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        umask=0,
    )
    try:
        wal, shm = state / "hyperfence.db-wal", state / "hyperfence.db-shm"
        deadline = time.monotonic() + 30
        while not (wal.exists() and shm.exists()):
            assert follow.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert (mode(wal), mode(shm)) == (0o600, 0o600)
    finally:
        follow.terminate()
        _, err = follow.communicate(timeout=30)
    assert b"state repaired" not in err  # the second start found nothing to repair
