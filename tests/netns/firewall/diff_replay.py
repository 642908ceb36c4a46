"""Replay (and shrink) disagreements that the differential test recorded with HYPERFENCE_DIFF_REPORT=FILE.

    python -m tests.netns.firewall.diff_replay FILE [--shrink] [--only N,M]

For every recorded disagreement (a JSON line: the policy as applied and the triple), a fresh lab applies the
policy and sends the triple again, and prints `can`'s answer next to the kernel's. With ``--shrink`` the
policy is made smaller while the same disagreement stays (the same verdict from `can`, the same answer
from the kernel): rules, then selectors and services of the rules that are left, flood limits, rule
priorities and IP set entries are dropped one at a time; the smallest policy's rules are printed as YAML.
Root only (lab namespaces), like the test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from hyperfence.lab.session import LabSession
from tests.netns.firewall.differential import (
    PROBE_TIMEOUT,
    RETRY_TIMEOUT,
    Agents,
    Triple,
    Version,
    policy_yaml,
    run_version,
)

TIMEOUT, RETRY = PROBE_TIMEOUT, RETRY_TIMEOUT


def _smaller(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Documents with one thing less than `doc`, the biggest cuts first."""
    rules = doc["rules"]
    for i in range(len(rules)):
        yield {**doc, "rules": rules[:i] + rules[i + 1 :]}
    if doc.get("limits"):
        yield {k: v for k, v in doc.items() if k != "limits"}
    for i, rule in enumerate(rules):
        for key in ("from", "to", "services", "ports"):
            items = rule.get(key)
            if isinstance(items, list) and len(items) > 1:
                for j in range(len(items)):
                    smaller = copy.deepcopy(doc)
                    del smaller["rules"][i][key][j]
                    yield smaller
        if "priority" in rule:
            smaller = copy.deepcopy(doc)
            del smaller["rules"][i]["priority"]
            yield smaller
    for name, items in (doc.get("ipsets") or {}).items():
        for j in range(len(items) if len(items) > 1 else 0):
            smaller = copy.deepcopy(doc)
            del smaller["ipsets"][name][j]
            yield smaller


def _same(lab: LabSession, agents: Agents, doc: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether `doc` still shows the recorded disagreement (the same `can` verdict, the same kernel answer)."""
    t = Triple(**record["triple"])
    outcome = run_version(lab, agents, doc, Version(frozenset(), (t,)), timeout=TIMEOUT, retry=RETRY)
    return any(
        d.expected.verdict == record["can"]["verdict"] and d.observed == record["kernel"]
        for d in outcome.disagreements
    )


def shrink(lab: LabSession, agents: Agents, record: dict[str, Any]) -> dict[str, Any]:
    doc = record["policy"]
    progress = True
    while progress:
        progress = False
        for smaller in _smaller(doc):
            try:
                same = _same(lab, agents, smaller, record)
            except Exception:  # noqa: S112 - a smaller policy the parser refuses (an unused IP set gone) is skipped
                continue
            if same:
                doc, progress = smaller, True
                break
    return doc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--only", default="", help="record numbers (1-based), comma-separated")
    args = parser.parse_args(argv)
    with open(args.report, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    wanted = {int(n) for n in args.only.split(",") if n}
    name = "df" + secrets.token_hex(2)
    with (
        tempfile.TemporaryDirectory() as tmp,
        LabSession(name, 4, state_dir=os.path.join(tmp, "state")) as lab,
    ):
        agents = Agents(lab)
        try:
            for n, record in enumerate(records, start=1):
                if (wanted and n not in wanted) or "triple" not in record:
                    continue
                t = Triple(**record["triple"])
                outcome = run_version(
                    lab, agents, record["policy"], Version(frozenset(), (t,)), timeout=TIMEOUT, retry=RETRY
                )
                lines = [d.line() for d in outcome.disagreements] or [f"{t}: agrees now"]
                print(
                    f"#{n} (recorded: can {record['can']['verdict']}, kernel {record['kernel']}): {lines[0]}"
                )
                if args.shrink and outcome.disagreements:
                    small = shrink(lab, agents, record)
                    keep = {k: small[k] for k in ("ipsets", "rules", "limits") if small.get(k)}
                    print("  smallest policy that still disagrees:")
                    print("    " + policy_yaml(keep).replace("\n", "\n    "))
                sys.stdout.flush()
        finally:
            agents.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
