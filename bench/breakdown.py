"""Where hyperfence's 64-byte packet rate goes: a ladder of rulesets, each one step more of hyperfence's real
compiled ruleset, each measured paired against the bare bridge in the same repetition. Run as root from the
repository root:

    .venv/bin/python bench/breakdown.py                  # 4 repetitions, 1 s floods (~6 min)
    .venv/bin/python bench/breakdown.py --perf           # also: where the sender's CPU time per packet goes,
                                                         # per step and hook (perf samples by stack; ~10 min)
    .venv/bin/python bench/breakdown.py --only k2,k7     # some steps only (a, the baseline, always runs)
    .venv/bin/python bench/breakdown.py --only k7,x1,x2 --reps 0 --perf --perf-reps 4   # the experiments

The lab and the policy are those of bench/dataplane.py (1,000 VMs declared, vm1..vm3 created, a 10,000-address
IP set), in a lab of its own (`pf<hex>`). hyperfence compiles and applies its ruleset once through the Engine;
the benchmark then lists it (`nft list table ...`) and every step below is that listing with parts taken out,
renamed to `bridge/inet hfstep` and loaded with `nft -f` (so the steps hold the very rules, sets and maps the
Engine wrote, nothing hand-written):

  a   bare bridge (br_netfilter on, the lab's NAT table => inet conntrack runs): the BASELINE
  a0  bare bridge without the lab's NAT table, so without conntrack (reference only: what conntrack and
        br_netfilter's inet hooks cost, which every step from k1 on pays in a too)
  k1  + hyperfence's bridge table with its three base chains (guard prerouting -300, egress prerouting +10,
        ingress postrouting +10), EMPTY, policy accept; every set, map and VM chain loaded but unused
  k2  + the inet conntrack marker (`pre`/`out`: ct-mark, ct-clear), no connection caps
  k3  + the guard's rules (anti-spoofing: VLAN check, identity sets, per-VM spoof chains), no counters/logs
  k4  + egress/ingress rules: established shortcut, reject-ARP, port dispatch, the per-VM chains (this is the
        whole policy) without counters and without log rules
  k5  + counters (as compiled: on every decision rule, none on the established shortcut)
  k6  + log rules (NFLOG, rate-limited: only on drops, so no packet of the benchmark flows meets them)
  k7  + connection caps (`ct status ! confirmed ... vmap @cap_vms`): hyperfence's full ruleset, = case b of
        bench/dataplane.py

Flows (bench/common.py): 64-byte UDP vm1 -> vm2, `est` (the flow was answered once: conntrack says
established) and `new` (never answered: every packet walks the policy). Only the 64-byte rate is measured
(no TCP, no ping): this is the figure the 0.95x goal is about. Each repetition runs every step once, order
rotated, each step between two measurements of a (ABBA, see `measure`); the output gives, per step, the
median over repetitions of that paired ratio, its spread (min-max), and the change from the step before.

With --perf, each step is also profiled (`perf_profile`): the sending CPU's own time per packet, split by the
hook whose chain is on the sample's stack. That figure does not depend on how much CPU other jobs leave the
benchmark, which the rates do; on a busy machine it is the one to read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    SENDER_CPU,
    BenchError,
    build_udpflood,
    conntrack_flush,
    env_summary,
    fmt,
    fresh_lab,
    host,
    log,
    median,
    nft_delete_tables,
    nft_load,
    ping_ok,
    require_tools,
    udp_kpps,
    workdir,
)
from dataplane import HF_TABLES, N_VMS, hyperfence_document

from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan, nat_ruleset, plan_lab
from hyperfence.model.kernel import Flavour
from hyperfence.reconcile.engine import Engine

STEP_TABLES = [("bridge", "hfstep"), ("inet", "hfstep")]
BASE_CHAINS = ("guard", "egress", "ingress")
MARKER_COMMENTS = ('"sys:ct-mark"', '"sys:ct-clear"')
CAP_COMMENTS = ('"sys:ct-cap-out"', '"sys:ct-cap-in"')


@dataclass(frozen=True)
class Parts:
    """Which parts of hyperfence's listing a step keeps."""

    base_chains: bool = True  # the bridge table (its base chains; empty unless guard/policy)
    marker: bool = False  # inet pre/out: ct-mark and ct-clear
    guard: bool = False  # the guard chain's rules
    policy: bool = False  # egress/ingress rules (and so the per-VM chains they reach)
    counters: bool = False
    logs: bool = False
    caps: bool = False


