"""Apply benchmark: from a one-rule policy change to the kernel holding it, through the running daemon, at
100, 1,000 and 10,000 declared VMs (goals: <= 50 ms p99 at 1,000; issue 13: p50 and p99 at 10,000 <= 2x
those at 100, and a restart at 1,000 VMs ready in <= 1 s writing nothing). Run as root from the repository
root:

    .venv/bin/python bench/apply.py                      # N = 100, 1,000 (50 changes), 10,000 (20), restarts
    .venv/bin/python bench/apply.py --quick              # 5 changes per N
    .venv/bin/python bench/apply.py --sizes 100,1000     # only these N (any N >= 1)
    .venv/bin/python bench/apply.py --changes 50 --large-changes 20 --breakdown-n 10000
    .venv/bin/python bench/apply.py --chains declared    # every declared VM gets chains (a host with all N)

Chains: as the product does by default (`hyperfence --chains local`), only the VMs whose port is on this
host's bridges get chains (here vm1..vm3, the lab's namespaces); the other declared VMs are addresses in the
sets of the rules that name them, as OpenStack's and NSX's host agents program only their own ports. So the
kernel's table follows this host's VMs and the policy's rules about them, not every VM declared. With
`--chains declared` every declared VM gets chains, as every run before issue 13's last session measured:
what a host that really holds N VMs pays (the kernel validates the whole table at every commit).

For each N: a lab "bap" with vm1..vm3 created as namespaces; the policy declares all N VMs. Up to 1,000 VMs
the declared VMs are the lab plan's own (`plan_lab`, subnet 10.77.0.0/22, as in every earlier run); beyond
1,000 (more than a /22 and `plan_lab` hold) the same scheme goes on in 10.77.0.0/18 (vm i = 10.77.0.0 +
10 + i, MAC 02:77:00:00:HH:LL, port vp<i>; vm1..vm1,000 unchanged). The daemon is started as its own
process (`hyperfence --netns hf-bap-host --state-dir DIR daemon --resync 3600`; if that entry point does not
start, the same `hyperfence.daemon.run_daemon` via `python -c`, and the output says so). The base policy:
one rule per VM (vm_i -> vm_i+1 tcp/80) plus the rule `bench` (vm1 -> vm2 tcp/5201).

One change = what `hyperfence policy apply` does: write the new document to the store, then ask the daemon
over its control socket to reconcile, and wait for its answer. The change toggles `bench`'s port
5201 <-> 5202 (the kernel must replace one rule in vm1's egress chain and one in vm2's ingress chain).
Measured per change, all from just before the store write:
  - wall: until the daemon's answer arrived (what `policy apply` waits for);
  - kernel: until the first nftables event of the change's transaction reached a netlink listener of our
    own in the host namespace (`NL_LISTENER`, its own process): the kernel committed it then (earlier
    runs used `nft -j monitor`, which cannot start at 10,000 VMs in reasonable time);
  - daemon: the `ms` of the daemon's answer (all of its work: load, parse, resolve, compile, plan, apply,
    verify) and its `kernel_ms` (plan, apply, verify only), where the daemon reports them.
After each answer the rule is read back with libnftables (our own context) and must carry the new port.
Printed at the end: p50 and p99 of each at every N and the ratios N / smallest N.

Restart at each N: SIGKILL the daemon, start it again, time until its first converge finished (its control
socket reports a policy), then until it is idle (its drift watch asks for one more full converge when it
starts); the listener must see no nftables event, and every object handle must be unchanged.
Also at each N: the initial apply (empty kernel -> the whole policy: time, the daemon's RSS, the kernel's
unreclaimable slab growth), and parse / resolve / compile of the whole document in this process.

Finally, at one N (`--breakdown-n`, default the largest), the daemon's code path in this process (an
`Engine`, with the daemon's GC settings): the initial apply, a no-op full converge (what a restart pays
after compiling), one-rule changes timed phase by phase (store read, parse, resolve, compile, bridge ports,
plan, libnftables apply, verify, the rest) and one change under cProfile: where a change's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import io
import json
import math
import os
import pstats
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
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
from hyperfence.lab.plan import MAX_VMS, LabPlan, LabVm, lab_netns, plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.policy import desired as desired_module
from hyperfence.policy.local import CHAINS, CHAINS_ENV, parse_chains
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.reconcile import engine as engine_module
from hyperfence.reconcile import firewall as firewall_module
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import TABLES, compile_ruleset, vm_sid

LAB = "bap"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
HF_TABLES = [(t.family, t.name) for t in TABLES]
PORTS = (5201, 5202)
LOCAL_ONLY = [True]  # --chains: only the VMs on this host get chains (the product's default)
BIG_SUBNET = IPv4Network("10.77.0.0/18")  # declared VMs beyond 1,000 (16,381 of them fit)


def declared_plan(n: int) -> LabPlan:
    """The plan whose N VMs the policy declares. Up to 1,000 VMs it is `plan_lab`'s (what the lab creates
    and every earlier run declared); beyond, `plan_lab`'s addressing goes on in `BIG_SUBNET` (vm1..vm1,000
    unchanged: the lab's vm1..vm3 are the same). Only the policy documents use a plan beyond 1,000."""
    if n <= MAX_VMS:
        return plan_lab(LAB, n)
    base = plan_lab(LAB, MAX_VMS)
    if n > BIG_SUBNET.num_addresses - 12:
        raise BenchError(f"N = {n} does not fit in {BIG_SUBNET} (at most {BIG_SUBNET.num_addresses - 12})")
    first = int(BIG_SUBNET.network_address) + 10  # plan_lab: VM i at the subnet's address + 10 + i
    extra = tuple(
        LabVm(
            index=i,
            name=f"vm{i}",
            netns=lab_netns(LAB, f"vm{i}"),
            port=f"vp{i}",
            ifname=base.vms[0].ifname,
            mac=f"02:77:00:00:{(10 + i) >> 8:02x}:{(10 + i) & 0xFF:02x}",  # plan_lab's MAC scheme
            ip=IPv4Address(first + i),
        )
        for i in range(MAX_VMS + 1, n + 1)
    )
    plan = dataclasses.replace(base, subnet=BIG_SUBNET, vms=base.vms + extra)
    # the scheme continues plan_lab's exactly: its last VM, extended one further, is our next one
    last = base.vms[-1]
    assert extra[0].ip == last.ip + 1
    assert int(extra[0].mac[-5:].replace(":", ""), 16) == (int(last.mac[-5:].replace(":", ""), 16) + 1)
    return plan


