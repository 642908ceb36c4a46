"""How many agent messages a second the daemon ingests, and the CPU it uses, from N simulated VMs at 1 Hz.

The real daemon (`hyperfence daemon`, its own process) runs in a throwaway network namespace `hf-bag-host`
(its 500-VM ruleset goes there and is removed with the namespace) with its agent monitor. N simulated
agents in this process each hold their own channel (the VM's unix socket, as a lab VM's agent does) and
send one signed beat a second, of the size and shape the real agent sends. Measured over the run:
messages the daemon accepted (its `agents` control op), refusals (must be 0), the daemon's CPU (utime +
stime from /proc, as % of one core) and RSS. The senders' cost (HMAC, JSON) is in this process, not the
daemon's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cpu_ticks, log, rss_mb

from hyperfence import wire
from hyperfence.daemon import request
from hyperfence.health.tracker import AgentRecord
from hyperfence.lab.plan import plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.policy.parse import parse_policy
from hyperfence.reconcile.agents import channels_dir, new_key
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import vm_sid

NETNS = "hf-bag-host"
REPO = Path(__file__).resolve().parent.parent


def sample_beat() -> dict[str, Any]:
    """A beat shaped like the real agent's: ~40 numbers and a couple of events."""
    res: dict[str, Any] = {
        "cpu": {"busy_pct": 3.2, "user_pct": 2.0, "system_pct": 1.2, "iowait_pct": 0.0},
        "mem": {"total_kb": 1_000_000, "available_kb": 600_000, "used_pct": 40.0},
        "load": {"1": 0.1, "5": 0.05, "15": 0.01},
        "disk": {"read_bytes": 4096, "write_bytes": 8192, "reads": 1, "writes": 2},
        "net": {"eth0": {"rx_bytes": 1500, "tx_bytes": 900, "rx_packets": 10, "tx_packets": 8, "drops": 0}},
        "tcp": {"ESTABLISHED": 3, "LISTEN": 2, "TIME_WAIT": 1},
        "udp_sockets": 2,
        "procs": 42,
        "uptime": 1234.5,
    }
    return {"res": res, "events": [{"type": "fanout", "peers": 1, "ports": 1}], "dropped": 0}


def ingest(n: int = 500, seconds: int = 30, per_second: int = 1) -> dict[str, Any]:
    """`per_second` beats per VM per second (1: the real load; more: to find the daemon's capacity)."""
    state = Path(tempfile.mkdtemp(prefix="hf-bench-agent-"))
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    daemon: subprocess.Popen[bytes] | None = None
    socks: list[socket.socket] = []
    try:
        keys = _enroll(state, n)
        daemon = _start_daemon(state)
        order = sorted(keys)
        paths = [os.path.join(channels_dir(str(state)), f"{vm_sid(vm)}.sock") for vm in order]
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
            time.sleep(0.1)  # the monitor opens its channels after the daemon's first converge
        for path in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socks.append(s)
        time.sleep(1.0)
        before = _accepted(state)
        cpu0, t0 = cpu_ticks(daemon.pid) / os.sysconf("SC_CLK_TCK"), time.monotonic()
        size, late = _send_beats(order, socks, keys, ticks=seconds * per_second, t0=t0, step=1.0 / per_second)
        time.sleep(1.0)  # let the daemon drain
        cpu1, t1 = cpu_ticks(daemon.pid) / os.sysconf("SC_CLK_TCK"), time.monotonic()
        after = _accepted(state)
        rows = request(str(state), {"op": "agents"})["agents"]  # type: ignore[index]
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        return {
            "vms": n,
            "seconds": seconds,
            "per_second": per_second,
            "sent": n * seconds * per_second,
            "accepted": after - before,
            "rate": (after - before) / (t1 - t0),
            "refused": sum(v for r in rows for k, v in r["counts"].items() if k != "accepted"),
            "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "rss_mb": rss_mb(daemon.pid),
            "frame_bytes": size,
            "late_ticks": late,
            "statuses": statuses,
        }
    finally:
        for s in socks:
            s.close()
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def _enroll(state: Path, n: int) -> dict[str, bytes]:
    """A policy of n VMs and an agent key for each, in a fresh store. VM id -> key."""
    doc = lab_policy(plan_lab("bag", n))
    engine = Engine(netns=None, state_dir=str(state))
    try:
        engine.store_policy(doc, source="bench/agent")
        keys: dict[str, bytes] = {}
        for vm in parse_policy(doc).vms:
            key = new_key()
            path = os.path.join(channels_dir(str(state)), f"{vm_sid(vm.id)}.sock")
            engine.store.enroll_agent(AgentRecord(vm.id, key, {"type": "unix", "path": path}))
            keys[vm.id] = key
        return keys
    finally:
        engine.close()


def _start_daemon(state: Path) -> subprocess.Popen[bytes]:
    log("starting the daemon")
    with open(state / "daemon.log", "wb") as err:
        daemon = subprocess.Popen(
            [str(REPO / ".venv/bin/hyperfence"), "--netns", NETNS, "--state-dir", str(state), "daemon"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 60
    while (r := request(str(state), {"op": "agents"})) is None or not r.get("ok"):
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"the daemon did not come up: {(state / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return daemon


def _send_beats(
    order: list[str],
    socks: list[socket.socket],
    keys: dict[str, bytes],
    *,
    ticks: int,
    t0: float,
    step: float,
) -> tuple[int, int]:
    """One beat per VM every `step` seconds, `ticks` times; (frame size, ticks the senders fell behind)."""
    beat = sample_beat()
    seqs = dict.fromkeys(order, 0)
    size = len(wire.encode(keys[order[0]], wire.message(order[0], 1, "beat", beat, time.time())))
    log(f"{len(order)} channels connected; each sends a {size}-byte beat every {step:g} s, {ticks} times")
    late = 0
    for tick in range(ticks):
        for vm, s in zip(order, socks, strict=True):
            seqs[vm] = wire.next_seq(seqs[vm], time.time())
            s.sendall(wire.encode(keys[vm], wire.message(vm, seqs[vm], "beat", beat, time.time())))
        pause = t0 + (tick + 1) * step - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            late += 1
    return size, late


def _accepted(state: Path) -> int:
    reply = request(str(state), {"op": "agents"})
    if reply is None or not reply.get("ok"):
        raise RuntimeError(f"the daemon does not answer: {reply}")
    return sum(int(r["counts"].get("accepted", 0)) for r in reply["agents"])


def print_ingest(r: dict[str, Any]) -> None:
    late = f" (the senders fell behind in {r['late_ticks']} of the seconds)" if r["late_ticks"] else ""
    print(
        f"daemon ingest, {r['vms']} simulated VMs at {r['per_second']} Hz for {r['seconds']} s "
        f"({r['frame_bytes']}-byte "
        f"beats):\n"
        f"  accepted {r['accepted']} of {r['sent']} sent = {r['rate']:.0f} messages/s; refused {r['refused']}; "
        f"agent statuses {r['statuses']}\n"
        f"  daemon CPU {r['cpu_pct']:.1f} % of one core, RSS {r['rss_mb']:.0f} MB{late}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=500)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--per-second", type=int, default=1, help="beats per VM per second (capacity runs)")
    a = ap.parse_args()
    res = ingest(a.vms, a.seconds, a.per_second)
    print_ingest(res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
