"""Data-plane benchmark: what hyperfence costs the traffic it lets through, against a bare bridge and against a
naive one-rule-per-address ruleset. Run as root from the repository root:

    .venv/bin/python bench/dataplane.py            # full run: 3 interleaved repetitions, medians (~3 min)
    .venv/bin/python bench/dataplane.py --quick    # smoke run: 1 repetition, short durations (~30 s)
    .venv/bin/python bench/dataplane.py --variants --reps 5 --seconds 2   # a, b + hand-built variants (~8 min)
    .venv/bin/python bench/dataplane.py --variants --only a,b,v1,h3,v2,v3 --reps 5 --seconds 2

Cases, all in one lab ("bdp": 1,000 VMs planned, only vm1..vm3 created; the kernel rules declare all 1,000):
  a0) no nft table at all in the host namespace (the lab's NAT table removed, so no conntrack): reference only
  a)  bare bridge: the lab as `create_lab` makes it (its NAT table => conntrack runs), no firewall: BASELINE
  b)  hyperfence: 1,000 VMs, 10,000 addresses in an IP set, 1,000 per-VM rules, applied through the Engine
  an) bare bridge with `bridge-nf-call-iptables=0` (br_netfilter's hooks return at once): BASELINE of bn
  bn) hyperfence, bridge_native flavour (bridge conntrack and reject, no br_netfilter work), same policy as b;
      only where the kernel offers it (Debian's stock kernel: run it in the host-root guest, docs/hostroot.md)
  c)  naive: the same policy as linear rules (one rule per address, linear per-port dispatch, no sets/maps),
      stateful with the same inet ct-mark trick; the benchmark flows are dispatched last and pass the 10,000
      address rules before reaching their own accept rules (as in a large iptables/nwfilter-style ruleset)

Traffic (vm1 -> vm2 unless said): TCP throughput (iperf3, 1 stream), 64-byte UDP datagrams received per second
(sendmmsg generator, recvmmsg sink; `est`: the flow had one reply, so conntrack calls it established; `new`:
never any reply, so every packet is NEW and walks the policy), ping RTT vm1 -> vm3 (median of 200 at 5 ms, and
the mean of 2,000 back-to-back `ping -A`). Every repetition runs every case once (order rotated) so drift hits
all cases alike; values are medians, and paired ratios (case / a within one repetition) are printed too.
Each flavour is judged against its own bare bridge: b against a (the sysctl on, as br_netfilter needs), bn
against an (the sysctl off, as bridge_native leaves it); `flavours:` lines print those paired ratios.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FLOOD_PORT,
    IPERF_PORT,
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
    ping_busy_rtt_us,
    ping_ok,
    ping_rtt_us,
    require_tools,
    start_iperf_server,
    tcp_gbps,
    udp_kpps,
    workdir,
)

from hyperfence.adapters import kernel_probe
from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan, nat_ruleset, plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.model.kernel import Flavour
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import TABLES

LAB = "bdp"
N_VMS = 1000
N_ADDRS = 10_000
N_FRONT = 10  # VMs labelled tier=front: they get the admin rule whose source is the 10,000-address set
MARK = 0x00200000  # hyperfence's default conntrack mark bit (settings.conntrack_mark)
HF_TABLES = [(t.family, t.name) for t in TABLES]
NAIVE_TABLES = [("bridge", "hfnaive"), ("inet", "hfnaive")]
GOAL_RATIO = 0.95
GOAL_RTT_DELTA_US = 2.0


def admin_addresses() -> list[str]:
    """10,000 addresses no two of which are adjacent (hyperfence merges adjacent ones into ranges)."""
    base = ipaddress.IPv4Address("172.16.0.0")
    return [str(base + 2 * i) for i in range(N_ADDRS)]


def bench_rules(n: int) -> list[dict[str, Any]]:
    """The policy's rules: the admin rule (10k-address set), one rule per VM, then the benchmark flows."""
    rules: list[dict[str, Any]] = [
        {"id": "admin-ssh", "from": "ipset:admins", "to": "label:tier=front", "services": ["tcp/22"]}
    ]
    rules += [
        {"id": f"peer{i}", "from": f"vm:vm{i}", "to": f"vm:vm{i % n + 1}", "services": ["tcp/80"]}
        for i in range(1, n + 1)
    ]
    rules += [
        {
            "id": "bench",
            "from": "vm:vm1",
            "to": "vm:vm2",
            "services": [f"tcp/{IPERF_PORT}", f"udp/{IPERF_PORT}", f"udp/{FLOOD_PORT}"],
        },
        {"id": "bench-ping", "from": "vm:vm1", "to": "vm:vm3", "protocol": "icmp"},
    ]
    return rules


