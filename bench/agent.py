"""Agent benchmark: the guest agent's own footprint (goal: <= 0.5 % of one core, <= 20 MB RSS at a 1 s
interval). Run from the repository root (no root needed):

    .venv/bin/python bench/agent.py                       # 60 s at 1 s, the agent run by this Python
    .venv/bin/python bench/agent.py --seconds 10          # a smoke run
    .venv/bin/python bench/agent.py --python python3.9    # the agent run by another interpreter

Footprint: the zipapp is built (`build_zipapp`) into a temp dir and run as its own process
(`PYTHON hyperfence-agent.pyz --config FILE`) against a unix-socket sink in this process that verifies every
frame (`wire.verify`, seqs strictly increasing). Measured from the first beat (the interpreter's start-up is
not the steady state) for `--seconds`: CPU = utime + stime from /proc/PID/stat, as % of one core over the
wall time; RSS = VmRSS from /proc/PID/status, read every second (max and final). The agent watches the
default auth logs, so the cost includes tailing whichever of them exist on this machine.

Sample cost: one interval's work without the channel (read the socket tables, `Collector.sample`,
`Watcher.events`), timed in this process 200 times on this machine's real /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_ingest import ingest, print_ingest
from common import cpu_ticks, env_summary, log, median, percentile, rss_mb, workdir

from hyperfence import wire
from hyperfence.agent.build import build_zipapp
from hyperfence.agent.collect import Collector
from hyperfence.agent.sockets import SocketTable, read_sockets
from hyperfence.agent.watch import Watcher

GOAL_CPU_PCT = 0.5
GOAL_RSS_MB = 20.0
VM = "bench-vm"


class Sink:
    """A unix-socket receiver in a thread: verifies every frame, counts them by kind and by problem."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.key = key
        self.kinds: dict[str, int] = {}
        self.bad: dict[str, int] = {}
        self.first_beat = threading.Event()
        self.bye = threading.Event()
        self._last_seq = -1
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._sock.close()
        self._thread.join(2)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                reader = wire.FrameReader()
                while data := conn.recv(65536):
                    for frame in reader.feed(data):
                        self._take(frame)

    def _take(self, frame: bytes) -> None:
        try:
            body = wire.verify(self.key, frame, VM)
        except wire.WireError as e:
            self.bad[e.reason] = self.bad.get(e.reason, 0) + 1
            return
        if body["seq"] <= self._last_seq:
            self.bad["replayed"] = self.bad.get("replayed", 0) + 1
            return
        self._last_seq = body["seq"]
        self.kinds[body["kind"]] = self.kinds.get(body["kind"], 0) + 1
        if body["kind"] == "beat":
            self.first_beat.set()
        elif body["kind"] == "bye":
            self.bye.set()


def footprint(seconds: int, interval: float, python: str = sys.executable) -> dict[str, Any]:
    """Run the built zipapp for `seconds` at `interval` against a verifying sink; its CPU and RSS."""
    wd = workdir("hf-bench-agent-")
    key = secrets.token_bytes(32)
    sink = Sink(wd / "vm.sock", key)
    config = {
        "version": 1,
        "vm": VM,
        "key": key.hex(),
        "interval": interval,
        "channel": {"type": "unix", "path": str(wd / "vm.sock")},
        "state": str(wd / "state.json"),
    }
    (wd / "agent.json").write_text(json.dumps(config), encoding="utf-8")
    app = build_zipapp(wd / "hyperfence-agent.pyz")
    proc = subprocess.Popen(
        [python, str(app), "--config", str(wd / "agent.json")], stderr=subprocess.PIPE, text=True
    )
    try:
        if not sink.first_beat.wait(30):
            raise RuntimeError(
                f"no beat from the agent within 30 s (stderr: {proc.stderr.read() if proc.poll() is not None and proc.stderr else ''})"
            )
        version = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        log(f"agent pid {proc.pid} (python {version}) beating; measuring {seconds} s")
        beats0 = sink.kinds.get("beat", 0)
        t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
        rss: list[float] = []
        while time.monotonic() - t0 < seconds:
            rss.append(rss_mb(proc.pid))
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
        wall, ticks = time.monotonic() - t0, cpu_ticks(proc.pid) - c0
        rss.append(rss_mb(proc.pid))
        beats = sink.kinds.get("beat", 0) - beats0
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        sink.bye.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.close()
        shutil.rmtree(wd, ignore_errors=True)
    cpu_s = ticks / os.sysconf("SC_CLK_TCK")
    return {
        "python": version,
        "seconds": round(wall, 1),
        "interval": interval,
        "cpu_pct": 100.0 * cpu_s / wall,
        "cpu_s": cpu_s,
        "rss_max_mb": max(rss),
        "rss_final_mb": rss[-1],
        "beats": beats,
        "frames": dict(sink.kinds),
        "bad_frames": dict(sink.bad),
        "exit": proc.returncode,
    }


