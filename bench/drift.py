"""Drift benchmark: from a hand-run `nft flush ruleset` to hyperfence's tables back in the kernel, through the
running daemon, at 10 and 1,000 declared VMs. Run as root from the repository root:

    .venv/bin/python bench/drift.py              # N = 10 and 1,000, 20 flushes each
    .venv/bin/python bench/drift.py --quick      # 5 flushes each

For each N: a lab "bdr" planned with N VMs (only vm1..vm3 created; the policy declares all N), the policy of
bench/apply.py (one rule per VM), the daemon as its own process with `--resync 3600` (so only its nftables
event watch can repair anything here). One flush = `nft flush ruleset` in the lab's host namespace. Times
come from the kernel's own nftables events, read by a netlink listener in this process (hyperfence's
`NftMonitor` adapter, so no `nft monitor` text formatting sits in the measurement): from the flush's
generation (committed by the `nft` process) to the first later generation committed by the daemon that
touched hyperfence's tables (the repair: the kernel holds the tables again when it is announced). After
each flush: the daemon's `drift-repaired` event must be in the store and every hyperfence object must be
back (the same count of tables, chains, sets and rules as before the flush).

Baseline, measured in the same run on the same lab: the daemon stopped, hyperfence's tables deleted, one
`Engine.converge(full=True)` of the same (already compiled) policy timed in this process: what the repair
itself must do, without the detection.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apply import DaemonProc, handles, policy
from common import (
    BenchError,
    env_summary,
    fmt,
    fresh_lab,
    host,
    log,
    median,
    nft_delete_tables,
    percentile,
    require_tools,
    workdir,
)

from hyperfence.adapters.nft import Nft
from hyperfence.adapters.nft_monitor import Generation, NftMonitor
from hyperfence.adapters.store import Store
from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import TABLES

LAB = "bdr"
HF_TABLES = [(t.family, t.name) for t in TABLES]


class Generations:
    """The kernel's nftables generations in the lab's host namespace, each stamped with its arrival time by
    a reader thread that does nothing else (so a generation is stamped when it arrives, not when the
    benchmark gets round to looking)."""

    def __init__(self, netns: str) -> None:
        self.monitor = NftMonitor(HF_TABLES, netns=netns)
        self.q: queue.Queue[tuple[float, Generation] | None] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            batch = self.monitor.read(0.05)
            t = time.monotonic()
            if batch.lost:
                self.q.put(None)
            for g in batch.generations:
                self.q.put((t, g))

    def wait(self, want: Any, timeout: float = 60.0) -> tuple[float, Generation]:
        """The first (arrival time, generation) for which `want(g)` holds; those before it are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError("no such nftables generation within the time limit") from None
            if item is None:
                raise BenchError("the benchmark's own event listener lost events")
            if want(item[1]):
                return item

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.monitor.close()


