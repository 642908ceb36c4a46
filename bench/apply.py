"""Apply benchmark: from a one-rule policy change to the kernel holding it, through the running daemon, at
100 and 1,000 declared VMs (goal: <= 50 ms p99 at 1,000). Run as root from the repository root:

    .venv/bin/python bench/apply.py            # N = 100 and 1,000, 50 changes each, plus a daemon restart
    .venv/bin/python bench/apply.py --quick    # N = 100 and 1,000, 5 changes each

For each N: a lab "bap" planned with N VMs (only vm1..vm3 created; the policy declares all N), the daemon
started as its own process (`hyperfence --netns hf-bap-host --state-dir DIR daemon --resync 3600`; if that
entry point does not start, the same `hyperfence.daemon.run_daemon` via `python -c`, and the output says so).
The base policy: one rule per VM (vm_i -> vm_i+1 tcp/80) plus the rule `bench` (vm1 -> vm2 tcp/5201).

One change = what `hyperfence policy apply` does: write the new document to the store, then ask the daemon
over its control socket to reconcile, and wait for its answer. The change toggles `bench`'s port
5201 <-> 5202 (the kernel must replace one rule in vm1's egress chain and one in vm2's ingress chain).
Three times per change, all from just before the store write:
  - wall: until the daemon's answer arrived (what `policy apply` waits for);
  - kernel: until `nft monitor` (its own process in the host namespace) printed the first event of the
    change's transaction: the kernel committed it then;
  - daemon: the `ms` the daemon reports (its Firewall.converge only: plan, apply, verify; not the compile).
After each answer the rule is read back with libnftables (our own context) and must carry the new port.

Restart at each N: SIGKILL the daemon, start it again, time until its first converge finished (its control
socket reports a policy); `nft monitor` must see no event, and every rule handle must be unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BenchError,
    env_summary,
    fmt,
    fresh_lab,
    log,
    median,
    nft_delete_tables,
    percentile,
    require_tools,
    workdir,
)

from hyperfence.adapters.nft import Nft
from hyperfence.adapters.store import Store
from hyperfence.daemon import request
from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import TABLES, compile_ruleset, vm_sid

LAB = "bap"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
HF_TABLES = [(t.family, t.name) for t in TABLES]
PORTS = (5201, 5202)


def policy(plan: LabPlan, port: int) -> dict[str, Any]:
    n = len(plan.vms)
    rules: list[dict[str, Any]] = [
        {"id": f"peer{i}", "from": f"vm:vm{i}", "to": f"vm:vm{i % n + 1}", "services": ["tcp/80"]}
        for i in range(1, n + 1)
    ]
    rules.append({"id": "bench", "from": "vm:vm1", "to": "vm:vm2", "services": [f"tcp/{port}"]})
    return lab_policy(plan, rules)


def label_policy(plan: LabPlan, port: int) -> dict[str, Any]:
    """The same number of VMs, but a policy of 5 label rules (for the compile-cost comparison only)."""
    labels = {vm.name: {"tier": ("web", "app", "db")[i % 3]} for i, vm in enumerate(plan.vms)}
    rules = [
        {"id": "web-app", "from": "label:tier=web", "to": "label:tier=app", "services": ["tcp/8080"]},
        {"id": "app-db", "from": "label:tier=app", "to": "label:tier=db", "services": ["tcp/5432"]},
        {"id": "out-web", "from": "outside", "to": "label:tier=web", "services": ["tcp/443"]},
        {"id": "ping", "from": "vms", "to": "host", "protocol": "icmp"},
        {"id": "bench", "from": "vm:vm1", "to": "vm:vm2", "services": [f"tcp/{port}"]},
    ]
    return lab_policy(plan, rules, labels=labels)


def compile_ms(doc: dict[str, Any], reps: int = 3) -> tuple[float, float, float]:
    """Median (parse, resolve, compile) milliseconds of `doc`, in this process."""
    p, r, c = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        pol = parse_policy(doc)
        t1 = time.perf_counter()
        res = resolve_policy(pol)
        t2 = time.perf_counter()
        compile_ruleset(res)
        t3 = time.perf_counter()
        p.append((t1 - t0) * 1000)
        r.append((t2 - t1) * 1000)
        c.append((t3 - t2) * 1000)
    return median(p), median(r), median(c)


# ------------------------------------------------------------------------------------------ the daemon


class DaemonProc:
    """The daemon as its own process (so SIGKILL and a restart are real)."""

    def __init__(self, plan: LabPlan, state_dir: Path) -> None:
        self.plan = plan
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.how = ""
        self.log_path = state_dir / "daemon.log"

    def _argv_cli(self) -> list[str]:
        return [
            str(VENV_BIN / "hyperfence"),
            "--netns",
            self.plan.host_netns,
            "--state-dir",
            str(self.state_dir),
            "daemon",
            "--resync",
            "3600",
        ]

    def _argv_module(self) -> list[str]:
        code = (
            "import logging; "
            "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s'); "
            "from hyperfence.daemon import run_daemon; "
            f"run_daemon(netns={self.plan.host_netns!r}, state_dir={str(self.state_dir)!r}, "
            "policy_file=None, poll=0.2, resync=3600.0)"
        )
        return [str(VENV_BIN / "python"), "-c", code]

    def start(self, *, wait_converged: bool) -> float:
        """Start; return seconds until it answers (and, if asked, until its first converge finished)."""
        attempts = [("cli", self._argv_cli()), ("module", self._argv_module())]
        if self.how:  # a restart uses what worked before
            attempts = [a for a in attempts if a[0] == self.how]
        for how, argv in attempts:
            t0 = time.perf_counter()
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
                )
            if self._wait_ready(wait_converged, timeout=600):
                self.how = how
                return time.perf_counter() - t0
            self.stop()
            log(f"daemon via {how} did not start: see {self.log_path}")
        raise BenchError(
            f"the daemon did not start; log:\n{self.log_path.read_text(errors='replace')[-2000:]}"
        )

    def _wait_ready(self, wait_converged: bool, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, ValueError):
                reply = request(str(self.state_dir), {"op": "status"}, timeout=5)
                if reply is not None and reply.get("ok") and (not wait_converged or reply.get("policy")):
                    return True
            time.sleep(0.002)
        return False

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Monitor:
    """`nft -j monitor` in the host namespace; every line is timestamped on arrival."""

    def __init__(self, plan: LabPlan) -> None:
        self.proc = topology.popen_in_host(plan, ["nft", "-j", "monitor"], stdout=subprocess.PIPE)
        self.q: queue.Queue[tuple[float, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(0.3)  # let it subscribe

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put((time.perf_counter(), line.decode(errors="replace").strip()))

    def drain(self) -> list[tuple[float, str]]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.q.get_nowait())
        return out

    def first_after(self, t0: float, timeout: float = 2.0) -> tuple[float, str] | None:
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                t, line = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if t >= t0 and line:
                return t, line

    def close(self) -> None:
        topology.stop_process(self.proc)


def rule_ports(nft: Nft, chain: str, comment: str) -> str:
    objs = nft.list({"chain": {"family": "bridge", "table": "hyperfence", "name": chain}})
    for o in objs:
        r = o.get("rule")
        if r and r.get("comment") == comment:
            return json.dumps(r["expr"])
    return ""


def handles(nft: Nft) -> list[tuple[str, str, int, str]]:
    out = []
    for fam, name in HF_TABLES:
        for o in nft.list({"table": {"family": fam, "name": name}}):
            kind = next(iter(o))
            body = o[kind]
            out.append((kind, body.get("chain", body.get("name", "")), int(body.get("handle", 0)), fam))
    return sorted(out)


# ---------------------------------------------------------------------------------------------- one N


def measure_changes(
    *, sd: Path, store: Store, nft: Nft, monitor: Monitor, docs: dict[int, dict[str, Any]], changes: int
) -> dict[str, Any]:
    chain_out = f"{vm_sid(f'{LAB}-vm1')}_out"
    chain_in = f"{vm_sid(f'{LAB}-vm2')}_in"
    walls, kernels, daemons, puts, unchanged, events = [], [], [], [], 0, []
    reply: dict[str, Any] | None = None
    for i in range(changes):
        port = PORTS[(i + 1) % 2]
        monitor.drain()
        time.sleep(0.05)
        t0 = time.perf_counter()
        store.put_policy(docs[port], source="bench/apply.py")
        puts.append((time.perf_counter() - t0) * 1000)
        reply = request(str(sd), {"op": "reconcile"}, timeout=600)
        t1 = time.perf_counter()
        if not reply or not reply.get("ok"):
            raise BenchError(f"change {i}: the daemon failed: {reply}")
        first = monitor.first_after(t0)
        for chain in (chain_out, chain_in):
            expr = rule_ports(nft, chain, "rule:bench#1")
            if f'"right": {port}' not in expr:
                raise BenchError(f"change {i}: {chain} does not hold port {port}: {expr}")
        walls.append((t1 - t0) * 1000)
        daemons.append(float(reply.get("ms") or 0.0))
        if not reply.get("changed"):
            unchanged += 1  # the daemon's poll loop applied it first; our request found nothing to do
        if first is None:
            raise BenchError(f"change {i}: nft monitor saw no event")
        kernels.append((first[0] - t0) * 1000)
        time.sleep(0.05)
        events.append(len(monitor.drain()) + 1)
    return {
        "wall": walls,
        "kernel": kernels,
        "daemon": daemons,
        "store": puts,
        "unchanged": unchanged,
        "events": median(events),
        "summary": reply.get("summary") if reply else None,
    }


def measure_restart(daemon: DaemonProc, store: Store, nft: Nft, monitor: Monitor) -> dict[str, Any]:
    """SIGKILL, start again, time to the end of the first converge; nothing may be written to the kernel."""
    before = handles(nft)
    events_before = len(store.events(limit=100000))
    monitor.drain()
    daemon.kill()
    restart_s = daemon.start(wait_converged=True)
    time.sleep(0.5)
    new_events = store.events(limit=100000)[events_before:]
    return {
        "restart_s": restart_s,
        "restart_nft_events": [line for _, line in monitor.drain()],
        "restart_handles_same": handles(nft) == before,
        "restart_objects": len(before),
        "restart_store_events": [e["kind"] for e in new_events],
    }


def nft_call_costs(nft: Nft, reps: int = 5) -> dict[str, float]:
    """Median ms of single libnftables calls on our own context: does a call cost follow the table size?"""
    chain = f"{vm_sid(f'{LAB}-vm2')}_in"
    shared = next(
        o["set"]["name"]
        for o in nft.list({"table": {"family": "bridge", "name": "hyperfence"}})
        if "set" in o and o["set"]["name"].startswith("s_")
    )
    arp = {"family": "bridge", "table": "hyperfence", "name": shared, "elem": ["10.77.3.250"]}
    calls = {
        "list_chain": lambda: nft.list({"chain": {"family": "bridge", "table": "hyperfence", "name": chain}}),
        "list_inet": lambda: nft.list({"table": {"family": "inet", "name": "hyperfence"}}),
        "elem_add_del": lambda: nft.apply(
            {"nftables": [{"add": {"element": arp}}, {"delete": {"element": arp}}]}
        ),
    }
    out = {}
    for name, fn in calls.items():
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        out[f"call_{name}"] = median(ts)
    return out


def run_n(n: int, changes: int, wd: Path) -> dict[str, Any]:
    plan = plan_lab(LAB, n)
    res: dict[str, Any] = {"n": n}
    sd = wd / f"state-{n}"
    sd.mkdir(parents=True)
    daemon = DaemonProc(plan, sd)
    monitor: Monitor | None = None
    nft: Nft | None = None
    store: Store | None = None
    try:
        log(f"N={n}: creating lab {LAB} ({n} VMs planned, 3 created)")
        fresh_lab(plan, only=3)
        docs = {p: policy(plan, p) for p in PORTS}
        res["compile_ms"] = compile_ms(docs[PORTS[0]])
        res["compile_label_ms"] = compile_ms(label_policy(plan, PORTS[0]))
        log(f"N={n}: starting the daemon")
        res["daemon_start_s"] = daemon.start(wait_converged=False)
        res["daemon_how"] = daemon.how
        store = Store(str(sd))
        nft = Nft(plan.host_netns)

        # Initial apply: empty kernel -> the whole policy.
        t0 = time.perf_counter()
        store.put_policy(docs[PORTS[0]], source="bench/apply.py")
        reply = request(str(sd), {"op": "reconcile"}, timeout=600)
        res["initial_wall_ms"] = (time.perf_counter() - t0) * 1000
        if not reply or not reply.get("ok"):
            raise BenchError(f"initial apply failed: {reply}")
        res["initial_daemon_ms"] = reply.get("ms")
        res["initial_summary"] = reply.get("summary")

        monitor = Monitor(plan)
        log(f"N={n}: {changes} one-rule changes")
        res.update(measure_changes(sd=sd, store=store, nft=nft, monitor=monitor, docs=docs, changes=changes))
        log(f"N={n}: daemon restart")
        res.update(measure_restart(daemon, store, nft, monitor))
        res.update(nft_call_costs(nft))
        return res
    finally:
        if monitor is not None:
            monitor.close()
        daemon.stop()
        if nft is not None:
            nft.close()
        if store is not None:
            store.close()
        res["daemon_log_tail"] = (
            daemon.log_path.read_text(errors="replace").splitlines()[-6:] if daemon.log_path.exists() else []
        )
        topology.destroy_lab(LAB)


class Timed:
    """Wraps an Nft's apply/list to add up their time (this process only)."""

    def __init__(self, nft: Nft) -> None:
        self.spent = {"apply": 0.0, "list": 0.0}
        self.calls = {"apply": 0, "list": 0}
        real_apply, real_list = nft.apply, nft.list

        def apply(batch: dict[str, Any]) -> None:
            t = time.perf_counter()
            try:
                real_apply(batch)
            finally:
                self.spent["apply"] += time.perf_counter() - t
                self.calls["apply"] += 1

        def list_(what: dict[str, Any]) -> list[Any]:
            t = time.perf_counter()
            try:
                return real_list(what)
            finally:
                self.spent["list"] += time.perf_counter() - t
                self.calls["list"] += 1

        nft.apply = apply  # type: ignore[method-assign]
        nft.list = list_  # type: ignore[method-assign]

    def reset(self) -> None:
        self.spent = {"apply": 0.0, "list": 0.0}
        self.calls = {"apply": 0, "list": 0}