FULL = Parts(marker=True, guard=True, policy=True, counters=True, logs=True, caps=True)
NO_CONNTRACK = Parts(base_chains=False)  # marks step a0: no table at all, the lab's NAT table removed too

STEPS: list[tuple[str, str, Parts | None]] = [
    ("a", "bare bridge (baseline)", None),
    ("a0", "bare bridge, no conntrack (reference)", NO_CONNTRACK),
    ("k1", "+ bridge table, 3 empty base chains", Parts()),
    ("k2", "+ inet conntrack marker", Parts(marker=True)),
    ("k3", "+ guard (anti-spoofing)", Parts(marker=True, guard=True)),
    ("k4", "+ egress/ingress + per-VM chains", Parts(marker=True, guard=True, policy=True)),
    ("k5", "+ counters", Parts(marker=True, guard=True, policy=True, counters=True)),
    ("k6", "+ log rules (NFLOG)", Parts(marker=True, guard=True, policy=True, counters=True, logs=True)),
    ("k7", "+ connection caps (= hyperfence)", FULL),
]


def vlan_after_identity(text: str, ifindex: dict[str, int]) -> str:
    """k7 with `ether type` in the IPv4 identity key, so that a tagged frame can never match it, and the
    VLAN rule moved right after that lookup: an untagged IPv4 frame is accepted by the guard's first rule.
    (The identity rules' own dependency is `meta protocol`, which is the inner protocol of a frame whose
    tag the driver carries out of band, so the VLAN rule must otherwise come first.)"""
    del ifindex
    vlan = re.search(r'^.*comment "sys:vlan-tagged"\n', text, flags=re.MULTILINE)
    assert vlan is not None
    text = text.replace(vlan.group(0), "")
    a = text.index("set ident_ip {")
    b = text.index("}", a)
    body = text[a:b].replace(
        "ifname . ether_addr . ipv4_addr", "ifname . ether_addr . ether_type . ipv4_addr"
    )
    body = re.sub(r'("vp\d+" \. [0-9a-f:]{17}) \. ', r"\1 . ip . ", body)
    text = text[:a] + body + text[b:]
    old = 'iifname . ether saddr . ip saddr @ident_ip accept comment "sys:ident-ip"\n'
    new = 'iifname . ether saddr . ether type . ip saddr @ident_ip accept comment "sys:ident-ip"\n'
    return text.replace(old, new + vlan.group(0))


def identity_by_ifindex(text: str, ifindex: dict[str, int]) -> str:
    """k7 with the IPv4 identity keyed by the port's index (`iif`, 4 bytes) instead of its name (`iifname`,
    16 bytes). Ports that do not exist in the lab get made-up indexes. Not something hyperfence can do as
    it stands: the compiler knows ports by name, and an index changes when a tap is recreated."""
    a = text.index("set ident_ip {")
    b = text.index("}", a)
    body = text[a:b].replace("type ifname . ether_addr", "type iface_index . ether_addr")
    body = re.sub(r'"(vp\d+)"', lambda m: str(ifindex.get(m.group(1), 100_000 + int(m.group(1)[2:]))), body)
    text = text[:a] + body + text[b:]
    return text.replace(
        "iifname . ether saddr . ip saddr @ident_ip", "iif . ether saddr . ip saddr @ident_ip"
    )


