"""What splitting the VMs over several nftables tables ("shards") would cost every packet: the decision
behind issue 13's kernel commit cost. Run as root from the repository root:

    .venv/bin/python bench/shards.py                # 3 interleaved repetitions of 3 s (~3 min)
    .venv/bin/python bench/shards.py --reps 1 --seconds 1 --shards 0,4

Why: nf_tables validates a whole table whenever a rule with a verdict or a set lookup is committed to it, so a
one-rule change at 10,000 VMs spends ~45 ms in the kernel (bench/README.md). With the VMs split over K
tables, a change would validate one table of N/K VMs; but every table has its own base chains, and a packet
walks the base chains of every table at each hook (nftables has no jump across tables). This measures that
walk: the lab's three VMs filtered by hyperfence (1,000 VMs declared, as bench/dataplane.py's case b), plus
K-1 more bridge tables shaped like shards (base chains at the guard's, egress's and ingress's hooks, each
dispatching through a verdict map of 500 other VMs' ports to their chains), which the benchmark's packets
pass through without a match, as they would pass the shards that do not hold their VMs.

Printed per K: 64-byte UDP kpps (established flow, and every packet new), ping RTT (median of 200 at 5 ms,
mean of 2,000 back-to-back), and each as a paired ratio to K = 1 (hyperfence as it is) within a repetition.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    build_udpflood,
    conntrack_flush,
    env_summary,
    fmt,
    fresh_lab,
    log,
    median,
    nft_delete_tables,
    nft_load,
    ping_busy_rtt_us,
    ping_rtt_us,
    require_tools,
    udp_kpps,
    workdir,
)
from dataplane import hyperfence_document

from hyperfence.lab import topology
from hyperfence.lab.plan import plan_lab
from hyperfence.model.kernel import Flavour
from hyperfence.reconcile.engine import Engine

LAB = "bsh"
PER_SHARD = 500


def shard_table(k: int) -> str:
    """Bridge table hfshard<k>: hyperfence's three bridge hooks, each dispatching 500 ports (none of the lab's)
    to per-VM chains, as a shard holding 500 other VMs would."""
    name = f"hfshard{k}"
    lines = [f"table bridge {name} {{"]
    for m in ("guard", "out", "in"):
        lines.append(f"  map {m}_ports {{ type ifname : verdict; }}")
    for i in range(PER_SHARD):
        for m in ("guard", "out", "in"):
            lines.append(f"  chain s{k}v{i}_{m} {{ counter accept; }}")
    lines += [
        "  chain guard { type filter hook prerouting priority -299; iifname vmap @guard_ports; }",
        "  chain egress { type filter hook prerouting priority 11; iifname vmap @out_ports; }",
        "  chain ingress { type filter hook postrouting priority 11; oifname vmap @in_ports; }",
        "}",
    ]
    for m in ("guard", "out", "in"):
        elems = ", ".join(f'"x{k}p{i}" : jump s{k}v{i}_{m}' for i in range(PER_SHARD))
        lines.append(f"add element bridge {name} {m}_ports {{ {elems} }}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--shards", default="1,4,10,20", help="K values: hyperfence's table + K-1 shard tables")
    args = ap.parse_args()
    ks = [int(k) for k in args.shards.split(",")]
    require_tools("nft", "conntrack", "ping", "gcc", "taskset")
    wd = workdir("hf-bench-sh-")
    plan = plan_lab(LAB, 1000)
    engine: Engine | None = None
    results: dict[int, dict[str, list[float]]] = {k: {} for k in ks}
    t_start = time.perf_counter()
    try:
        tool = build_udpflood(wd)
        fresh_lab(plan, only=3)
        engine = Engine(netns=plan.host_netns, state_dir=str(wd / "state"), flavour=Flavour.BR_NETFILTER)
        engine.store_policy(hyperfence_document(plan), source="bench/shards.py")
        engine.converge(full=True)
        for rep in range(args.reps):
            for k in ks[rep % len(ks) :] + ks[: rep % len(ks)]:
                extra = [("bridge", f"hfshard{j}") for j in range(1, k)]
                if extra:
                    nft_load(plan, "".join(shard_table(j) for j in range(1, k)))
                try:
                    conntrack_flush(plan)
                    r = results[k]
                    r.setdefault("est", []).append(
                        udp_kpps(plan, tool, "vm1", "vm2", seconds=args.seconds, mode="est")
                    )
                    r.setdefault("new", []).append(
                        udp_kpps(plan, tool, "vm1", "vm2", seconds=args.seconds, mode="new")
                    )
                    r.setdefault("rtt", []).append(ping_rtt_us(plan, "vm1", "vm3", 200)[0])
                    r.setdefault("busy", []).append(ping_busy_rtt_us(plan, "vm1", "vm3", 2000))
                    log(
                        f"rep {rep} K={k}: est {r['est'][-1]:.0f} kpps, new {r['new'][-1]:.0f} kpps, "
                        f"rtt {r['rtt'][-1]:.1f} us, busy rtt {r['busy'][-1]:.2f} us"
                    )
                finally:
                    nft_delete_tables(plan, extra)
        print(f"hyperfence shard-cost benchmark ({env_summary()}), lab {LAB}: 1,000 VMs declared, 3 created")
        print(
            f"K tables at each bridge hook: hyperfence's + K-1 shards of {PER_SHARD} other VMs each; "
            f"{args.reps} reps x {args.seconds:g} s, medians; ratios paired per repetition against K={ks[0]}"
        )
        base = results[ks[0]]
        print(f"  {'K':>3} {'UDP est kpps':>14} {'UDP new kpps':>14} {'RTT us':>9} {'busy RTT us':>12}")
        for k in ks:
            r = results[k]
            ratio = {m: median([a / b for a, b in zip(r[m], base[m], strict=True)]) for m in ("est", "new")}
            delta = {m: median([a - b for a, b in zip(r[m], base[m], strict=True)]) for m in ("rtt", "busy")}
            print(
                f"  {k:>3} {fmt(median(r['est']), 0):>6} (x{fmt(ratio['est'])}) {fmt(median(r['new']), 0):>6} "
                f"(x{fmt(ratio['new'])}) {fmt(median(r['rtt']), 1):>5} ({delta['rtt']:+.1f}) "
                f"{fmt(median(r['busy']), 2):>6} ({delta['busy']:+.2f})"
            )
        print(f"total wall time {time.perf_counter() - t_start:.0f} s")
        return 0
    finally:
        if engine is not None:
            engine.close()
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
