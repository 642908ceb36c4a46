"""`hyperfence logs`: the traffic log written by the daemon (JSON lines)."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated, Any

import typer
from rich.text import Text

from hyperfence.cli.output import out, plain
from hyperfence.errors import NotFoundError
from hyperfence.reconcile.traffic import TRAFFIC_FILE


def _matches(rec: dict[str, Any], vm: str | None, verdict: str | None) -> bool:
    return (vm is None or rec.get("vm") == vm) and (verdict is None or rec.get("verdict") == verdict)


def logs_cmd(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Option(help="Only this VM.")] = None,
    verdict: Annotated[str | None, typer.Option(help="allow, deny, spoof, reject, flood or cap.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    lines: Annotated[int, typer.Option("-n", help="How many recent events.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON lines.")] = False,
) -> None:
    """Traffic events (allowed and denied) logged by the rules, newest last."""
    path = os.path.join(ctx.obj.state_dir, TRAFFIC_FILE)
    if not os.path.exists(path):
        raise NotFoundError(f"no traffic log at {path}: is `hyperfence daemon` running for this state dir?")
    with open(path, encoding="utf-8") as f:
        recent = [r for r in (_load(line) for line in f) if r is not None and _matches(r, vm, verdict)]
        for rec in recent[-lines:]:
            _print(rec, as_json=as_json)
        while follow:
            line = f.readline()
            if not line:
                time.sleep(0.2)
                continue
            new = _load(line)
            if new is not None and _matches(new, vm, verdict):
                _print(new, as_json=as_json)


def _load(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _print(rec: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(rec), soft_wrap=True)
        return

    def field(key: str, default: object = "?") -> str:
        return plain(rec.get(key, default))

    ports = f":{field('sport')} -> " if "sport" in rec else " -> "
    dst = field("dst") + (f":{field('dport')}" if "dport" in rec else "")
    verdict = field("verdict")
    line = Text(f"{field('time')} ")
    line.append(f"{verdict:6}", style="green" if verdict == "allow" else "red")
    line.append(
        f" {plain(rec.get('vm') or '-'):10} {field('direction'):3} "
        f"{plain(rec.get('protocol', rec.get('ethertype', '?'))):5} "
        f"{field('src')}{ports}{dst}  rule={field('rule', None)}"
    )
    out.print(line)