def no_reject_arp(text: str, ifindex: dict[str, int]) -> str:
    """k7 without the `sys:reject-arp` rules of egress and ingress. Their set is empty while no VM has a
    reject rule (as in the benchmark's policy), so they never match then; a new packet still evaluates them."""
    del ifindex
    return re.sub(r'^.*comment "sys:reject-arp"\n', "", text, flags=re.MULTILINE)


# Changes tried on top of k7 (run them with --only, e.g. --only k7,x1,x2): measured, not adopted (see
# bench/README.md).
EXPERIMENTS: list[tuple[str, str, Callable[[str, dict[str, int]], str]]] = [
    ("x1", "k7, VLAN check after the identity lookup", vlan_after_identity),
    ("x2", "k7, identity keyed by ifindex", identity_by_ifindex),
    ("x3", "k7 without the (empty) reject-ARP rules", no_reject_arp),
]


def step_ruleset(listing: str, parts: Parts) -> str:
    """hyperfence's listing (`nft list table` of its bridge and inet tables) reduced to `parts`, renamed to
    the `hfstep` tables. Line-based: the listing has one rule per line, chains open with `chain NAME {` and
    base chains carry a `type ... hook ...;` line."""
    out = ["".join(f"add table {f} {n}\ndelete table {f} {n}\n" for f, n in STEP_TABLES)]
    table = chain = ""
    for line in listing.splitlines():
        s = line.strip()
        if m := re.match(r"table (\w+) (\w+) \{", s):
            table, chain = m.group(1), ""
            if table not in ("bridge", "inet") or (table == "inet" and not parts.marker):
                table = "skip"
                continue
            out.append(f"table {table} hfstep {{")
            continue
        if table == "skip":
            if s == "}" and line == "}":
                table = ""
            continue
        if m := re.match(r"chain (\w+) \{", s):
            chain = m.group(1)
            out.append(line)
            continue
        if s.startswith("type ") and " hook " in s:
            empty = table == "bridge" and chain in BASE_CHAINS and not _keeps_rules(chain, parts)
            out.append(line.replace("policy drop;", "policy accept;") if empty else line)
            continue
        if chain and s and s != "}" and not _keep_rule(table, chain, s, parts):
            continue
        if s == "}" and line.startswith("\t}"):
            chain = ""
        out.append(line)
    text = "\n".join(out) + "\n"
    if not parts.counters:
        text = re.sub(r"\bcounter packets \d+ bytes \d+\s*", "", text)
    return text


def _keeps_rules(chain: str, parts: Parts) -> bool:
    return parts.guard if chain == "guard" else parts.policy


def _keep_rule(table: str, chain: str, rule: str, parts: Parts) -> bool:
    if " log prefix " in rule and not parts.logs:
        return False
    if table == "inet":
        if any(c in rule for c in CAP_COMMENTS):
            return parts.caps
        if chain in ("pre", "out"):
            return any(c in rule for c in MARKER_COMMENTS)
        return True
    if chain in BASE_CHAINS:
        return _keeps_rules(chain, parts)
    return True


@dataclass
class Step:
    key: str
    title: str
    text: str | None  # None: the bare bridge
    nat_off: bool = False  # a0: the lab's NAT table is removed for the measurement (no conntrack)
    filtering: bool = False  # the step holds the policy: vm3 -> vm2 (no rule allows it) must be dropped
    est: list[float] = field(default_factory=list)  # kpps, the step's own floods
    new: list[float] = field(default_factory=list)
    x_est: list[float] = field(default_factory=list)  # paired ratios vs a, one per repetition
    x_new: list[float] = field(default_factory=list)


def load(plan: LabPlan, step: Step) -> None:
    if step.nat_off:
        nft_delete_tables(plan, [("ip", plan.nat_table)])
    if step.text is not None:
        nft_load(plan, step.text)