def lab_plan(n: int) -> LabPlan:
    """The lab actually created for N declared VMs (vm1..vm3 exist; `plan_lab` holds at most 1,000)."""
    return plan_lab(LAB, min(n, MAX_VMS))


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


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM: the peak RSS) of a process, MB."""
    got = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) / 1024
    return got.get("VmRSS", 0.0), got.get("VmHWM", 0.0)


def meminfo_mb(field: str) -> float:
    """A field of /proc/meminfo (machine-wide, so other jobs move it too), MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0]) / 1024
    return float("nan")


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
            f"policy_file=None, poll=0.2, resync=3600.0, local_only={LOCAL_ONLY[0]!r})"
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


# Listens to the nftables event group of the namespace it runs in and prints, per datagram received, the
# time of arrival (CLOCK_MONOTONIC, which is time.perf_counter on Linux, so comparable across processes),
# the number of nftables messages in it and how many of them closed a transaction (NEWGEN). No cache, no
# decoding: unlike `nft monitor`, which first loads the whole ruleset into its cache (at 10,000 VMs it had
# not printed anything after 3 minutes of CPU) and then keeps that cache up to date at every event.
NL_LISTENER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
s.bind((0, 1 << 6))  # NFNLGRP_NFTABLES (7)
out = sys.stdout
out.write("ready\n"); out.flush()
buf = bytearray(1 << 20)
while True:
    try:
        n = s.recv_into(buf)
    except OSError as e:
        if e.errno != 105:  # ENOBUFS: events were lost
            raise
        out.write("%.6f lost\n" % time.perf_counter()); out.flush()
        continue
    t = time.perf_counter()
    off = msgs = gens = 0
    while off + 16 <= n:
        length, kind = struct.unpack_from("=IH", buf, off)
        if length < 16:
            break
        if kind >> 8 == 10:  # NFNL_SUBSYS_NFTABLES
            msgs += 1
            gens += (kind & 0xFF) == 15  # NFT_MSG_NEWGEN
        off += (length + 3) & ~3
    out.write("%.6f %d %d\n" % (t, msgs, gens)); out.flush()
"""


class Monitor:
    """The nftables events of the host namespace (`NL_LISTENER`, its own process there): one line per
    netlink datagram, with the time it arrived, its nftables messages and the transactions it closed."""

    def __init__(self, plan: LabPlan) -> None:
        assert "CLOCK_MONOTONIC" in time.get_clock_info("perf_counter").implementation
        self.proc = topology.popen_in_host(
            plan, [str(VENV_BIN / "python"), "-c", NL_LISTENER], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise BenchError("the nftables event listener did not start")
        self.q: queue.Queue[tuple[float, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us by `close`
            for raw in self.proc.stdout:
                stamp, _, rest = raw.decode(errors="replace").strip().partition(" ")
                self.q.put((float(stamp), rest))

    def drain(self) -> list[tuple[float, str]]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.q.get_nowait())
        return out

    @staticmethod
    def messages(lines: list[tuple[float, str]]) -> int:
        """nftables messages in `lines` (a lost-events line counts as one: something was written)."""
        return sum(1 if rest == "lost" else int(rest.split()[0]) for _, rest in lines)

    def first_after(self, t0: float, timeout: float = 2.0) -> tuple[float, str] | None:
        """The first datagram that arrived at or after `t0` (perf_counter), waiting up to `timeout`."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                t, line = self.q.get(timeout=left)
            except queue.Empty:
                return None
            if t >= t0:
                return t, line

    def close(self) -> None:
        topology.stop_process(self.proc)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def settle(pid: int, *, window: float = 1.0, quiet: int = 3, timeout: float = 1800.0) -> float:
    """Seconds until process `pid` used fewer than `quiet` clock ticks of CPU in `window` seconds (it has
    finished what it was doing: e.g. a full converge it asked itself for)."""
    t0 = time.perf_counter()
    before = cpu_ticks(pid)
    while time.perf_counter() - t0 < timeout:
        time.sleep(window)
        now = cpu_ticks(pid)
        if now - before < quiet:
            return time.perf_counter() - t0 - window
        before = now
    raise BenchError(f"process {pid} still busy after {timeout:.0f} s")


