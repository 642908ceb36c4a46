"""The SQLite store: how soon another process's policy version is seen, and what sharing one connection
between threads costs. No kernel, no namespace: a temporary state directory only.

1. Store write -> seen. A writer process stores a generation every ~50 ms (random gaps); this process
   sees each one either the way the daemon did before issue 13 (`latest_generation()` every 0.2 s, its
   default `--poll`) or through the change feed (`wait_for_change`: inotify + data_version). Latency from
   the writer's commit to the reader seeing it (CLOCK_MONOTONIC is one clock for both processes).
2. Lock vs connection per thread. The agent monitor's write pattern (a batch of events, the sequences, the
   agent records: three transactions per round) from THREADS threads at once, through one shared `Store`
   (one connection, the store's lock around every use) or one `Store` per thread (a connection each;
   SQLite's own file lock serialises the writers, each waiting in `busy_timeout`).

    .venv/bin/python bench/store.py [--changes 60] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hyperfence.adapters.store import Store
from hyperfence.health.tracker import AgentRecord

THREADS = 4
VMS = 50  # agents enrolled; each round saves all of them, as a monitor round that heard every VM does

WRITER = """
import json, random, sys, time
from hyperfence.adapters.store import Store
store = Store(sys.argv[1])
n = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
times = []
for i in range(n):
    time.sleep(random.uniform(0.03, 0.07))
    times.append(time.monotonic())  # the put's call: its commit comes within it
    store.put_policy({"i": i, "pad": "x" * 2000}, source="bench/store.py")
store.close()
print(json.dumps(times), flush=True)
"""


def seen_latency(state: Path, changes: int, *, feed: bool) -> list[float]:
    """Milliseconds from each put's call (in the writer; it includes the put's own commit) to this process
    seeing its generation."""
    store = Store(str(state))
    start = store.latest_generation()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state), str(changes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    if feed:
        store.wait_for_change(start, 0.01)  # the watcher runs before the first write
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen: dict[int, float] = {}
    last = start
    while last < start + changes:
        if feed:
            gen = store.wait_for_change(last, 5.0)
        else:
            time.sleep(0.2)
            gen = store.latest_generation()
        now = time.monotonic()
        for g in range(last + 1, gen + 1):
            seen[g] = now
        last = max(last, gen)
    times = json.loads(proc.stdout.read())
    proc.wait()
    store.close()
    return [(seen[start + 1 + i] - t) * 1000 for i, t in enumerate(times)]


def agent_rounds(state: Path, rounds: int, *, shared: bool, threads_n: int) -> float:
    """Microseconds per monitor round (3 write transactions), `threads_n` threads writing at once."""
    stores = [Store(str(state))] if shared else [Store(str(state)) for _ in range(threads_n)]
    for v in range(VMS):
        stores[0].enroll_agent(AgentRecord(vm=f"vm{v}", key=b"k" * 32, channel={"type": "unix"}))
    barrier = threading.Barrier(threads_n + 1)

    def work(t: int) -> None:
        store = stores[0 if shared else t]
        barrier.wait()
        for r in range(rounds):
            store.add_events([("agent-beat", f"vm{v}", {"r": r, "t": t}) for v in range(5)])
            store.save_seqs({f"vm{v}": r for v in range(VMS)})
            store.save_agents(
                [AgentRecord(vm=f"vm{v}", key=b"", last_seq=r, last_seen=float(r)) for v in range(VMS)]
            )
        barrier.wait()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    barrier.wait()
    elapsed = time.perf_counter() - t0
    for th in threads:
        th.join()
    for s in stores:
        s.close()
    return elapsed / (rounds * threads_n) * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=60, help="generations the writer stores per mode")
    ap.add_argument("--rounds", type=int, default=2000, help="agent rounds per thread per mode")
    args = ap.parse_args()
    random.seed(13)
    out: dict[str, Any] = {}
    for name, feed in (("poll 0.2 s (before)", False), ("change feed (after)", True)):
        with tempfile.TemporaryDirectory(prefix="hf-bench-store-") as d:
            ms = seen_latency(Path(d), args.changes, feed=feed)
        out[name] = {"p50_ms": statistics.median(ms), "p99_ms": pct(ms, 0.99), "max_ms": max(ms)}
        print(
            f"store write -> seen, {name}: p50 {out[name]['p50_ms']:.2f} ms, p99 {out[name]['p99_ms']:.2f} ms"
        )
    for n in (1, THREADS):
        for name, shared in (("one connection + lock", True), ("connection per thread", False)):
            with tempfile.TemporaryDirectory(prefix="hf-bench-store-") as d:
                us = agent_rounds(Path(d), args.rounds, shared=shared, threads_n=n)
            out[f"{name}, {n} threads"] = {"us_per_round": us}
            print(f"agent monitor round ({n} threads, {VMS} VMs), {name}: {us:.0f} us")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
