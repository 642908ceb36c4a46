"""Make the kernel hold a desired ruleset: read back, plan, apply one atomic batch, read back and verify.

`Firewall.converge` is level-triggered: it never assumes what an event changed, it compares desired state
with what the kernel holds. With `full=True` it lists every hyperfence table (the periodic resync that
finds drift, such as a hand-run `nft flush ruleset`: when the bridge's dropping base chains are gone, a small
batch shuts every VM port first, `ruleset/closed.py`); otherwise it plans against the state it verified
after its previous apply and re-reads only what it touched, which keeps a one-rule change in the
milliseconds at 1,000 VMs. If an incremental batch is refused (someone changed the kernel meanwhile), it
falls back to a full read and a fresh plan.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

from hyperfence.errors import DriftError, KernelError
from hyperfence.ruleset.closed import fail_closed
from hyperfence.ruleset.ir import JSON, Chain, NftSet, Rule, Ruleset, TableId
from hyperfence.ruleset.plan import Plan, plan_changes
from hyperfence.ruleset.readback import Actual, RuleKey, parse_listing

VERIFY_PARTIAL_LIMIT = 64  # above this many touched objects, verification re-reads whole tables


class NftPort(Protocol):
    def apply(self, batch: dict[str, JSON]) -> None: ...
    def list(self, what: dict[str, JSON]) -> list[JSON]: ...
    def rule_ids(self, family: str, table: str, chain: str) -> builtins.list[tuple[int, str]]: ...


@dataclass
class ConvergeResult:
    changed: bool
    drift: list[str] = field(default_factory=list)  # what a full read found wrong before repairing it
    summary: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    full_replace: bool = False
    seconds: float = 0.0


def describe_drift(desired: Ruleset, actual: Ruleset) -> list[str]:
    """Human sentences for the differences between desired and actual (for events and `ruleset diff`)."""
    out: list[str] = []
    for t in desired.tables:
        if t not in actual.tables:
            out.append(f"table {t.family} {t.name} is missing")
    a_chains, a_sets = actual.chain_by_key(), actual.set_by_key()
    for k, c in desired.chain_by_key().items():
        if k[0] in actual.tables and k not in a_chains:
            out.append(f"chain {c.table.family} {c.table.name} {c.name} is missing")
    for k, s in desired.set_by_key().items():
        if k[0] not in actual.tables:
            continue
        if k not in a_sets:
            out.append(f"{s.kind} {s.name} is missing")
        elif a_sets[k].elements != s.elements:
            gone, extra = s.elements - a_sets[k].elements, a_sets[k].elements - s.elements
            out.append(f"{s.kind} {s.name}: {len(gone)} element(s) missing, {len(extra)} unexpected")
    a_rules, d_rules = actual.chain_rules(), desired.chain_rules()
    for k, want in d_rules.items():
        if k in a_chains and a_rules.get(k, []) != want:
            have = a_rules.get(k, [])
            missing = {r.comment for r in want} - {r.comment for r in have}
            unexpected = {r.comment for r in have} - {r.comment for r in want}
            out.append(
                f"chain {k[1]}: {len(missing)} rule(s) missing, {len(unexpected)} unexpected"
                + ("" if missing or unexpected else ", rules changed or out of order")
            )
    d_chains = desired.chain_by_key()
    for k in a_chains:
        if k not in d_chains and k[0] in desired.tables:
            out.append(f"chain {k[1]} is not hyperfence's")
    return out


def _only(rs: Ruleset, plan: Plan) -> Ruleset:
    """The part of `rs` a plan touched (its tables, touched chains with their rules, touched sets)."""
    by_chain = rs.chain_rules()
    chain_map, set_map = rs.chain_by_key(), rs.set_by_key()
    return dataclasses.replace(
        rs,
        chains=tuple(chain_map[k] for k in plan.touched_chains if k in chain_map),
        sets=tuple(set_map[k] for k in plan.touched_sets if k in set_map),
        rules=tuple(r for k in plan.touched_chains for r in by_chain.get(k, ())),
    )


class Firewall:
    def __init__(self, nft: NftPort, tables: tuple[TableId, ...]) -> None:
        self.nft = nft
        self.tables = tables
        self.actual: Actual | None = None

    def read(self) -> Actual:
        objs: list[JSON] = []
        for t in self.tables:
            objs.extend(self.nft.list({"table": {"family": t.family, "name": t.name}}))
        return parse_listing(objs)

    def converge(self, desired: Ruleset, *, full: bool = False) -> ConvergeResult:
        t0 = time.monotonic()
        drift: list[str] = []
        if full or self.actual is None:
            first_look = self.actual is None
            self.actual = self.read()
            # No hyperfence table at all on our first look is a first install, not drift.
            if not (first_look and not self.actual.ruleset.tables):
                drift = describe_drift(desired, self.actual.ruleset)
            closing = fail_closed(desired, self.actual.ruleset)
            if closing is not None:  # shut the VM ports now; the full batch below takes long at scale
                self.nft.apply(closing.batch())
                self.actual = self.read()
        plan = plan_changes(desired, self.actual)
        if plan.empty:
            return ConvergeResult(changed=False, drift=drift, seconds=time.monotonic() - t0)
        try:
            self.nft.apply(plan.batch())
        except KernelError:
            if full:
                raise
            # The kernel moved under us: plan again from what it really holds.
            self.actual = self.read()
            drift = describe_drift(desired, self.actual.ruleset)
            plan = plan_changes(desired, self.actual)
            self.nft.apply(plan.batch())
        self._verify(desired, plan)
        return ConvergeResult(
            changed=True,
            drift=drift,
            summary=plan.summary,
            commands=len(plan.commands),
            full_replace=plan.full_replace,
            seconds=time.monotonic() - t0,
        )

    def _verify(self, desired: Ruleset, plan: Plan) -> None:
        """Re-read what the batch touched and check it is exactly what we wanted."""
        old = self.actual
        if (
            old is None
            or plan.full_replace
            or len(plan.touched_chains) + len(plan.touched_sets) > VERIFY_PARTIAL_LIMIT
        ):
            actual = self.read()
            problems = describe_drift(desired, actual.ruleset)
            handles = actual.handles
        else:  # only what the batch touched is re-read, so only that is compared
            touched, handles = self._reread_touched(plan, desired, old)
            problems = describe_drift(_only(desired, plan), touched)
        if problems:
            self.actual = None  # unknown: the next converge reads everything
            raise DriftError("the kernel does not hold what was just applied: " + "; ".join(problems[:5]))
        # Verified: what the kernel holds is the desired ruleset (what the plan left alone already was). Keep
        # the desired objects themselves, so the next plan compares most chains by identity.
        self.actual = Actual(desired, handles)

    def _reread_touched(
        self, plan: Plan, desired: Ruleset, old: Actual
    ) -> tuple[Ruleset, dict[RuleKey, int]]:
        """The touched chains and sets as the kernel holds them now, and the rule handles updated."""
        handles = dict(old.handles)
        old_rules = old.ruleset.chain_rules()
        desired_chains, desired_rules, desired_sets = (
            desired.chain_by_key(),
            desired.chain_rules(),
            desired.set_by_key(),
        )
        chains: list[Chain] = []
        rules: list[Rule] = []
        for key in plan.touched_chains:
            t, name = key
            for r in old_rules.get(key, ()):
                handles.pop((t, name, r.comment), None)
            if key not in desired_chains:
                continue
            # The kernel's own list of (handle, comment) for this chain: ids, order and handles are checked
            # here; rule bodies are compared exactly by the next full read.
            by_comment = {r.comment: r for r in desired_rules.get(key, [])}
            chains.append(desired_chains[key])
            for handle, text in self.nft.rule_ids(t.family, t.name, name):
                comment = text or f"?handle={handle}"
                rules.append(by_comment.get(comment) or Rule(t, name, comment, "?"))
                handles[(t, name, comment)] = handle
        sets: list[NftSet] = []
        for key in plan.touched_sets:
            t, name = key
            kind = desired_sets[key].kind if key in desired_sets else "set"
            sets.extend(
                parse_listing(
                    self.nft.list({kind: {"family": t.family, "table": t.name, "name": name}})
                ).ruleset.sets
            )
        # The batch created any missing table (it applied atomically, or we would not be here).
        return Ruleset(desired.tables, tuple(chains), tuple(sets), tuple(rules)), handles