def wait_log(daemon: DaemonProc, text: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon never logged {text!r}")
        time.sleep(0.05)


def measure_flushes(
    plan: LabPlan, gens: Generations, store: Store, nft: Nft, *, flushes: int, objects: int
) -> tuple[list[float], list[float]]:
    """Milliseconds from each flush's commit to the daemon's first commit (the VM ports closed: the
    fail-closed batch, ruleset/closed.py) and to the commit that brought the whole ruleset back."""
    closed: list[float] = []
    latencies: list[float] = []
    for i in range(flushes):
        before = len(store.events(kind="drift-repaired", limit=100000))
        gens.drain()
        host(plan, ["nft", "flush", "ruleset"])
        t0, flush = gens.wait(lambda g: g.comm == "nft" and g.touched > 0)
        t1, first = gens.wait(lambda g: g.comm != "nft" and g.touched > 0)
        closed.append((t1 - t0) * 1000)
        if first.touched < objects // 2:  # the fail-closed batch (a few objects): the full one follows
            t1, _ = gens.wait(lambda g: g.comm != "nft" and g.touched > 0)
        latencies.append((t1 - t0) * 1000)
        deadline = time.monotonic() + 60
        while len(store.events(kind="drift-repaired", limit=100000)) == before:
            if time.monotonic() > deadline:
                raise BenchError(f"flush {i}: no drift-repaired event")
            time.sleep(0.01)
        back = len(handles(nft))
        if back != objects:
            raise BenchError(f"flush {i}: {back} of {objects} hyperfence objects back")
        log(
            f"flush {i + 1}: closed in {closed[-1]:.1f} ms, repaired in {latencies[-1]:.1f} ms ({flush.describe()})"
        )
        time.sleep(0.3)
    return closed, latencies


def baseline_worker(netns: str, state_dir: str) -> None:
    """`drift.py --baseline-worker NETNS STATE`: its own process (as the daemon is), one Engine; a first
    converge compiles (with the daemon's garbage-collector settings); then per line "go" on stdin: print the monotonic start time, converge(full=True)
    (hyperfence's tables were deleted by the parent), print the whole converge's milliseconds."""
    gc.set_threshold(200_000, 50, 100)  # as run_daemon does: no full collection inside an apply
    engine = Engine(netns=netns, state_dir=state_dir)
    engine.converge(full=True)
    gc.freeze()  # as the daemon does after a change
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.monotonic()
        print(f"start {t0!r}", flush=True)
        _, result = engine.converge(full=True)
        changed = result is not None and result.changed
        print(f"done {(time.monotonic() - t0) * 1000!r} {int(changed)}", flush=True)
    engine.close()


def measure_baseline(
    plan: LabPlan, gens: Generations, sd: Path, reps: int, objects: int
) -> tuple[list[float], list[float]]:
    """One full converge of the (already compiled) policy from an empty kernel, in a process of its own: ms
    from its start to the commit of the whole ruleset (seen as the repair is seen; after the fail-closed
    batch), and ms of the whole converge (with its verification)."""
    worker = subprocess.Popen(
        [sys.executable, __file__, "--baseline-worker", plan.host_netns, str(sd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    to_commit: list[float] = []
    whole: list[float] = []
    try:
        if worker.stdout.readline().strip() != "ready":
            raise BenchError("the baseline worker did not start")
        for _ in range(reps):
            nft_delete_tables(plan, HF_TABLES)
            time.sleep(0.2)
            gens.drain()
            worker.stdin.write("go\n")
            worker.stdin.flush()
            t0 = float(worker.stdout.readline().split()[1])
            t1, first = gens.wait(lambda g: g.comm != "nft" and g.touched > 0)
            if first.touched < objects // 2:  # the fail-closed batch: the full one follows
                t1, _ = gens.wait(lambda g: g.comm != "nft" and g.touched > 0)
            ms, changed = worker.stdout.readline().split()[1:]
            if changed != "1":
                raise BenchError("the baseline converge wrote nothing")
            to_commit.append((t1 - t0) * 1000)
            whole.append(float(ms))
        return to_commit, whole
    finally:
        worker.stdin.close()
        worker.wait(30)


def run_n(n: int, flushes: int, wd: Path) -> dict[str, Any]:
    plan = plan_lab(LAB, n)
    log(f"N={n}: creating lab {LAB} (3 of {n} VMs)")
    fresh_lab(plan, only=3)
    sd = wd / f"state-{n}"
    sd.mkdir()
    store = Store(str(sd))
    store.put_policy(policy(plan, 5201), source="bench/drift.py")
    daemon = DaemonProc(plan, sd)
    nft = Nft(plan.host_netns)
    try:
        start_s = daemon.start(wait_converged=True)
        wait_log(daemon, "watching nftables events")
        time.sleep(1.0 if n < 100 else 5.0)  # the full check the watch asks for when it starts
        objects = len(handles(nft))
        log(f"N={n}: daemon up in {start_s:.2f} s, {objects} hyperfence objects; {flushes} flushes")
        gens = Generations(plan.host_netns)
        try:
            closed, latencies = measure_flushes(plan, gens, store, nft, flushes=flushes, objects=objects)
            daemon.stop()
            log(f"N={n}: baseline (daemon stopped)")
            baseline, whole = measure_baseline(plan, gens, sd, max(3, flushes // 4), objects)
        finally:
            gens.close()
    finally:
        daemon.stop()
        nft.close()
        store.close()
        topology.destroy_lab(LAB)
    return {
        "n": n,
        "objects": objects,
        "closed": closed,
        "latency": latencies,
        "baseline": baseline,
        "whole": whole,
    }


def print_size(r: dict[str, Any]) -> None:
    lat, base, whole = r["latency"], r["baseline"], r["whole"]
    print(f"\nN = {r['n']} VMs ({r['objects']} hyperfence objects in the kernel), {len(lat)} flushes")
    closed = r["closed"]
    print(
        f"  flush -> every VM port closed (first repair commit): p50 {fmt(median(closed), 1)} ms, "
        f"p99 {fmt(percentile(closed, 99), 1)} ms, max {fmt(max(closed), 1)} ms"
    )
    print(
        f"  flush -> tables back (repair committed): p50 {fmt(median(lat), 1)} ms, "
        f"p99 {fmt(percentile(lat, 99), 1)} ms, max {fmt(max(lat), 1)} ms"
    )
    print(
        f"  baseline, one full converge from an empty kernel, start -> commit (no detection): "
        f"p50 {fmt(median(base), 1)} ms, max {fmt(max(base), 1)} ms ({len(base)} runs); "
        f"with its verification: p50 {fmt(median(whole), 1)} ms"
    )
    print(f"  detection + scheduling (p50 repair - p50 baseline): {fmt(median(lat) - median(base), 1)} ms")
    print(f"  all repairs, ms: {', '.join(fmt(x, 1) for x in lat)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 flushes per N instead of 20")
    ap.add_argument("--sizes", default="10,1000", help="comma-separated VM counts (default 10,1000)")
    ap.add_argument("--baseline-worker", nargs=2, metavar=("NETNS", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return 0
    flushes = 5 if args.quick else 20
    require_tools("nft")
    wd = workdir("hf-bench-drift-")
    t_start = time.monotonic()
    try:
        results = [run_n(int(n), flushes, wd) for n in args.sizes.split(",")]
    finally:
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)
    print(f"hyperfence drift benchmark ({env_summary()}), lab {LAB}, daemon --resync 3600")
    print("policy: one rule per VM (vm_i -> vm_i+1 tcp/80) + rule `bench`; drift: `nft flush ruleset`")
    for r in results:
        print_size(r)
    print(f"\ntotal wall time {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