def initial_breakdown(n: int, wd: Path) -> dict[str, float]:
    """Where the time goes, in-process with an instrumented Engine (the daemon's code path): the initial
    apply, a no-op full converge (what a restart pays after compiling), and a one-rule change."""
    plan = plan_lab(LAB, n)
    fresh_lab(plan, only=3)
    engine = Engine(netns=plan.host_netns, state_dir=str(wd / f"breakdown-{n}"))
    out: dict[str, float] = {}
    try:
        timed = Timed(engine.nft)
        engine.store.put_policy(policy(plan, PORTS[0]), source="bench/apply.py")
        t0 = time.perf_counter()
        engine.compiled()
        t1 = time.perf_counter()
        _, result = engine.converge(full=True)
        t2 = time.perf_counter()
        assert result is not None
        out.update(
            compile=t1 - t0,
            converge=t2 - t1,
            nft_apply=timed.spent["apply"],
            nft_list=timed.spent["list"],
            other=(t2 - t1) - timed.spent["apply"] - timed.spent["list"],
            commands=float(result.commands),
        )
        timed.reset()
        t3 = time.perf_counter()
        engine.converge(full=True)
        out.update(noop_converge=time.perf_counter() - t3, noop_list=timed.spent["list"])

        for label in ("asis",):
            for i, port in enumerate((PORTS[1], PORTS[0], PORTS[1], PORTS[0])):
                engine.store.put_policy(policy(plan, port), source="bench/apply.py")
                t4 = time.perf_counter()
                engine.compiled()
                t5 = time.perf_counter()
                timed.reset()
                _, res = engine.converge()
                t6 = time.perf_counter()
                assert res is not None
                assert res.changed
                if i == 0:
                    continue  # warm-up
                for key, value in (
                    ("compile", t5 - t4),
                    ("converge", t6 - t5),
                    ("apply", timed.spent["apply"]),
                    ("list", timed.spent["list"]),
                ):
                    out[f"{label}_{key}"] = out.get(f"{label}_{key}", 0.0) + value / 3
        return out
    finally:
        engine.close()
        nft_delete_tables(plan, HF_TABLES)
        topology.destroy_lab(LAB)