def unload(plan: LabPlan, step: Step) -> None:
    if step.text is not None:
        nft_delete_tables(plan, STEP_TABLES)
    if step.nat_off:
        nft_load(plan, nat_ruleset(plan))


def flood(plan: LabPlan, tool: str, *, seconds: float, mode: str) -> float:
    conntrack_flush(plan)
    return udp_kpps(plan, tool, "vm1", "vm2", seconds=seconds, mode=mode)


def measure(plan: LabPlan, tool: str, step: Step, seconds: float) -> None:
    """One repetition of `step`, paired with the bare bridge right around it, in the order
    a:est a:new | step:est step:new step:new step:est | a:new a:est, so that a drift of the machine's speed
    during the repetition hits the step and its baseline alike (ABBA)."""
    a_e1, a_n1 = (flood(plan, tool, seconds=seconds, mode=m) for m in ("est", "new"))
    load(plan, step)
    try:
        if not ping_ok(plan, "vm1", "vm3"):
            raise BenchError(f"step {step.key}: vm1 -> vm3 ping does not pass")
        if ping_ok(plan, "vm3", "vm2") == step.filtering:
            raise BenchError(f"step {step.key}: vm3 -> vm2 ping is {'not ' * step.filtering}dropped")
        e1, n1, n2, e2 = (flood(plan, tool, seconds=seconds, mode=m) for m in ("est", "new", "new", "est"))
    finally:
        unload(plan, step)
    a_n2, a_e2 = (flood(plan, tool, seconds=seconds, mode=m) for m in ("new", "est"))
    step.est.append((e1 + e2) / 2)
    step.new.append((n1 + n2) / 2)
    step.x_est.append((e1 + e2) / (a_e1 + a_e2))
    step.x_new.append((n1 + n2) / (a_n1 + a_n2))
    log(
        f"  {step.key}: udp est {step.est[-1]:.0f} kpps (x{step.x_est[-1]:.2f}), "
        f"new {step.new[-1]:.0f} kpps (x{step.x_new[-1]:.2f}); a around it: est {a_e1:.0f}/{a_e2:.0f}, "
        f"new {a_n1:.0f}/{a_n2:.0f}"
    )


def report(steps: list[Step], reps: int, seconds: float) -> None:
    print(f"hyperfence data-plane cost breakdown ({env_summary()}), {N_VMS} VMs declared, 3 created")
    print(
        f"64-B UDP vm1->vm2, {seconds:g} s per flood, {reps} repetitions; sender on CPU0. Paired ratio of a"
    )
    print(
        "repetition = (step's two floods) / (a's two floods right around them, ABBA); median [min-max] over"
    )
    print("repetitions; d = change of the median paired ratio from the step above\n")
    head = f"{'step':<44} {'est kpps':>8} {'x est':>5} {'[spread]':>13} {'d':>6}   {'new kpps':>8} "
    head += f"{'x new':>5} {'[spread]':>13} {'d':>6}"
    print(head)
    print("-" * len(head))
    prev_e = prev_n = 1.0
    for s in steps:
        pe, pn = s.x_est, s.x_new
        me, mn = median(pe), median(pn)
        print(
            f"{s.key + ' ' + s.title:<44} {median(s.est):>8.0f} {me:>5.2f} "
            f"{'[' + fmt(min(pe)) + '-' + fmt(max(pe)) + ']':>13} {me - prev_e:>+6.2f}   "
            f"{median(s.new):>8.0f} {mn:>5.2f} {'[' + fmt(min(pn)) + '-' + fmt(max(pn)) + ']':>13} "
            f"{mn - prev_n:>+6.2f}"
        )
        if s.key != "a0":
            prev_e, prev_n = me, mn
    print("\npaired ratios per repetition (run order):")
    for s in steps:
        print(f"  {s.key:<4} est {[round(x, 2) for x in s.x_est]}  new {[round(x, 2) for x in s.x_new]}")


# ------------------------------------------------------------------------------------------------ perf

