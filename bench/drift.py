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
import shutil
import sys
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
from hyperfence.lab.plan import plan_lab
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import TABLES

LAB = "bdr"
HF_TABLES = [(t.family, t.name) for t in TABLES]


def wait_generation(monitor: NftMonitor, want: Any, timeout: float = 60.0) -> tuple[float, Generation]:
    """The arrival time and the first generation for which `want(g)` holds."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        batch = monitor.read(0.05)
        t = time.perf_counter()
        if batch.lost:
            raise BenchError("the benchmark's own event listener lost events")
        for g in batch.generations:
            if want(g):
                return t, g
    raise BenchError("no such nftables generation within the time limit")


def wait_log(daemon: DaemonProc, text: str, timeout: float = 600.0) -> None:
    deadline = time.perf_counter() + timeout
    while text not in daemon.log_path.read_text(errors="replace"):
        if time.perf_counter() > deadline:
            raise BenchError(f"the daemon never logged {text!r}")
        time.sleep(0.05)


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
    latencies: list[float] = []
    try:
        start_s = daemon.start(wait_converged=True)
        wait_log(daemon, "watching nftables events")
        time.sleep(1.0 if n < 100 else 5.0)  # the full check the watch asks for when it starts
        objects = len(handles(nft))
        log(f"N={n}: daemon up in {start_s:.2f} s, {objects} hyperfence objects; {flushes} flushes")
        with NftMonitor(HF_TABLES, netns=plan.host_netns) as monitor:
            for i in range(flushes):
                before = len(store.events(kind="drift-repaired", limit=100000))
                host(plan, ["nft", "flush", "ruleset"])
                t0, flush = wait_generation(monitor, lambda g: g.comm == "nft" and g.touched > 0)
                t1, _ = wait_generation(monitor, lambda g: g.comm != "nft" and g.touched > 0)
                latencies.append((t1 - t0) * 1000)
                deadline = time.perf_counter() + 60
                while len(store.events(kind="drift-repaired", limit=100000)) == before:
                    if time.perf_counter() > deadline:
                        raise BenchError(f"flush {i}: no drift-repaired event")
                    time.sleep(0.01)
                back = len(handles(nft))
                if back != objects:
                    raise BenchError(f"flush {i}: {back} of {objects} hyperfence objects back")
                log(f"N={n}: flush {i + 1}: repaired in {latencies[-1]:.1f} ms ({flush.describe()})")
                time.sleep(0.3)
        daemon.stop()
        # The baseline: one full converge of the same compiled policy from an empty kernel, in this process.
        engine = Engine(netns=plan.host_netns, state_dir=str(sd))
        try:
            engine.converge(full=True)
            baseline: list[float] = []
            for _ in range(max(3, flushes // 4)):
                nft_delete_tables(plan, HF_TABLES)
                t0 = time.perf_counter()
                _, result = engine.converge(full=True)
                baseline.append((time.perf_counter() - t0) * 1000)
                if result is None or not result.changed:
                    raise BenchError("the baseline converge wrote nothing")
        finally:
            engine.close()
    finally:
        daemon.stop()
        nft.close()
        store.close()
        topology.destroy_lab(LAB)
    return {"n": n, "objects": objects, "latency": latencies, "baseline": baseline}


def print_size(r: dict[str, Any]) -> None:
    lat, base = r["latency"], r["baseline"]
    print(f"\nN = {r['n']} VMs ({r['objects']} hyperfence objects in the kernel), {len(lat)} flushes")
    print(
        f"  flush -> tables back (repair committed): p50 {fmt(median(lat), 1)} ms, "
        f"p99 {fmt(percentile(lat, 99), 1)} ms, max {fmt(max(lat), 1)} ms"
    )
    print(
        f"  baseline, one full converge from an empty kernel (no detection): p50 {fmt(median(base), 1)} ms, "
        f"max {fmt(max(base), 1)} ms ({len(base)} runs)"
    )
    print(f"  detection + scheduling (p50 repair - p50 baseline): {fmt(median(lat) - median(base), 1)} ms")
    print(f"  all repairs, ms: {', '.join(fmt(x, 1) for x in lat)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 flushes per N instead of 20")
    ap.add_argument("--sizes", default="10,1000", help="comma-separated VM counts (default 10,1000)")
    args = ap.parse_args()
    flushes = 5 if args.quick else 20
    require_tools("nft")
    wd = workdir("hf-bench-drift-")
    t_start = time.perf_counter()
    try:
        results = [run_n(int(n), flushes, wd) for n in args.sizes.split(",")]
    finally:
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)
    print(f"hyperfence drift benchmark ({env_summary()}), lab {LAB}, daemon --resync 3600")
    print("policy: one rule per VM (vm_i -> vm_i+1 tcp/80) + rule `bench`; drift: `nft flush ruleset`")
    for r in results:
        print_size(r)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
