"""`hyperfence demo`: the papers' experiment, narrated, on a fresh lab (removed at the end)."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Annotated

import typer
from rich.console import Console

from hyperfence.cli import render
from hyperfence.cli.output import plain
from hyperfence.lab.agent_experiment import run_agent_experiment
from hyperfence.lab.experiment import run_experiment
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.supervisor import StopSignal
from hyperfence.reconcile.traffic import TRAFFIC_FILE, TrafficLog
from hyperfence.ruleset.compile import TABLES, vm_sid
from hyperfence.ruleset.readback import rule_counters

out = Console(highlight=False, soft_wrap=True, emoji=False)  # markup: only in literals here


def demo_cmd(
    name: Annotated[str, typer.Option("--name", help="Lab name.")] = "demo",
    keep: Annotated[bool, typer.Option("--keep", help="Leave the lab up afterwards.")] = False,
    agents: Annotated[bool, typer.Option(help="Also show agents, heartbeats and isolation.")] = True,
) -> None:
    """Reproduce the papers' experiment on a lab of 3 VMs (network namespaces) with real packets."""
    out.print(
        "[bold]hyperfence demo[/bold]: 3 VMs on one virtual switch (a Linux bridge), an outside network "
        "behind the host's routing, a DHCP server on the bridge. Every VM is protected."
    )
    with LabSession(name, 3, keep=keep) as s:
        if s.engine is None:
            raise typer.Exit(1)
        for f in (TRAFFIC_FILE,):
            path = os.path.join(s.state_dir, f)
            if os.path.exists(path):
                os.unlink(path)
        stop = StopSignal()  # the daemon's traffic log alone (reconcile/traffic.py)
        logger = threading.Thread(target=TrafficLog(s.engine).run, args=(stop,), daemon=True)
        logger.start()
        obs = run_experiment(s, out.print)
        time.sleep(1.0)  # let the last log batch arrive
        stop.set()
        logger.join(timeout=3)
        _show_logs(os.path.join(s.state_dir, TRAFFIC_FILE))
        _show_stats(s)
        if agents:
            obs += run_agent_experiment(s, out.print)
        failed = [o for o in obs if not o.ok]
        out.print(f"\n[bold]{len(obs) - len(failed)} of {len(obs)} checks as the paper says[/bold]")
        if keep:
            out.print(
                f"the lab is still up: hyperfence --lab {name} ruleset show; hyperfence lab down --name {name}"
            )
    if failed:
        raise typer.Exit(1)


def _show_logs(path: str) -> None:
    out.print("\n[bold]Traffic log[/bold] (rate-limited NFLOG events; the last 8):")
    if not os.path.exists(path):
        out.print("   (none)")
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()[-8:]
    for line in lines:
        r = json.loads(line)
        port = f":{r['dport']}" if "dport" in r else ""
        text = (
            f"   {r['time'][11:23]} {r['verdict']:6} {r.get('vm') or '-':4} {r['direction']:3} "
            f"{r.get('protocol', r['ethertype']):5} {r.get('src', '?')} -> {r.get('dst', '?')}{port} "
            f"rule={r['rule']}"
        )
        out.print(plain(text), markup=False)


def _show_stats(s: LabSession) -> None:
    if s.engine is None:
        return
    objs = []
    for t in TABLES:
        objs.extend(s.engine.nft.list({"table": {"family": t.family, "name": t.name}}))
    compiled = s.engine.compiled()
    names = {vm_sid(v.id): v.name for v in compiled.policy.vms} if compiled else {}
    rows = [r for r in render.stats_rows(rule_counters(objs), names, by_vm=True) if r["packets"]]
    out.print("\n[bold]Per-rule counters[/bold] (hyperfence ruleset stats --by-vm), rules that matched:")
    for r in rows:
        out.print(
            plain(
                f"   {r['rule']:22} {r['vm']:5} {r['direction']:8} {r['packets']:6} packets {r['bytes']:8} bytes"
            ),
            markup=False,
        )