SENDERS = ("udpflood", "ksoftirqd/0")  # the sender and, when softirq work is deferred, its CPU's ksoftirqd
PERF_HZ = 2999
# Where a sample of the sender's CPU time is spent, by the innermost frame of its stack that is one of these
# (a sample in `nft_lookup` called by `nft_do_chain_bridge` is the bridge table's). A bridge-table sample is
# placed in its hook by the frame that called the hook: the guard runs from `br_handle_frame` (bridge
# prerouting, before br_netfilter), egress from `br_nf_hook_thresh` (bridge prerouting chains after
# br_netfilter's own hook), ingress from `br_forward_finish` (bridge postrouting).
CATEGORIES = {
    "nft_do_chain_inet": "hyperfence inet table (pre: marker, caps)",
    "nft_do_chain_ipv4": "the lab's NAT table (baseline too)",
    "nf_conntrack_in": "conntrack lookup (baseline too)",
    "__nf_conntrack_confirm": "conntrack confirm (baseline too)",
    "nf_hook_slow": "hook dispatch (nf_hook_slow)",
}
BRIDGE_CALLERS = {
    "br_handle_frame": "hyperfence bridge: guard (prerouting -300)",
    "br_nf_hook_thresh": "hyperfence bridge: egress (prerouting +10)",
    "br_forward_finish": "hyperfence bridge: ingress (postrouting +10)",
}


def classify(frames: list[str]) -> str:
    """The category of one sample; `frames` innermost first."""
    for i, f in enumerate(frames):
        if f == "nft_do_chain_bridge":
            caller = next((g for g in frames[i + 1 :] if g in BRIDGE_CALLERS), "")
            return BRIDGE_CALLERS.get(caller, "hyperfence bridge: other hook")
        if f in CATEGORIES:
            return CATEGORIES[f]
        if f.startswith("br_nf_"):
            return "br_netfilter's own work (baseline too)"
    return "rest: socket, UDP/IP, veth, bridge forwarding"