# ------------------------------------------------------------------------------------------------ main


def pct_line(name: str, xs: list[float]) -> str:
    return (
        f"  {name:<34} p50 {fmt(percentile(xs, 50), 1):>8}  p95 {fmt(percentile(xs, 95), 1):>8}  "
        f"p99 {fmt(percentile(xs, 99), 1):>8}  max {fmt(max(xs), 1):>8}  ms"
    )


def print_size(r: dict[str, Any]) -> None:
    n = r["n"]
    p, rs, c = r["compile_ms"]
    lp, lr, lc = r["compile_label_ms"]
    print(
        f"\nN = {n} declared VMs (daemon started via {r['daemon_how']!r}, ready in {r['daemon_start_s']:.2f} s)"
    )
    print(
        f"  initial apply (empty kernel): wall {r['initial_wall_ms']:.0f} ms, daemon-reported "
        f"{r['initial_daemon_ms']} ms, {r['initial_summary']}"
    )
    print(f"  one-rule change ({len(r['wall'])} changes, last summary {r['summary']}):")
    print(pct_line("wall (store write -> daemon reply)", r["wall"]))
    print(pct_line("kernel (store write -> nft monitor)", r["kernel"]))
    print(pct_line("daemon-reported converge ms", r["daemon"]))
    print(pct_line("store write (policy apply side)", r["store"]))
    print(
        f"  the daemon's poll loop applied {r['unchanged']} of {len(r['wall'])} changes before our request "
        f"(reply changed=false); nft monitor lines per change: {r['events']:.0f}"
    )
    print(
        f"  in-process, same document: parse {p:.0f} ms + resolve {rs:.0f} ms + compile {c:.0f} ms = "
        f"{p + rs + c:.0f} ms per policy version (a 5-label-rule policy at this N: {lp + lr + lc:.0f} ms)"
    )
    verdict = "PASS" if percentile(r["wall"], 99) <= 50 else "FAIL"
    if n == 1000:
        print(f"  goal p99 <= 50 ms at 1,000 VMs (wall): {percentile(r['wall'], 99):.0f} ms {verdict}")
    print(
        f"  restart (SIGKILL, start, first converge done): {r['restart_s']:.2f} s; nft monitor events during "
        f"restart: {len(r['restart_nft_events'])}; all {r['restart_objects']} object handles unchanged: "
        f"{r['restart_handles_same']}; new store events: {r['restart_store_events'] or 'none'}"
    )
    for line in r["restart_nft_events"][:5]:
        print(f"    event: {line[:200]}")
    print(
        f"  single libnftables calls (median of 5): list one chain of bridge hyperfence "
        f"{r['call_list_chain']:.1f} ms, list table inet hyperfence {r['call_list_inet']:.1f} ms, "
        f"add+delete one set element {r['call_elem_add_del']:.1f} ms"
    )