def log_lines(path: Path, *needles: str) -> list[str]:
    """The lines of a daemon log that contain one of `needles`."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text(errors="replace").splitlines() if any(n in ln for n in needles)]


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
    walls, kernels, daemons, daemon_kernels, puts, unchanged, events = [], [], [], [], [], 0, []
    reply: dict[str, Any] | None = None
    for i in range(changes):
        port = PORTS[(i + 1) % 2]
        monitor.drain()
        time.sleep(0.05)
        t0 = time.perf_counter()
        gen = store.put_policy(docs[port], source="bench/apply.py")
        puts.append((time.perf_counter() - t0) * 1000)
        reply = request(str(sd), {"op": "reconcile", "policy": f"gen:{gen}"}, timeout=600)
        t1 = time.perf_counter()
        if not reply or not reply.get("ok"):
            raise BenchError(f"change {i}: the daemon failed: {reply}")
        first = monitor.first_after(t0)
        for chain in (chain_out, chain_in):
            expr = rule_ports(nft, chain, "rule:bench#1")
            if f'"right": {port}' not in expr:
                raise BenchError(f"change {i}: {chain} does not hold port {port}: {expr}")
        walls.append((t1 - t0) * 1000)
        daemons.append(float(reply.get("ms") or "nan"))
        daemon_kernels.append(float(reply.get("kernel_ms") or "nan"))
        if not reply.get("changed"):
            unchanged += 1  # the daemon's poll loop applied it first; our request found nothing to do
        if first is None:
            raise BenchError(f"change {i}: no nftables event")
        kernels.append((first[0] - t0) * 1000)
        time.sleep(0.05)
        events.append(Monitor.messages([first, *monitor.drain()]))
    return {
        "wall": walls,
        "kernel": kernels,
        "daemon": daemons,
        "daemon_kernel": daemon_kernels,
        "store": puts,
        "unchanged": unchanged,
        "events": median(events),
        "summary": reply.get("summary") if reply else None,
    }


def measure_edits(*, sd: Path, nft: Nft, monitor: Monitor, changes: int, after: int) -> dict[str, Any]:
    """The same one-rule change written as one object, as `hyperfence policy set rules` does through a
    running daemon (the control op `policy-edit`: the daemon validates the rule as itself, stores it as one
    object and converges, reading the generation as that change). Timed from just before the request.
    `after`: how many whole-document changes came before (the port the kernel holds)."""
    chain_out = f"{vm_sid(f'{LAB}-vm1')}_out"
    walls, kernels, daemons = [], [], []
    reply: dict[str, Any] | None = None
    for i in range(changes):
        port = PORTS[(after + i + 1) % 2]
        rule = {"id": "bench", "from": "vm:vm1", "to": "vm:vm2", "services": [f"tcp/{port}"]}
        monitor.drain()
        time.sleep(0.05)
        t0 = time.perf_counter()
        reply = request(str(sd), {"op": "policy-edit", "section": "rules", "item": rule}, timeout=600)
        t1 = time.perf_counter()
        if not reply or not reply.get("ok") or reply.get("changes") != 1 or reply.get("checked") != "item":
            raise BenchError(f"edit {i}: the daemon answered {reply}")
        first = monitor.first_after(t0)
        expr = rule_ports(nft, chain_out, "rule:bench#1")
        if f'"right": {port}' not in expr:
            raise BenchError(f"edit {i}: {chain_out} does not hold port {port}: {expr}")
        if first is None:
            raise BenchError(f"edit {i}: no nftables event")
        walls.append((t1 - t0) * 1000)
        kernels.append((first[0] - t0) * 1000)
        daemons.append(float(reply.get("ms") or "nan"))
        time.sleep(0.05)
        monitor.drain()
    return {
        "edit_wall": walls,
        "edit_kernel": kernels,
        "edit_daemon": daemons,
        "edit_summary": reply and reply.get("summary"),
    }


def measure_restart(daemon: DaemonProc, store: Store, nft: Nft, monitor: Monitor) -> dict[str, Any]:
    """SIGKILL, start again, time to the end of the first converge; nothing may be written to the kernel."""
    before = handles(nft)
    events_before = len(store.events(limit=100000))
    monitor.drain()
    daemon.kill()
    restart_s = daemon.start(wait_converged=True)
    assert daemon.proc is not None
    # What it does after its first converge (its drift watch asks for a full one when it starts) must not
    # write either: watched until it is idle.
    quiet_s = settle(daemon.proc.pid)
    time.sleep(0.5)
    new_events = store.events(limit=100000)[events_before:]
    return {
        "restart_s": restart_s,
        "restart_settle_s": quiet_s,
        "restart_nft_events": [f"{rest} message(s)" for _, rest in monitor.drain()],
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
    # an address no declared VM has (10.77.3.250 was free up to 1,000 VMs, not at 10,000)
    arp = {"family": "bridge", "table": "hyperfence", "name": shared, "elem": ["192.0.2.250"]}
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


def initial_apply(sd: Path, store: Store, doc: dict[str, Any], pid: int) -> dict[str, Any]:
    """Empty kernel -> the whole policy, through the daemon (process `pid`): time and memory."""
    slab0, avail0 = meminfo_mb("SUnreclaim"), meminfo_mb("MemAvailable")
    t0 = time.perf_counter()
    gen = store.put_policy(doc, source="bench/apply.py")
    reply = request(str(sd), {"op": "reconcile", "policy": f"gen:{gen}"}, timeout=1800)
    wall_ms = (time.perf_counter() - t0) * 1000
    if not reply or not reply.get("ok"):
        raise BenchError(f"initial apply failed: {reply}")
    return {
        "initial_wall_ms": wall_ms,
        "initial_daemon_ms": reply.get("ms"),
        "initial_daemon_kernel_ms": reply.get("kernel_ms"),
        "initial_summary": reply.get("summary"),
        "initial_changed": reply.get("changed"),
        "kernel_slab_mb": meminfo_mb("SUnreclaim") - slab0,
        "avail_drop_mb": avail0 - meminfo_mb("MemAvailable"),
        "daemon_rss_initial": proc_mem_mb(pid),
    }


def run_n(n: int, changes: int, wd: Path) -> dict[str, Any]:
    plan = lab_plan(n)
    declared = declared_plan(n)
    res: dict[str, Any] = {"n": n}
    sd = wd / f"state-{n}"
    sd.mkdir(parents=True)
    daemon = DaemonProc(plan, sd)
    monitor: Monitor | None = None
    nft: Nft | None = None
    store: Store | None = None
    try:
        log(f"N={n}: creating lab {LAB} ({n} VMs declared, 3 created)")
        fresh_lab(plan, only=3)
        docs = {p: policy(declared, p) for p in PORTS}
        reps = 3 if n <= MAX_VMS else 1
        log(f"N={n}: parse, resolve, compile in this process ({reps}x each of 2 documents)")
        res["compile_ms"] = compile_ms(docs[PORTS[0]], reps)
        res["compile_label_ms"] = compile_ms(label_policy(declared, PORTS[0]), reps)
        res["compile_reps"] = reps
        log(f"N={n}: starting the daemon")
        res["daemon_start_s"] = daemon.start(wait_converged=False)
        res["daemon_how"] = daemon.how
        store = Store(str(sd))
        nft = Nft(plan.host_netns)

        log(f"N={n}: initial apply (empty kernel -> {n} VMs)")
        assert daemon.proc is not None
        res.update(initial_apply(sd, store, docs[PORTS[0]], daemon.proc.pid))

        # The daemon may still be busy: its own drift watch may have lost events during a big apply (the
        # receive buffer overran) and asked for a full converge. Changes are measured once it is idle.
        res["settle_s"] = settle(daemon.proc.pid)
        res["daemon_log_notes"] = log_lines(daemon.log_path, "lost", "repairing", "drift")
        monitor = Monitor(plan)
        log(f"N={n}: {changes} one-rule changes")
        res.update(measure_changes(sd=sd, store=store, nft=nft, monitor=monitor, docs=docs, changes=changes))
        log(f"N={n}: {changes} one-rule changes written as one object (policy set)")
        res.update(measure_edits(sd=sd, nft=nft, monitor=monitor, changes=changes, after=changes))
        res["daemon_rss_changes"] = proc_mem_mb(daemon.proc.pid)
        log(f"N={n}: daemon restart")
        res.update(measure_restart(daemon, store, nft, monitor))
        assert daemon.proc is not None
        res["daemon_rss_restart"] = proc_mem_mb(daemon.proc.pid)
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


class Phases:
    """Adds up the time of named calls on the daemon's code path, in this process: the functions the Engine
    and its Firewall call are wrapped where they look them up (module globals, instance attributes) and put
    back by `restore`. Times are exclusive: a wrapped call inside another counts only for itself."""

    DESIRED = (  # (label, function looked up in hyperfence.policy.desired: the desired policy's parts)
        ("parse", "parse_policy"),
        ("parse (changed rules only)", "parse_rules_changed"),
        ("leases", "apply_leases"),
        ("inventory merge", "merge_discovered"),
    )
    ENGINE = (  # (label, function looked up in hyperfence.reconcile.engine)
        ("uplinks", "with_uplinks"),
        ("patch the held document", "patch"),
        ("resolve (incremental)", "resolve_update"),
        ("resolve (whole)", "resolve_policy"),
        ("compile", "compile_ruleset"),
        ("bridge ports read", "find_undeclared"),
    )

    def __init__(self, engine: Engine) -> None:
        self.spent: dict[str, float] = {}
        self._children: list[float] = []
        self._undo: list[Callable[[], None]] = []
        for label, name in self.DESIRED:
            self._wrap(desired_module, name, label)
        for label, name in self.ENGINE:
            self._wrap(engine_module, name, label)
        self._wrap(firewall_module, "plan_changes", "plan")
        self._wrap(firewall_module, "describe_drift", "describe_drift")
        self._wrap(engine.store, "get_policy", "store read (SQLite + orjson)")
        self._wrap(engine.store, "policy_changes", "store read of the change")
        self._wrap(engine.store, "latest_generation", "store generation")
        self._wrap(engine.store, "add_event", "store event write")
        fw = engine.firewall
        self._wrap(fw, "read", "kernel read (python)")
        self._wrap(fw, "_verify", "verify (python)")
        self._wrap(engine.nft, "apply", "libnftables apply")
        self._wrap(engine.nft, "list", "libnftables list")
        self._wrap(engine.nft, "rule_ids", "netlink rule ids")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)
        had_own = name in vars(owner)
        self.spent.setdefault(label, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t
                inner = self._children.pop()
                self.spent[label] += elapsed - inner
                if self._children:
                    self._children[-1] += elapsed

        setattr(owner, name, timed)
        if had_own:
            self._undo.append(lambda: setattr(owner, name, real))
        else:
            self._undo.append(lambda: delattr(owner, name))

    def take(self) -> dict[str, float]:
        """Seconds spent per label since the last `take`; resets."""
        out = dict(self.spent)
        for k in self.spent:
            self.spent[k] = 0.0
        return out

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def profile_text(prof: cProfile.Profile, top: int) -> list[str]:
    """The `top` functions by own time, then hyperfence's by cumulative time, with short paths."""
    out: list[str] = []
    for order, restrict, title in (
        ("tottime", (), f"top {top} functions by own time (tottime)"),
        ("cumulative", ("hyperfence",), f"top {top} hyperfence functions by cumulative time"),
    ):
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats(order).print_stats(*restrict, top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
        out.append(f"  {title}:")
        for line in lines[start:]:
            short = line.replace(str(REPO / "src") + "/", "").replace(str(REPO) + "/", "")
            out.append("    " + short.replace(sys.prefix, "<venv>").replace(sys.base_prefix, "<py>"))
    return out


def timed_changes(
    engine: Engine, phases: Phases, docs: dict[int, dict[str, Any]], changes: int
) -> list[dict[str, float]]:
    """`changes` one-rule changes (after one warm-up) through `engine`, each timed whole and by phase."""
    rows = []
    for i in range(changes + 1):
        engine.store.put_policy(docs[PORTS[(i + 1) % 2]], source="bench/apply.py")
        phases.take()
        t0 = time.perf_counter()
        _, result = engine.converge()
        total = time.perf_counter() - t0
        assert result is not None
        assert result.changed
        spent = phases.take()
        gc.freeze()  # as the daemon does after each change
        if i:  # the first is a warm-up
            rows.append({"total": total, **spent})
    return rows


def breakdown(n: int, wd: Path, *, changes: int, top: int) -> dict[str, Any]:
    """Where the time goes at `n` VMs, in this process with the daemon's code path (an Engine, the daemon's
    GC thresholds, a `gc.freeze()` after each change as the daemon does): the initial apply, a no-op full
    converge (what a restart pays after compiling), `changes` one-rule changes phase by phase (after one
    warm-up), and one more change under cProfile."""
    plan, declared = lab_plan(n), declared_plan(n)
    fresh_lab(plan, only=3)
    thresholds = gc.get_threshold()
    gc.set_threshold(200_000, 50, 100)  # as run_daemon sets them
    engine = Engine(netns=plan.host_netns, state_dir=str(wd / f"breakdown-{n}"), local_only=LOCAL_ONLY[0])
    phases: Phases | None = None
    out: dict[str, Any] = {"n": n}
    try:
        docs = {p: policy(declared, p) for p in PORTS}
        engine.store.put_policy(docs[PORTS[0]], source="bench/apply.py")
        phases = Phases(engine)
        t0 = time.perf_counter()
        engine.compiled()
        t1 = time.perf_counter()
        _, result = engine.converge(full=True)
        t2 = time.perf_counter()
        assert result is not None
        assert result.changed
        out["initial"] = {
            "compile_s": t1 - t0,
            "converge_s": t2 - t1,
            "commands": result.commands,
            "phases": phases.take(),
        }
        gc.freeze()
        t3 = time.perf_counter()
        _, result = engine.converge(full=True)
        assert result is not None
        assert not result.changed
        out["noop"] = {"s": time.perf_counter() - t3, "phases": phases.take()}
        out["changes"] = timed_changes(engine, phases, docs, changes)
        phases.restore()  # the profile without our wrappers
        phases = None
        engine.store.put_policy(docs[PORTS[(changes + 2) % 2]], source="bench/apply.py")
        prof = cProfile.Profile()
        t5 = time.perf_counter()
        prof.enable()
        _, result = engine.converge()
        prof.disable()
        out["profiled_s"] = time.perf_counter() - t5
        assert result is not None
        assert result.changed
        out["profile"] = profile_text(prof, top)
        return out
    finally:
        if phases is not None:
            phases.restore()
        engine.close()
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        nft_delete_tables(plan, HF_TABLES)
        topology.destroy_lab(LAB)


# ------------------------------------------------------------------------------------------------ main


def finite(xs: list[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x)]  # NaN: the daemon did not report that figure


def pct_line(name: str, xs: list[float]) -> str:
    xs = finite(xs)
    if not xs:
        return f"  {name:<38} n/a (not reported)"
    return (
        f"  {name:<38} p50 {fmt(percentile(xs, 50), 1):>8}  p95 {fmt(percentile(xs, 95), 1):>8}  "
        f"p99 {fmt(percentile(xs, 99), 1):>8}  max {fmt(max(xs), 1):>8}  ms"
    )


def git_state() -> str:
    """The commit this run measured, and whether src/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "src")
    return (
        f"commit {git('rev-parse', 'HEAD')} ({git('log', '-1', '--format=%cd %s', '--date=iso')[:100]}); "
        f"src/ {'MODIFIED against it' if dirty else 'as committed'}"
    )


def print_size(r: dict[str, Any]) -> None:
    n = r["n"]
    p, rs, c = r["compile_ms"]
    lp, lr, lc = r["compile_label_ms"]
    print(
        f"\nN = {n} declared VMs (daemon started via {r['daemon_how']!r}, ready in {r['daemon_start_s']:.2f} s)"
    )
    rss, hwm = r["daemon_rss_initial"]
    print(
        f"  initial apply (empty kernel): wall {r['initial_wall_ms']:.0f} ms, daemon-reported "
        f"{r['initial_daemon_ms']} ms (kernel_ms {r['initial_daemon_kernel_ms']}), {r['initial_summary']}"
        + ("" if r["initial_changed"] else " (applied by the daemon's poll loop before our request)")
    )
    print(
        f"  memory after it: daemon RSS {rss:.0f} MB (peak {hwm:.0f} MB); kernel unreclaimable slab "
        f"{r['kernel_slab_mb']:+.0f} MB, MemAvailable {-r['avail_drop_mb']:+.0f} MB (machine-wide: other jobs "
        f"move these)"
    )
    print(
        f"  the daemon was idle {r['settle_s']:.1f} s after its reply; its log about drift and lost events:"
    )
    for line in r["daemon_log_notes"][:6] or ["(nothing)"]:
        print(f"    {line[:220]}")
    print(f"  one-rule change ({len(r['wall'])} changes, last summary {r['summary']}):")
    print(pct_line("wall (store write -> daemon reply)", r["wall"]))
    print(pct_line("kernel (store write -> nft event)", r["kernel"]))
    print(pct_line("daemon-reported ms (all its work)", r["daemon"]))
    print(pct_line("daemon-reported kernel_ms (converge)", r["daemon_kernel"]))
    print(pct_line("store write (policy apply side)", r["store"]))
    print(
        f"  the same change written as one object (policy set rules, {len(r['edit_wall'])} changes, last summary {r['edit_summary']}):"
    )
    print(pct_line("wall (request -> daemon reply)", r["edit_wall"]))
    print(pct_line("kernel (request -> nft event)", r["edit_kernel"]))
    print(pct_line("daemon-reported converge ms", r["edit_daemon"]))
    print(
        f"  the daemon's poll loop applied {r['unchanged']} of {len(r['wall'])} changes before our request "
        f"(reply changed=false); nftables messages per change: {r['events']:.0f}; daemon RSS after the "
        f"changes {r['daemon_rss_changes'][0]:.0f} MB (peak {r['daemon_rss_changes'][1]:.0f} MB)"
    )
    print(
        f"  in-process, same document (median of {r['compile_reps']}): parse {p:.0f} ms + resolve {rs:.0f} ms "
        f"+ compile {c:.0f} ms = {p + rs + c:.0f} ms per policy version, compiled whole (a 5-label-rule "
        f"policy at this N: {lp:.0f} + {lr:.0f} + {lc:.0f} = {lp + lr + lc:.0f} ms)"
    )
    if n == 1000:
        verdict = "PASS" if percentile(r["wall"], 99) <= 50 else "FAIL"
        print(f"  goal p99 <= 50 ms at 1,000 VMs (wall): {percentile(r['wall'], 99):.0f} ms {verdict}")
    print(
        f"  restart (SIGKILL, start, first converge done): {r['restart_s']:.2f} s (idle after "
        f"{r['restart_settle_s']:.1f} s more); nftables events from the kill until idle: "
        f"{len(r['restart_nft_events'])}; all {r['restart_objects']} object handles unchanged: "
        f"{r['restart_handles_same']}; new store events: {r['restart_store_events'] or 'none'}; daemon RSS "
        f"after it {r['daemon_rss_restart'][0]:.0f} MB (peak {r['daemon_rss_restart'][1]:.0f} MB)"
    )
    for line in r["restart_nft_events"][:5]:
        print(f"    event: {line[:200]}")
    print(
        f"  single libnftables calls (median of 5): list one chain of bridge hyperfence "
        f"{r['call_list_chain']:.1f} ms, list table inet hyperfence {r['call_list_inet']:.1f} ms, "
        f"add+delete one set element {r['call_elem_add_del']:.1f} ms"
    )


METRICS = (
    ("edit_kernel", "policy set: request -> nft event"),
    ("edit_wall", "policy set: request -> reply"),
    ("kernel", "kernel (store write -> nft event)"),
    ("wall", "wall (store write -> daemon reply)"),
    ("daemon", "daemon-reported ms (all its work)"),
    ("daemon_kernel", "daemon-reported kernel_ms"),
)


def print_scaling(results: list[dict[str, Any]]) -> None:
    """p50 / p99 of every metric at every N, the ratios to the smallest N, the goals of issue 13."""
    if not results:
        return
    base = results[0]
    sizes = [r["n"] for r in results]
    print(f"\nscaling of a one-rule change, p50 / p99 ms (ratios: N / N={base['n']})")
    head = "".join(f"{f'N={n:,}':>18}" for n in sizes)
    smallest = base["n"]
    ratio_head = "".join(f"{f'{n:,}/{smallest:,}':>16}" for n in sizes[1:])
    print(f"  {'':<38}{head}{ratio_head}")
    ratios: dict[str, tuple[float, float]] = {}
    for key, title in METRICS:
        cells, rcells = "", ""
        b50, b99 = (percentile(finite(base[key]), q) for q in (50, 99))
        for r in results:
            xs = finite(r[key])
            v50, v99 = percentile(xs, 50), percentile(xs, 99)
            cells += f"{fmt(v50, 1) + ' / ' + fmt(v99, 1):>18}"
            if r is not base:
                r50, r99 = v50 / b50 if b50 else float("nan"), v99 / b99 if b99 else float("nan")
                rcells += f"{fmt(r50, 2) + ' / ' + fmt(r99, 2):>16}"
                ratios[f"{key}:{r['n']}"] = (r50, r99)
        print(f"  {title:<38}{cells}{rcells}")
    restarts = "".join(f"{fmt(r['restart_s'], 2) + ' s':>18}" for r in results)
    print(f"  {'restart (SIGKILL -> first converge)':<38}{restarts}")
    wrote = "".join(
        f"{('no' if not r['restart_nft_events'] and r['restart_handles_same'] else 'YES'):>18}"
        for r in results
    )
    print(f"  {'restart wrote to the kernel?':<38}{wrote}")
    big = results[-1]["n"]
    if len(results) > 1:
        for key, what in (
            ("edit_kernel", "a one-rule change (policy set, one object): request -> kernel"),
            ("kernel", "policy apply of the whole file (O(file)): store write -> kernel"),
            ("wall", "policy apply of the whole file (O(file)): store write -> reply"),
        ):
            r50, r99 = ratios[f"{key}:{big}"]
            verdict = "PASS" if r50 <= 2 and r99 <= 2 else "FAIL"
            print(
                f"  goal (issue 13): {what} at {big:,} VMs <= 2x at {base['n']:,}: p50 x{fmt(r50, 2)}, "
                f"p99 x{fmt(r99, 2)} {verdict}"
            )
    for r in results:
        if r["n"] == 1000:
            ok = r["restart_s"] <= 1.0 and not r["restart_nft_events"] and r["restart_handles_same"]
            print(
                f"  goal (issue 13): restart at 1,000 VMs ready in <= 1 s, writing nothing: "
                f"{r['restart_s']:.2f} s, {len(r['restart_nft_events'])} events, handles unchanged "
                f"{r['restart_handles_same']} {'PASS' if ok else 'FAIL'}"
            )


def phase_lines(spent: dict[str, float], total: float, *, seconds: bool = False) -> list[str]:
    """`label value` pairs (ms, or s with `seconds`), largest first, zeros left out, then what no wrapped
    call accounts for ("other"); five to a line."""
    unit, nd, suffix = (1.0, 2, "s") if seconds else (1000.0, 1, "ms")
    parts = sorted(((v, k) for k, v in spent.items() if round(v * unit, nd)), reverse=True)
    rest = total - sum(spent.values())
    items = [f"{k} {v * unit:.{nd}f}" for v, k in parts] + [f"other {rest * unit:.{nd}f}"]
    return [
        f"    {', '.join(items[i : i + 5])}" + (f" {suffix}" if i + 5 >= len(items) else ",")
        for i in range(0, len(items), 5)
    ]


def print_breakdown(b: dict[str, Any]) -> None:
    n = b["n"]
    ini = b["initial"]
    print(f"\nin-process at N={n:,} (the daemon's code path, GC as in the daemon, instrumented):")
    print(
        f"  initial apply: compile {ini['compile_s']:.2f} s (store read, parse, resolve, compile of the whole "
        f"policy), converge {ini['converge_s']:.2f} s ({ini['commands']} commands); by phase, s:"
    )
    total = ini["compile_s"] + ini["converge_s"]
    for line in phase_lines(ini["phases"], total, seconds=True):
        print(line)
    noop = b["noop"]
    print(f"  no-op full converge (what a restart pays besides compiling): {noop['s']:.2f} s; by phase, s:")
    for line in phase_lines(noop["phases"], noop["s"], seconds=True):
        print(line)
    rows = b["changes"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    total = mean.pop("total")
    print(
        f"  one-rule change (engine.converge() after the store write, {len(rows)} after a warm-up): median "
        f"{median([r['total'] for r in rows]) * 1000:.1f} ms, mean {total * 1000:.1f} ms; by phase (means), ms:"
    )
    for line in phase_lines(mean, total):
        print(line)
    print(
        f"  one more change under cProfile: {b['profiled_s'] * 1000:.0f} ms (the profiler's overhead included)"
    )
    for line in b["profile"]:
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 changes per N (and 3 in the breakdown)")
    ap.add_argument(
        "--sizes", default="100,1000,10000", help="comma-separated VM counts (default 100,1000,10000)"
    )
    ap.add_argument("--changes", type=int, default=50, help="one-rule changes per N up to 1,000 (default 50)")
    ap.add_argument("--large-changes", type=int, default=20, help="changes per N above 1,000 (default 20)")
    ap.add_argument(
        "--breakdown-n", type=int, default=None, help="N of the in-process breakdown (default max)"
    )
    ap.add_argument("--breakdown-changes", type=int, default=5, help="measured changes in it (default 5)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the in-process breakdown")
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed per profile table")
    ap.add_argument(
        "--chains",
        choices=CHAINS,
        default="local",
        help="which declared VMs get chains (hyperfence --chains): local (default, the product's: vm1..vm3, "
        "whose ports are on the lab's bridge) or declared (all N: what a host holding all N VMs pays)",
    )
    args = ap.parse_args()
    LOCAL_ONLY[0] = parse_chains(args.chains)
    os.environ[CHAINS_ENV] = args.chains  # the daemon started as `hyperfence daemon`
    sizes = sorted({int(x) for x in args.sizes.split(",")})
    if args.quick:
        args.changes = args.large_changes = 5
        args.breakdown_changes = 3
    require_tools("nft", "git")
    for n in sizes:
        declared_plan(n)  # a bad N fails here, before any lab exists
    wd = workdir("hf-bench-apply-")
    t_start = time.perf_counter()
    code = git_state()
    results = []
    breakdown_n = args.breakdown_n or max(sizes)
    bd: dict[str, Any] | None = None
    try:
        for n in sizes:
            results.append(run_n(n, args.changes if n <= MAX_VMS else args.large_changes, wd))
        if not args.no_breakdown:
            log(f"in-process breakdown at N={breakdown_n}")
            bd = breakdown(breakdown_n, wd, changes=args.breakdown_changes, top=args.profile_top)
    finally:
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)

    print(f"hyperfence apply benchmark ({env_summary()}), lab {LAB}")
    print(f"code measured: {code}")
    print(
        f"one-rule changes per size: {args.changes} up to 1,000 VMs, {args.large_changes} above; "
        f"load average at the end {os.getloadavg()[0]:.2f} (2 shared cores)"
    )
    print(
        "policy: one rule per VM (vm_i -> vm_i+1 tcp/80) + rule `bench` (vm1 -> vm2 tcp/PORT), PORT toggled"
    )
    print(
        f"chains: {args.chains} ("
        + (
            "only the VMs whose port is on this host's bridge get chains: vm1..vm3 of N; the others are "
            "addresses in the sets of the rules that name them"
            if LOCAL_ONLY[0]
            else "every declared VM gets chains, as on a host that holds all N"
        )
        + ")"
    )
    for r in results:
        print_size(r)
    print_scaling(results)
    if bd is not None:
        print_breakdown(bd)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    raw = {
        str(r["n"]): {k: r[k] for k in ("wall", "kernel", "daemon", "daemon_kernel", "store", "restart_s")}
        for r in results
    }
    print("raw (ms per change, restart s): " + json.dumps(raw, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