def hyperfence_document(plan: LabPlan) -> dict[str, Any]:
    labels = {f"vm{i}": {"tier": "front"} for i in range(1, N_FRONT + 1)}
    doc = lab_policy(plan, bench_rules(len(plan.vms)), labels=labels)
    doc["ipsets"] = {"admins": admin_addresses()}
    return doc


# ------------------------------------------------------------------------------------ the naive ruleset


def _naive_vm_chains(plan: LabPlan, i: int, est: str) -> list[tuple[str, list[str]]]:
    """The guard, out and in chains of VM `i` (1-based) in the naive ruleset."""
    vms, n = plan.vms, len(plan.vms)
    vm, nxt, prv = vms[i - 1], vms[i % n], vms[(i - 2) % n]
    out: list[str] = []
    inn: list[str] = []
    arp: set[str] = {str(nxt.ip), str(prv.ip)} - {str(vm.ip)}
    if i <= N_FRONT:
        out.append("jump admins_out")
        inn.append("jump admins_in")
        arp.add(str(plan.gateway))
    out += [est, "udp sport 67 udp dport 68 counter drop", f"ip daddr {nxt.ip} tcp dport 80 counter accept"]
    inn += [est, f"ip saddr {prv.ip} tcp dport 80 counter accept"]
    bench = (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", FLOOD_PORT))
    if vm.name == "vm1":
        out += [f"ip daddr {vms[1].ip} {proto} dport {port} counter accept" for proto, port in bench]
        out.append(f"ip daddr {vms[2].ip} ip protocol icmp counter accept")
        arp |= {str(vms[1].ip), str(vms[2].ip)}
    if vm.name == "vm2":
        inn += [f"ip saddr {vms[0].ip} {proto} dport {port} counter accept" for proto, port in bench]
        arp.add(str(vms[0].ip))
    if vm.name == "vm3":
        inn.append(f"ip saddr {vms[0].ip} ip protocol icmp counter accept")
        arp.add(str(vms[0].ip))
    for peer in sorted(arp):
        out.append(f"arp daddr ip {peer} counter accept")
        inn.append(f"arp saddr ip {peer} arp daddr ip {vm.ip} counter accept")
    out.append("counter drop")
    inn.append("counter drop")
    guard = [
        f"ether saddr {vm.mac} ip saddr {vm.ip} accept",
        f"ether saddr {vm.mac} arp saddr ether {vm.mac} arp saddr ip {vm.ip} accept",
        "counter drop",
    ]
    return [("guard", guard), ("out", out), ("in", inn)]


def naive_ruleset(plan: LabPlan) -> tuple[str, int]:
    """The same policy as `hyperfence_document`, the way a rule-per-address generator writes it.

    Returns (nft text, number of rules). Two tables of our own: `inet hfnaive` (the same ct-mark marker as
    hyperfence) and `bridge hfnaive` (guard/egress/ingress with the same hooks and priorities as hyperfence,
    but a linear `iifname "vpN" jump ...` list instead of a verdict map, ordered vm1000 .. vm1 so the three
    real VMs are dispatched last, and the 10,000 admin addresses as 10,000 rules in a shared chain that every
    front VM's chains jump to *before* their established shortcut and their own allow rules).
    """
    n = len(plan.vms)
    vms = plan.vms
    keep = 0xFFFFFFFF & ~MARK
    est = f"meta mark & {MARK:#010x} == {MARK:#010x} counter accept"
    lines: list[str] = []
    w = lines.append
    rules = 0
    for fam, name in NAIVE_TABLES:
        w(f"add table {fam} {name}\ndelete table {fam} {name}")
    w("table inet hfnaive {")
    for chain, hook in (("pre", "prerouting"), ("out", "output")):
        w(f"  chain {chain} {{\n    type filter hook {hook} priority -150; policy accept;")
        w(f"    ct state established,related counter meta mark set meta mark | {MARK:#010x} accept")
        w(f"    meta mark set meta mark & {keep:#010x}\n  }}")
        rules += 2
    w("}")
    w("table bridge hfnaive {")
    order = list(reversed(vms))  # vm1000 first ... vm1 last: the benchmark VMs are dispatched last
    for base, hook, prio, key, suffix in (
        ("guard", "prerouting", -300, "iifname", "guard"),
        ("egress", "prerouting", 10, "iifname", "out"),
        ("ingress", "postrouting", 10, "oifname", "in"),
    ):
        w(f"  chain {base} {{\n    type filter hook {hook} priority {prio}; policy drop;")
        for vm in order:
            w(f'    {key} "{vm.port}" jump {vm.name}_{suffix}')
        w("    counter drop\n  }")
        rules += n + 1
    admins = admin_addresses()
    w("  chain admins_in {")
    for a in admins:
        w(f"    ip saddr {a} tcp dport 22 counter accept")
    w("  }\n  chain admins_out {")
    for a in admins:  # the replies of those connections, stateful as nwfilter writes it: per rule
        w(f"    ip daddr {a} tcp sport 22 {est}")
    w("  }")
    rules += 2 * len(admins)
    for i, vm in enumerate(vms, start=1):
        for suffix, body in _naive_vm_chains(plan, i, est):
            w(f"  chain {vm.name}_{suffix} {{")
            lines.extend(f"    {r}" for r in body)
            w("  }")
            rules += len(body)
    w("}")
    return "\n".join(lines) + "\n", rules


# ------------------------------------------------------------------------------- fast-path variants

VAR_TABLES = [("bridge", "hfvar"), ("inet", "hfvar")]


def _prelude() -> str:
    return "".join(f"add table {f} {n}\ndelete table {f} {n}\n" for f, n in VAR_TABLES)


def variant_ladder(plan: LabPlan, *, bridge: bool, guard: str, counters: bool, policy: bool = False) -> str:
    """Hand-built pieces of hyperfence's established fast path, each on top of the bare lab.

    `bridge`: add the egress (prerouting +10) and ingress (postrouting +10) chains with only the established
    check (policy accept: new packets pass unfiltered). `guard`: "none"; "vmap" = hyperfence's anti-spoofing
    (prerouting -300, `iifname vmap` over all 1,000 ports -> per-VM chain `ether saddr . ip saddr` rule);
    "set" = the same check as one concatenated-set lookup in the base chain (no jump). `policy`: the egress
    and ingress chains also filter new packets with the benchmark policy the way the reference design does
    it: `iifname/oifname vmap` to a per-VM chain holding ONE `addr . l4proto . dport` set lookup (the 10,000
    admin addresses in one shared concatenated set), ICMP and ARP rules, drop.
    """
    cnt = "counter " if counters else ""
    keep = 0xFFFFFFFF & ~MARK
    out = [
        _prelude(),
        "table inet hfvar {",
        "  chain pre {",
        "    type filter hook prerouting priority -150; policy accept;",
    ]
    out += [
        f"    ct state established,related {cnt}meta mark set meta mark | {MARK:#010x} accept",
        f"    meta mark set meta mark & {keep:#010x}",
        "  }",
        "}",
    ]
    if not bridge:
        return "\n".join(out) + "\n"
    out.append("table bridge hfvar {")
    if guard == "vmap":
        elems = ", ".join(f'"{vm.port}" : jump g_{vm.name}' for vm in plan.vms)
        out.append(f"  map guard_ports {{ type ifname : verdict; elements = {{ {elems} }} }}")
        out += ["  chain guard {", "    type filter hook prerouting priority -300; policy drop;"]
        out += ["    iifname vmap @guard_ports", "  }"]
        for vm in plan.vms:
            out += [
                f"  chain g_{vm.name} {{",
                f"    ether saddr {vm.mac} ip saddr {vm.ip} accept",
                f"    ether saddr {vm.mac} arp saddr ether {vm.mac} arp saddr ip {vm.ip} accept",
                "    drop",
                "  }",
            ]
    elif guard == "set":
        ip4 = ", ".join(f'"{vm.port}" . {vm.mac} . {vm.ip}' for vm in plan.vms)
        arp = ", ".join(f'"{vm.port}" . {vm.mac} . {vm.mac} . {vm.ip}' for vm in plan.vms)
        out.append(f"  set guard4 {{ type ifname . ether_addr . ipv4_addr; elements = {{ {ip4} }} }}")
        out.append(
            f"  set guardarp {{ type ifname . ether_addr . ether_addr . ipv4_addr; elements = {{ {arp} }} }}"
        )
        out += [
            "  chain guard {",
            "    type filter hook prerouting priority -300; policy drop;",
            "    iifname . ether saddr . ip saddr @guard4 accept",
            "    iifname . ether saddr . arp saddr ether . arp saddr ip @guardarp accept",
            "  }",
        ]
    est = f"meta mark & {MARK:#010x} == {MARK:#010x} {cnt}accept"
    for name, hook in (("egress", "prerouting"), ("ingress", "postrouting")):
        out += [
            f"  chain {name} {{",
            f"    type filter hook {hook} priority 10; policy accept;",
            f"    {est}",
        ]
        if policy:
            key = "iifname" if name == "egress" else "oifname"
            out += [f"    {key} vmap @{name}_ports", "    drop"]
        out.append("  }")
    if policy:
        out += _policy_chains(plan)
    out.append("}")
    return "\n".join(out) + "\n"


def _policy_chains(plan: LabPlan) -> list[str]:
    vms, n = plan.vms, len(plan.vms)
    svc = "ipv4_addr . inet_proto . inet_service"
    out = [
        "  map egress_ports { type ifname : verdict; elements = { "
        + ", ".join(f'"{v.port}" : jump o_{v.name}' for v in vms)
        + " } }",
        "  map ingress_ports { type ifname : verdict; elements = { "
        + ", ".join(f'"{v.port}" : jump i_{v.name}' for v in vms)
        + " } }",
        f"  set admins {{ type {svc}; elements = {{ "
        + ", ".join(f"{a} . tcp . 22" for a in admin_addresses())
        + " } }",
    ]
    for i, vm in enumerate(vms, start=1):
        nxt, prv = vms[i % n], vms[(i - 2) % n]
        osvc, isvc = [f"{nxt.ip} . tcp . 80"], [f"{prv.ip} . tcp . 80"]
        arp = {str(nxt.ip), str(prv.ip)} - {str(vm.ip)}
        orules, irules = [], []
        if i <= N_FRONT:
            irules.append("ip saddr . meta l4proto . th dport @admins accept")
            arp.add(str(plan.gateway))
        if vm.name == "vm1":
            osvc += [
                f"{vms[1].ip} . {p} . {port}"
                for p, port in (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", FLOOD_PORT))
            ]
            orules.append(f"ip daddr {vms[2].ip} icmp type echo-request accept")
            arp |= {str(vms[1].ip), str(vms[2].ip)}
        if vm.name == "vm2":
            isvc += [
                f"{vms[0].ip} . {p} . {port}"
                for p, port in (("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("udp", FLOOD_PORT))
            ]
            arp.add(str(vms[0].ip))
        if vm.name == "vm3":
            irules.append(f"ip saddr {vms[0].ip} icmp type echo-request accept")
            arp.add(str(vms[0].ip))
        out.append(f"  set os_{vm.name} {{ type {svc}; elements = {{ {', '.join(osvc)} }} }}")
        out.append(f"  set is_{vm.name} {{ type {svc}; elements = {{ {', '.join(isvc)} }} }}")
        out.append(f"  set arp_{vm.name} {{ type ipv4_addr; elements = {{ {', '.join(sorted(arp))} }} }}")
        out += [
            f"  chain o_{vm.name} {{",
            "    udp sport 67 udp dport 68 drop",
            f"    ip daddr . meta l4proto . th dport @os_{vm.name} accept",
            *(f"    {r}" for r in orules),
            f"    arp daddr ip @arp_{vm.name} accept",
            "    drop",
            "  }",
            f"  chain i_{vm.name} {{",
            f"    ip saddr . meta l4proto . th dport @is_{vm.name} accept",
            *(f"    {r}" for r in irules),
            f"    arp saddr ip @arp_{vm.name} arp daddr ip {vm.ip} accept",
            "    drop",
            "  }",
        ]
    return out


def variant_empty_hooks() -> str:
    """v1 plus hyperfence's three bridge base chains (guard -300, egress +10, ingress postrouting +10) with
    no rule at all, policy accept: the bare cost of having those hooks on the path."""
    text = variant_ladder_inet_only()
    out = [text, "table bridge hfvar {"]
    for name, hook, prio in (
        ("guard", "prerouting", -300),
        ("egress", "prerouting", 10),
        ("ingress", "postrouting", 10),
    ):
        out += [f"  chain {name} {{", f"    type filter hook {hook} priority {prio}; policy accept;", "  }"]
    out.append("}")
    return "\n".join(out) + "\n"


def variant_ladder_inet_only() -> str:
    keep = 0xFFFFFFFF & ~MARK
    return "\n".join(
        [
            _prelude(),
            "table inet hfvar {",
            "  chain pre {",
            "    type filter hook prerouting priority -150; policy accept;",
            f"    ct state established,related counter meta mark set meta mark | {MARK:#010x} accept",
            f"    meta mark set meta mark & {keep:#010x}",
            "  }",
            "}",
        ]
    )


def variant_from_hyperfence(listing: str, *, counters: bool, port_first: bool, caps: bool = True) -> str:
    """hyperfence's own ruleset as the kernel lists it, renamed to `hfvar` and changed in one respect."""
    text = listing.replace("table bridge hyperfence {", "table bridge hfvar {")
    text = text.replace("table inet hyperfence {", "table inet hfvar {")
    if not caps:  # no new connection reaches a connection cap (the dispatch rules in `pre` removed)
        text = re.sub(r'^.*comment "sys:ct-cap-(?:out|in)"\n', "", text, flags=re.MULTILINE)
    if not counters:
        text = re.sub(r"\bcounter packets \d+ bytes \d+\s*", "", text)
    if port_first:  # the cheap port/protocol compare before the set lookup, so a non-matching rule fails fast
        text = re.sub(
            r"(ip [sd]addr @\S+) ((?:tcp|udp) dport (?:\{[^}]*\}|\S+)|ip protocol \S+|icmp type \S+)",
            r"\2 \1",
            text,
        )
    return _prelude() + text


def variant_cases(plan: LabPlan, hf_listing: str, make: Callable[..., Case]) -> list[Case]:
    def unload() -> None:
        nft_delete_tables(plan, VAR_TABLES)

    def loader(text: str) -> Callable[[], float]:
        return lambda: nft_load(plan, text)

    specs = [
        (
            "v1",
            "inet ct-mark chain only",
            variant_ladder(plan, bridge=False, guard="none", counters=True),
            False,
        ),
        ("h3", "v1 + 3 empty bridge base chains", variant_empty_hooks(), False),
        (
            "v2",
            "v1 + bridge egress/ingress est check",
            variant_ladder(plan, bridge=True, guard="none", counters=True),
            False,
        ),
        (
            "v3",
            "v2 + vmap guard (= hf established path)",
            variant_ladder(plan, bridge=True, guard="vmap", counters=True),
            False,
        ),
        (
            "v3n",
            "v3 without counters",
            variant_ladder(plan, bridge=True, guard="vmap", counters=False),
            False,
        ),
        (
            "v3s",
            "v3n with guard as 1 concat-set lookup",
            variant_ladder(plan, bridge=True, guard="set", counters=False),
            False,
        ),
        (
            "v4",
            "v3n + reference-style policy (1 lookup)",
            variant_ladder(plan, bridge=True, guard="vmap", counters=False, policy=True),
            True,
        ),
        (
            "v4s",
            "v4 with the concat-set guard (proposal)",
            variant_ladder(plan, bridge=True, guard="set", counters=False, policy=True),
            True,
        ),
        (
            "hfn",
            "hyperfence (b) without any counter",
            variant_from_hyperfence(hf_listing, counters=False, port_first=False),
            True,
        ),
        (
            "hfp",
            "hyperfence (b), port match before set",
            variant_from_hyperfence(hf_listing, counters=True, port_first=True),
            True,
        ),
        (
            "hfc",
            "hyperfence (b) without connection caps",
            variant_from_hyperfence(hf_listing, counters=True, port_first=False, caps=False),
            True,
        ),
    ]
    return [make(key, title, loader(text), unload, filtering) for key, title, text, filtering in specs]


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    key: str
    title: str
    load: Callable[[], float | None]  # returns the apply/load time in seconds (None: nothing to load)
    unload: Callable[[], None]
    filtering: bool  # the ruleset must deny vm3 -> vm2 ping
    info: str = ""
    loads: list[float] = field(default_factory=list)
    tcp: list[float] = field(default_factory=list)
    udp_est: list[float] = field(default_factory=list)
    udp_new: list[float] = field(default_factory=list)
    rtt: list[float] = field(default_factory=list)
    rtt_busy: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


@dataclass
class Settings:
    reps: int
    tcp_s: float
    udp_s: float
    pings: int
    busy_pings: int


def measure(plan: LabPlan, tool: str, case: Case, st: Settings) -> None:
    conntrack_flush(plan)
    if not ping_ok(plan, "vm1", "vm3"):
        raise BenchError(f"case {case.key}: vm1 -> vm3 ping does not pass")
    denied = not ping_ok(plan, "vm3", "vm2")
    if case.filtering and not denied:
        raise BenchError(f"case {case.key}: vm3 -> vm2 ping passes, the ruleset does not filter")
    rtt, lost = ping_rtt_us(plan, "vm1", "vm3", st.pings)
    case.rtt.append(rtt)
    case.lost.append(lost)
    case.rtt_busy.append(ping_busy_rtt_us(plan, "vm1", "vm3", st.busy_pings))
    case.tcp.append(tcp_gbps(plan, "vm1", "vm2", st.tcp_s))
    case.udp_est.append(udp_kpps(plan, tool, "vm1", "vm2", seconds=st.udp_s, mode="est"))
    case.udp_new.append(udp_kpps(plan, tool, "vm1", "vm2", seconds=st.udp_s, mode="new"))
    log(
        f"  {case.key}: tcp {case.tcp[-1]:.2f} Gbit/s, udp est {case.udp_est[-1]:.0f} kpps, "
        f"udp new {case.udp_new[-1]:.0f} kpps, rtt {rtt:.1f} us (lost {lost}), busy rtt "
        f"{case.rtt_busy[-1]:.2f} us, vm3->vm2 denied={denied}"
    )


def run_cases(plan: LabPlan, tool: str, cases: list[Case], st: Settings) -> None:
    for rep in range(st.reps):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            log(f"rep {rep + 1}/{st.reps}: case {case.key} ({case.title})")
            t = case.load()
            if t is not None:
                case.loads.append(t)
            try:
                measure(plan, tool, case, st)
            finally:
                case.unload()


def report(cases: list[Case], base_key: str, st: Settings, extra: list[str]) -> None:
    base = next(c for c in cases if c.key == base_key)
    b_tcp, b_est, b_new = median(base.tcp), median(base.udp_est), median(base.udp_new)
    b_rtt, b_busy = median(base.rtt), median(base.rtt_busy)
    print(
        f"\nmedians of {st.reps} repetition(s); ratios (x) and deltas (d) vs case {base_key} ({base.title})"
    )
    head = (
        f"{'case':<46} {'load s':>7} {'TCP Gb/s':>8} {'xTCP':>5} {'UDPest kpps':>11} {'xest':>5} "
        f"{'UDPnew kpps':>11} {'xnew':>5} {'RTT5ms us':>9} {'dRTT':>6} {'RTTbusy us':>10} {'dbusy':>6} {'lost':>4}"
    )
    print(head)
    print("-" * len(head))
    for c in cases:
        load = fmt(median(c.loads), 3) if c.loads else "-"
        print(
            f"{c.key + ') ' + c.title:<46} {load:>7} {fmt(median(c.tcp)):>8} {fmt(median(c.tcp) / b_tcp):>5} "
            f"{fmt(median(c.udp_est), 0):>11} {fmt(median(c.udp_est) / b_est):>5} "
            f"{fmt(median(c.udp_new), 0):>11} {fmt(median(c.udp_new) / b_new):>5} "
            f"{fmt(median(c.rtt), 1):>9} {median(c.rtt) - b_rtt:>+6.1f} "
            f"{fmt(median(c.rtt_busy), 2):>10} {median(c.rtt_busy) - b_busy:>+6.2f} {sum(c.lost):>4}"
        )
    print(
        "\npaired ratios: median over repetitions of (case / a) within the same repetition (cancels drift"
        " between repetitions)"
    )
    for c in cases:
        pr = [
            fmt(median([x / y for x, y in zip(getattr(c, k), getattr(base, k), strict=True)]))
            for k in ("tcp", "udp_est", "udp_new")
        ]
        drtt = median([x - y for x, y in zip(c.rtt_busy, base.rtt_busy, strict=True)])
        print(f"  {c.key:<5} TCP {pr[0]:>5}  UDP est {pr[1]:>5}  UDP new {pr[2]:>5}  busy RTT {drtt:+.2f} us")
    print("\nper repetition (in run order):")
    for c in cases:
        print(
            f"  {c.key:<5} tcp {[round(x, 2) for x in c.tcp]}  est {[round(x) for x in c.udp_est]}  "
            f"new {[round(x) for x in c.udp_new]}  rtt5 {[round(x, 1) for x in c.rtt]}  "
            f"busy {[round(x, 2) for x in c.rtt_busy]}  load_s {[round(x, 3) for x in c.loads]}"
        )
    for c in cases:
        if c.info:
            print(f"  {c.key}: {c.info}")
    for line in extra:
        print(line)


def goals(cases: list[Case], key: str, base_key: str) -> None:
    c = next(x for x in cases if x.key == key)
    b = next(x for x in cases if x.key == base_key)
    checks = [
        (
            "TCP",
            median(c.tcp) / median(b.tcp),
            f">= {GOAL_RATIO}x",
            median(c.tcp) / median(b.tcp) >= GOAL_RATIO,
        ),
        (
            "UDP est pps",
            median(c.udp_est) / median(b.udp_est),
            f">= {GOAL_RATIO}x",
            median(c.udp_est) / median(b.udp_est) >= GOAL_RATIO,
        ),
        (
            "UDP new pps",
            median(c.udp_new) / median(b.udp_new),
            f">= {GOAL_RATIO}x",
            median(c.udp_new) / median(b.udp_new) >= GOAL_RATIO,
        ),
    ]
    print(f"\ngoals for ({key}) vs ({base_key}):")
    for name, value, goal, ok in checks:
        print(f"  {name:<12} {value:5.2f}x   goal {goal:<8} {'PASS' if ok else 'FAIL'}")
    for name, vals, bvals in (("RTT @5ms", c.rtt, b.rtt), ("RTT busy", c.rtt_busy, b.rtt_busy)):
        d = median(vals) - median(bvals)
        verdict = "PASS" if d <= GOAL_RTT_DELTA_US else "FAIL"
        print(f"  {name:<12} {d:+5.2f} us goal <= +{GOAL_RTT_DELTA_US} us {verdict}")


# ------------------------------------------------------------------------------------------------- main


CALL_IPTABLES = "net.bridge.bridge-nf-call-iptables"


def native_cases(plan: LabPlan, wd: Path) -> tuple[list[Case], Engine | None]:
    """Cases an and bn where the kernel offers bridge_native ([] elsewhere), and bn's engine (to close)."""
    probe_engine = Engine(netns=plan.host_netns, state_dir=str(wd / "probe"))
    try:
        native = kernel_probe.probe(probe_engine.nft).bridge_native
    finally:
        probe_engine.close()
    if not native:
        log("the kernel has no bridge conntrack + reject: no bridge_native cases (an, bn)")
        return [], None
    engine = Engine(netns=plan.host_netns, state_dir=str(wd / "state-native"), flavour=Flavour.BRIDGE_NATIVE)
    engine.store.put_policy(hyperfence_document(plan), source="bench/dataplane.py")

    def sysctl(value: int) -> None:
        host(plan, ["sysctl", "-qw", f"{CALL_IPTABLES}={value}"])

    def bn_load() -> float:
        sysctl(0)
        t = time.perf_counter()
        _, result = engine.converge(full=True)
        assert result is not None
        assert result.changed
        return time.perf_counter() - t

    def bn_unload() -> None:
        nft_delete_tables(plan, HF_TABLES)
        sysctl(1)

    cases = [
        Case("an", "bare bridge, bridge-nf-call-iptables=0", lambda: sysctl(0), lambda: sysctl(1), False),
        Case("bn", "hyperfence bridge_native, 1000 VMs, 10k addr", bn_load, bn_unload, True),
    ]
    return cases, engine


def flavour_ratios(cases: list[Case]) -> list[str]:
    """Each flavour against its own bare bridge, paired within each repetition."""
    by = {c.key: c for c in cases}
    lines = []
    for key, base in (("b", "a"), ("bn", "an")):
        if key in by and base in by:
            c, b = by[key], by[base]
            pr = [
                fmt(median([x / y for x, y in zip(getattr(c, k), getattr(b, k), strict=True)]))
                for k in ("tcp", "udp_est", "udp_new")
            ]
            flavour = "bridge_native" if key == "bn" else "br_netfilter"
            lines.append(
                f"flavours: {flavour:<13} ({key}/{base}) TCP {pr[0]:>5}  64-B UDP est {pr[1]:>5}  "
                f"64-B UDP new {pr[2]:>5}"
            )
    return lines


def build_cases(plan: LabPlan, engine: Engine, wd: Path) -> tuple[list[Case], Callable[[], float]]:
    """The cases a0, a, b, c; also returns the hyperfence loader (the variants need its listing)."""
    # The lab's NAT table goes away for case a0 only and is restored right after.
    nat_text = nat_ruleset(plan)

    doc = hyperfence_document(plan)
    engine.store.put_policy(doc, source="bench/dataplane.py")
    log("compiling the hyperfence policy (parse + resolve + compile)")
    t0 = time.perf_counter()
    compiled = engine.compiled()
    compile_s = time.perf_counter() - t0
    assert compiled is not None
    counts = compiled.ruleset.counts()
    naive_text, naive_rules = naive_ruleset(plan)
    (wd / "naive.nft").write_text(naive_text, encoding="utf-8")

    def hf_load() -> float:
        t = time.perf_counter()
        _, result = engine.converge(full=True)
        assert result is not None
        assert result.changed
        return time.perf_counter() - t

    def nat_off() -> None:
        nft_delete_tables(plan, [("ip", plan.nat_table)])

    def nat_on() -> None:
        nft_load(plan, nat_text)

    cases = [
        Case("a0", "no tables at all (no NAT, no conntrack)", nat_off, nat_on, False),
        Case("a", "bare bridge (lab NAT => conntrack on)", lambda: None, lambda: None, False),
        Case(
            "b",
            "hyperfence, 1000 VMs, 10k addresses",
            hf_load,
            lambda: nft_delete_tables(plan, HF_TABLES),
            True,
            info=(
                f"hyperfence: {counts['chains']} chains, {counts['rules']} rules, {counts['sets']} sets, "
                f"{counts['elements']} set elements; compile {compile_s:.2f} s (once), load = "
                f"Engine.converge(full=True) into an empty kernel"
            ),
        ),
        Case(
            "c",
            "naive linear rules, 1000 VMs, 10k addresses",
            lambda: nft_load(plan, naive_text),
            lambda: nft_delete_tables(plan, NAIVE_TABLES),
            True,
            info=f"naive: {naive_rules} rules, no sets or maps; load = `nft -f` of the whole file",
        ),
    ]
    return cases, hf_load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, short durations (smoke run)")
    ap.add_argument("--variants", action="store_true", help="also measure hand-built fast-path variants")
    ap.add_argument(
        "--only", default="", help="with --variants: comma-separated case keys to run (a, b, v1...)"
    )
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--seconds", type=float, default=0, help="TCP and UDP test duration (default 3)")
    args = ap.parse_args()
    st = (
        Settings(reps=1, tcp_s=1, udp_s=1, pings=50, busy_pings=500)
        if args.quick
        else Settings(3, 3, 3, 200, 2000)
    )
    if args.reps:
        st.reps = args.reps
    if args.seconds:
        st.tcp_s = st.udp_s = args.seconds
    require_tools("iperf3", "nft", "conntrack", "ping", "gcc", "taskset")
    wd = workdir("hf-bench-dp-")
    plan = plan_lab(LAB, N_VMS)
    engine: Engine | None = None
    native_engine: Engine | None = None
    t_start = time.perf_counter()
    try:
        tool = build_udpflood(wd)
        log(f"creating lab {LAB}: {N_VMS} VMs planned, 3 created")
        fresh_lab(plan, only=3)
        start_iperf_server(plan, "vm2")
        engine = Engine(netns=plan.host_netns, state_dir=str(wd / "state"), flavour=Flavour.BR_NETFILTER)
        cases, hf_load = build_cases(plan, engine, wd)
        extra_cases, native_engine = native_cases(plan, wd)
        cases = [*cases[:2], *extra_cases, *cases[2:]]
        if args.variants:
            hf_load()
            listing = "".join(host(plan, ["nft", "list", "table", f, n]) for f, n in HF_TABLES)
            nft_delete_tables(plan, HF_TABLES)
            cases = [c for c in cases if c.key in ("a", "b", "an", "bn")] + variant_cases(plan, listing, Case)
            if args.only:
                cases = [c for c in cases if c.key in args.only.split(",")]
        run_cases(plan, tool, cases, st)
        print(
            f"hyperfence data-plane benchmark ({env_summary()}), lab {LAB}: {N_VMS} VMs declared, 3 created"
        )
        print(
            f"traffic: vm1->vm2 TCP iperf3 -t {st.tcp_s:g}, 64-B UDP {st.udp_s:g} s (est/new), "
            f"ping vm1->vm3 x{st.pings} @5 ms; sender pinned to CPU0, receiver to CPU1"
        )
        report(
            cases,
            "a",
            st,
            ["", *flavour_ratios(cases), f"\ntotal wall time {time.perf_counter() - t_start:.0f} s"],
        )
        goals(cases, "b", "a")
        return 0
    finally:
        if engine is not None:
            engine.close()
        if native_engine is not None:
            native_engine.close()
        topology.destroy_lab(LAB)
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