def sample_cost(runs: int = 200) -> dict[str, Any]:
    """Milliseconds of one interval's work (sockets + resources + events), in this process, real /proc."""
    collector, watcher, table = Collector(), Watcher(), SocketTable()
    collector.prime(now=time.monotonic())
    watcher.events(table.read())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sockets = table.read()
        collector.sample(now=time.monotonic(), sockets=sockets)
        watcher.events(sockets)
        times.append((time.perf_counter() - t) * 1000)
    proc_times = []
    for _ in range(20):
        t = time.perf_counter()
        read_sockets()
        proc_times.append((time.perf_counter() - t) * 1000)
    return {
        "median_ms": median(times),
        "p99_ms": percentile(times, 99),
        "sockets": len(sockets),
        "source": table.source,
        "proc_net_ms": median(proc_times),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="measurement time (default 60)")
    ap.add_argument("--interval", type=float, default=1.0, help="the agent's interval in seconds (default 1)")
    ap.add_argument(
        "--python", default=sys.executable, help="interpreter that runs the zipapp (default: this one)"
    )
    ap.add_argument(
        "--vms", type=int, default=500, help="simulated VMs for the daemon-ingest part (default 500)"
    )
    ap.add_argument("--ingest-seconds", type=int, default=30, help="daemon-ingest run time (default 30)")
    args = ap.parse_args()
    log("timing one sample in-process")
    cost = sample_cost()
    log("building the zipapp and starting the agent")
    r = footprint(args.seconds, args.interval, args.python)
    cpu_ok, rss_ok = r["cpu_pct"] <= GOAL_CPU_PCT, r["rss_max_mb"] <= GOAL_RSS_MB
    expected = int(r["seconds"] / r["interval"])
    print(f"hyperfence agent footprint ({env_summary()}; agent run by python {r['python']})")
    print(
        f"run: {r['seconds']} s at a {r['interval']} s interval; {r['beats']} beats received (~{expected} expected), frames {r['frames']}, refused {r['bad_frames'] or 'none'}, exit {r['exit']}"
    )
    print(
        f"CPU: {r['cpu_pct']:.3f} % of one core ({r['cpu_s']:.2f} s)   goal <= {GOAL_CPU_PCT} %   {'PASS' if cpu_ok else 'FAIL'}"
    )
    print(
        f"RSS: max {r['rss_max_mb']:.1f} MB, final {r['rss_final_mb']:.1f} MB   goal <= {GOAL_RSS_MB:g} MB   {'PASS' if rss_ok else 'FAIL'}"
    )
    print(
        f"one sample (sockets via {cost['source']} + resources + events, {cost['sockets']} sockets): "
        f"median {cost['median_ms']:.2f} ms, p99 {cost['p99_ms']:.2f} ms "
        f"(the socket tables from /proc/net instead: {cost['proc_net_ms']:.2f} ms)"
    )
    ok = cpu_ok and rss_ok and r["beats"] >= expected - 2 and not r["bad_frames"]
    print("agent footprint: " + ("PASS" if ok else "FAIL"))
    log(f"daemon ingest: {args.vms} simulated VMs at 1 Hz")
    ing = ingest(args.vms, args.ingest_seconds)
    print()
    print_ingest(ing)
    ing_ok = ing["refused"] == 0 and ing["accepted"] >= 0.99 * ing["sent"]
    print("daemon ingest: " + ("PASS (every message accepted)" if ing_ok else "FAIL"))
    return 0 if ok and ing_ok else 1


if __name__ == "__main__":
    sys.exit(main())