def print_breakdown(b: dict[str, float], n: int) -> None:
    print(
        f"\nin-process at N={n} (the daemon's code path, instrumented):\n"
        f"  initial apply: compile {b['compile']:.2f} s, converge {b['converge']:.2f} s ({b['commands']:.0f} "
        f"commands) = libnftables apply {b['nft_apply']:.2f} s + listing for verify {b['nft_list']:.2f} s + "
        f"python (plan, parse listing, describe_drift) {b['other']:.2f} s"
    )
    print(
        f"  no-op full converge (what a restart pays after compiling): {b['noop_converge']:.2f} s, of which "
        f"listing {b['noop_list']:.2f} s"
    )
    for label, title in (("asis", "as is"),):
        print(
            f"  one-rule change, {title}: compile {b[label + '_compile'] * 1000:.0f} ms + converge "
            f"{b[label + '_converge'] * 1000:.0f} ms (libnftables apply {b[label + '_apply'] * 1000:.0f} ms, "
            f"list {b[label + '_list'] * 1000:.0f} ms), mean of 3"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 changes per N instead of 50")
    ap.add_argument("--sizes", default="100,1000", help="comma-separated VM counts (default 100,1000)")
    args = ap.parse_args()
    changes = 5 if args.quick else 50
    sizes = [int(x) for x in args.sizes.split(",")]
    require_tools("nft")
    wd = workdir("hf-bench-apply-")
    t_start = time.perf_counter()
    results = []
    try:
        for n in sizes:
            results.append(run_n(n, changes, wd))
        log(f"in-process breakdown of the initial apply at N={max(sizes)}")
        breakdown = initial_breakdown(max(sizes), wd)
    finally:
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)

    print(f"hyperfence apply benchmark ({env_summary()}), lab {LAB}, {changes} one-rule changes per size")
    print(
        "policy: one rule per VM (vm_i -> vm_i+1 tcp/80) + rule `bench` (vm1 -> vm2 tcp/PORT), PORT toggled"
    )
    for r in results:
        print_size(r)
    print_breakdown(breakdown, max(sizes))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