def perf_profile(plan: LabPlan, tool: str, step: Step, wd: Path, *, seconds: float, mode: str) -> Profile:
    """The sender CPU's time while the `mode` flood runs through `step`, by category, and per packet."""
    load(plan, step)
    data = wd / f"perf-{step.key}-{mode}.data"
    try:
        conntrack_flush(plan)
        rec = subprocess.Popen(
            [
                "perf",
                "record",
                "-q",
                "-g",
                "-F",
                str(PERF_HZ),
                "-C",
                SENDER_CPU,
                "-o",
                str(data),
                "--",
                "sleep",
                f"{seconds}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kpps = udp_kpps(plan, tool, "vm1", "vm2", seconds=seconds + 1, mode=mode)
        rec.wait(timeout=60)
    finally:
        unload(plan, step)
    done = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,ip,sym"], capture_output=True, text=True, check=False
    )
    if not done.stdout:
        log(f"perf script gave nothing: {done.stderr[-300:]}")
    data.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    leaves: dict[tuple[str, str], int] = {}
    for block in done.stdout.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines or lines[0].strip() not in SENDERS:
            continue
        frames = [ln.split(maxsplit=1)[1] if len(ln.split()) > 1 else "" for ln in lines[1:]]
        cat = classify(frames)
        counts[cat] = counts.get(cat, 0) + 1
        if cat.startswith("hyperfence") and frames:
            leaf = (cat, frames[0])
            leaves[leaf] = leaves.get(leaf, 0) + 1
    return Profile(step.key, mode, kpps, seconds, counts, leaves)


@dataclass
class Profile:
    key: str
    mode: str
    kpps: float
    seconds: float
    counts: dict[str, int]
    leaves: dict[tuple[str, str], int]  # (category, innermost function) -> samples, hyperfence's only


def report_profiles(profiles: list[Profile]) -> None:
    """Per step and flow, the repetitions' samples and packets summed: µs of the sender's CPU per packet by
    category, hyperfence's own share of it, and the rate ratio that share implies (1 - share: the step's
    packet costs what the bare bridge's does plus hyperfence's part, measured within the same samples, so
    the drift of the rest between runs cancels)."""
    cats = sorted({c for p in profiles for c in p.counts})
    for mode in ("est", "new"):
        keys = list(dict.fromkeys(p.key for p in profiles if p.mode == mode))
        if not keys:
            continue
        merged = {k: _merge([p for p in profiles if p.mode == mode and p.key == k]) for k in keys}
        reps = len([p for p in profiles if p.mode == mode and p.key == keys[0]])
        print(
            f"\nsender CPU time per 64-B packet, `{mode}` flood (perf cpu-clock at {PERF_HZ} Hz on CPU0, samples"
        )
        print(
            f"of the sender and ksoftirqd/0 only, {reps} profile(s) per step summed): µs per packet and share"
        )
        print(f"{'':<48}" + "".join(f"{k:>14}" for k in keys))
        for c in cats:
            cells = "".join(f"{merged[k].us(c):>7.3f} {100 * merged[k].share(c):>4.0f}% " for k in keys)
            print(f"{c:<48}{cells}")
        print(f"{'total':<48}" + "".join(f"{merged[k].us(None):>7.3f} {'':>6}" for k in keys))
        print(
            f"{'hyperfence (sum of its chains)':<48}"
            + "".join(f"{merged[k].us(HF):>7.3f} {100 * merged[k].share(HF):>4.0f}% " for k in keys)
        )
        spread = {k: _hf_spread([p for p in profiles if p.mode == mode and p.key == k]) for k in keys}
        print(f"{'  the same, each profile alone: min-max':<48}" + "".join(f"{spread[k]:>14}" for k in keys))
        print(
            f"{'implied ratio vs bare (1 - hyperfence share)':<48}"
            + "".join(f"{1 - merged[k].share(HF):>14.2f}" for k in keys)
        )
        print(f"{'samples':<48}" + "".join(f"{merged[k].samples:>14}" for k in keys))
        print(
            f"{'rate during the profiles, kpps (median)':<48}"
            + "".join(f"{merged[k].kpps:>14.0f}" for k in keys)
        )
        last = merged[keys[-1]]
        top = sorted(last.leaves.items(), key=lambda kv: -kv[1])[:12]
        print(f"hottest functions inside hyperfence's chains in {keys[-1]} ({mode}), µs per packet:")
        for (cat, fn), n in top:
            print(f"  {n / PERF_HZ / last.packets * 1e6:5.3f}  {fn:<34} {cat}")


HF = "hyperfence"


@dataclass
class Merged:
    counts: dict[str, int]
    leaves: dict[tuple[str, str], int]
    samples: int
    packets: float
    kpps: float

    def _n(self, cat: str | None) -> int:
        if cat is None:
            return self.samples
        if cat == HF:
            return sum(n for c, n in self.counts.items() if c.startswith(HF))
        return self.counts.get(cat, 0)

    def us(self, cat: str | None) -> float:
        return self._n(cat) / PERF_HZ / self.packets * 1e6 if self.packets else float("nan")

    def share(self, cat: str | None) -> float:
        return self._n(cat) / self.samples if self.samples else float("nan")


def _hf_spread(ps: list[Profile]) -> str:
    """min-max over the profiles of hyperfence's µs per packet, each profile on its own."""
    vals = [_merge([p]).us(HF) for p in ps]
    return f"{min(vals):.3f}-{max(vals):.3f}"


def _merge(ps: list[Profile]) -> Merged:
    counts: dict[str, int] = {}
    leaves: dict[tuple[str, str], int] = {}
    for p in ps:
        for c, n in p.counts.items():
            counts[c] = counts.get(c, 0) + n
        for lf, n in p.leaves.items():
            leaves[lf] = leaves.get(lf, 0) + n
    packets = sum(p.kpps * 1e3 * p.seconds for p in ps)
    return Merged(counts, leaves, sum(counts.values()), packets, median([p.kpps for p in ps]))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4, help="repetitions of the rate ladder (0: none)")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one rate flood")
    ap.add_argument("--only", default="", help="comma-separated step keys (a always runs)")
    ap.add_argument("--perf", action="store_true", help="also profile every step with perf (needs `perf`)")
    ap.add_argument("--perf-seconds", type=float, default=2.0, help="length of one profiled flood")
    ap.add_argument("--perf-reps", type=int, default=3, help="profiles per step and flow (summed)")
    ap.add_argument("--dump", default="", help="write each step's nft text into this directory")
    args = ap.parse_args()
    require_tools("nft", "conntrack", "ping", "gcc", "taskset", *(["perf"] if args.perf else []))
    wd = workdir("hf-bench-bd-")
    plan = plan_lab("pf" + secrets.token_hex(2), N_VMS)
    engine: Engine | None = None
    t0 = time.perf_counter()
    try:
        tool = build_udpflood(wd)
        log(f"creating lab {plan.name}: {N_VMS} VMs planned, 3 created")
        fresh_lab(plan, only=3)
        engine = Engine(netns=plan.host_netns, state_dir=str(wd / "state"), flavour=Flavour.BR_NETFILTER)
        engine.store.put_policy(hyperfence_document(plan), source="bench/breakdown.py")
        log("compiling and applying hyperfence's ruleset once, to list it")
        engine.converge(full=True)
        listing = "".join(host(plan, ["nft", "list", "table", f, n]) for f, n in HF_TABLES if f != "netdev")
        nft_delete_tables(plan, HF_TABLES)
        wanted = set(args.only.split(",")) | {"a"} if args.only else None
        steps = [
            Step(
                k,
                t,
                None if p in (None, NO_CONNTRACK) else step_ruleset(listing, p),
                nat_off=p is NO_CONNTRACK,
                filtering=p is not None and p.policy,
            )
            for k, t, p in STEPS
            if wanted is None or k in wanted
        ]
        full = step_ruleset(listing, FULL)
        if full.count(' comment "') != listing.count(' comment "'):  # every hyperfence rule has a comment
            raise BenchError("step k7 lost rules of hyperfence's listing: the step builder is wrong")
        ifindex = {
            link["ifname"]: int(link["ifindex"]) for link in json.loads(host(plan, ["ip", "-j", "link"]))
        }
        steps += [
            Step(k, t, fn(full, ifindex), filtering=True)
            for k, t, fn in EXPERIMENTS
            if wanted is not None and k in wanted
        ]
        if args.dump:
            for s in steps:
                if s.text is not None:
                    Path(args.dump, f"{s.key}.nft").write_text(s.text, encoding="utf-8")
        if args.reps:
            ladder = [s for s in steps if s.key != "a"]
            run(plan, tool, ladder, args.reps, args.seconds)
            report(ladder, args.reps, args.seconds)
        if args.perf:
            profiles = []
            for rep, s, mode in itertools.product(range(args.perf_reps), steps, ("est", "new")):
                log(f"perf {rep + 1}/{args.perf_reps}: {s.key} {mode}")
                profiles.append(perf_profile(plan, tool, s, wd, seconds=args.perf_seconds, mode=mode))
            report_profiles(profiles)
        print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
        return 0
    finally:
        if engine is not None:
            engine.close()
        topology.destroy_lab(plan.name)
        shutil.rmtree(wd, ignore_errors=True)


def run(plan: LabPlan, tool: str, steps: list[Step], reps: int, seconds: float) -> None:
    for rep in range(reps):
        shift = rep % len(steps)
        for s in steps[shift:] + steps[:shift]:
            log(f"rep {rep + 1}/{reps}: {s.key} ({s.title})")
            measure(plan, tool, s, seconds)


if __name__ == "__main__":
    sys.exit(main())
