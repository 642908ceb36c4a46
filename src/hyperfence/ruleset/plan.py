"""Desired vs actual -> the smallest batch of nft commands that makes the kernel hold the desired state.

The batch is applied atomically by the kernel (one transaction), so it either all happens or none of it.
Rules the kernel already holds, unchanged and in order, are left alone: their counters keep counting and
nothing is rewritten when nothing changed (an empty plan). Rules are matched by their comment (their id).

Command order inside a batch: create tables, chains and sets; remove stale set/map elements; add new
elements; delete rules and append rules (see `_plan_chain` for why nothing is inserted or replaced in
place); flush stale chains; delete stale sets and maps; delete stale chains. Each step only refers to objects that exist at
that point of the transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hyperfence.ruleset.ir import JSON, Chain, NftSet, Rule, Ruleset, TableId
from hyperfence.ruleset.readback import Actual


@dataclass
class Plan:
    commands: list[JSON] = field(default_factory=list)
    touched_chains: set[tuple[TableId, str]] = field(default_factory=set)
    touched_sets: set[tuple[TableId, str]] = field(default_factory=set)
    full_replace: bool = False
    summary: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.commands

    def count(self, what: str, n: int = 1) -> None:
        self.summary[what] = self.summary.get(what, 0) + n

    def batch(self) -> JSON:
        return {"nftables": self.commands}


def _t(table: TableId) -> dict[str, str]:
    return {"family": table.family, "table": table.name}


def chain_obj(c: Chain) -> JSON:
    obj: dict[str, JSON] = {**_t(c.table), "name": c.name}
    if c.is_base:
        obj.update({"type": c.type, "hook": c.hook, "prio": c.priority, "policy": c.policy})
        if c.device:
            obj["dev"] = c.device
    return obj


def set_obj(s: NftSet, *, with_elements: bool) -> JSON:
    key: JSON = s.key_type.split(" . ") if " . " in s.key_type else s.key_type
    obj: dict[str, JSON] = {**_t(s.table), "name": s.name, "type": key}
    if s.map_type:
        obj["map"] = s.map_type
    if s.flags:
        obj["flags"] = list(s.flags)
    if with_elements and s.elements:
        obj["elem"] = _elements(s.elements)
    return obj


def _elements(elements: frozenset[str] | set[str]) -> list[JSON]:
    return [json.loads(e) for e in sorted(elements)]


def rule_obj(r: Rule) -> JSON:
    return {**_t(r.table), "chain": r.chain, "expr": r.statements(), "comment": r.comment}


def plan_full(desired: Ruleset, tables: tuple[TableId, ...]) -> Plan:
    """Replace `tables` whole, in one transaction: `add table` (so `delete` cannot fail), `delete table`,
    then create everything. Used when an object's shape changed and for the first apply."""
    plan = Plan(full_replace=True)
    for t in tables:
        plan.commands.append({"add": {"table": {"family": t.family, "name": t.name}}})
        plan.commands.append({"delete": {"table": {"family": t.family, "name": t.name}}})
    _create_all(plan, desired, set(tables))
    return plan


def _create_all(plan: Plan, desired: Ruleset, tables: set[TableId]) -> None:
    for t in desired.tables:
        if t in tables:
            plan.commands.append({"add": {"table": {"family": t.family, "name": t.name}}})
    for c in desired.chains:
        if c.table in tables:
            plan.commands.append({"add": {"chain": chain_obj(c)}})
            plan.touched_chains.add((c.table, c.name))
    for s in desired.sets:
        if s.table in tables:
            plan.commands.append({"add": {s.kind: set_obj(s, with_elements=True)}})
            plan.touched_sets.add((s.table, s.name))
    for r in desired.rules:
        if r.table in tables:
            plan.commands.append({"add": {"rule": rule_obj(r)}})
    plan.count("rules", sum(1 for r in desired.rules if r.table in tables))


def plan_changes(desired: Ruleset, actual: Actual) -> Plan:
    """The incremental batch from `actual` to `desired` (empty when they are equal)."""
    act = actual.ruleset
    if desired is act:  # the very ruleset the kernel was verified to hold: nothing to compare
        return _plan(desired, actual, _Scope([], [], [], []))
    delta = desired.delta
    if delta is not None and delta.base() is act and desired.tables == act.tables:
        # `desired` was compiled from the very ruleset the kernel was verified to hold: only the chains and
        # sets that compile rebuilt can differ, so only those are compared (O(change), not O(ruleset)).
        return _plan(desired, actual, _Scope.of(delta.chains, delta.sets, desired, act))
    return _plan(desired, actual, _Scope.everything(desired, act))


Key = tuple[TableId, str]


@dataclass(frozen=True)
class _Scope:
    """The chain and set keys a plan compares: in the desired ruleset and in the actual one."""

    des_chains: list[Key]
    act_chains: list[Key]
    des_sets: list[Key]
    act_sets: list[Key]

    @staticmethod
    def everything(desired: Ruleset, actual: Ruleset) -> _Scope:
        return _Scope(
            list(desired.chain_by_key()),
            list(actual.chain_by_key()),
            list(desired.set_by_key()),
            list(actual.set_by_key()),
        )

    @staticmethod
    def of(chains: frozenset[Key], sets: frozenset[Key], desired: Ruleset, actual: Ruleset) -> _Scope:
        ck, sk = sorted(chains), sorted(sets)
        return _Scope(
            [k for k in ck if k in desired.chain_by_key()],
            [k for k in ck if k in actual.chain_by_key()],
            [k for k in sk if k in desired.set_by_key()],
            [k for k in sk if k in actual.set_by_key()],
        )


def _plan(desired: Ruleset, actual: Actual, scope: _Scope) -> Plan:
    act = actual.ruleset
    missing_tables = [t for t in desired.tables if t not in act.tables]
    act_chains, des_chains = act.chain_by_key(), desired.chain_by_key()
    act_sets, des_sets = act.set_by_key(), desired.set_by_key()
    # A changed hook, priority or set type cannot be altered in place: replace those tables whole.
    # (Identity first: after an incremental compile most objects are the very ones the kernel was verified
    # to hold, and comparing 3,000 dataclasses field by field is most of a one-rule plan at 1,000 VMs.)
    reshaped = {
        k[0]
        for k in scope.des_chains
        if (a := act_chains.get(k)) is not None and a is not (c := des_chains[k]) and a != c
    }
    reshaped |= {
        k[0]
        for k in scope.des_sets
        if (a2 := act_sets.get(k)) is not None and a2 is not (s := des_sets[k]) and a2.shape() != s.shape()
    }
    if reshaped:
        return plan_full(desired, tuple(sorted(reshaped | set(missing_tables))))

    plan = Plan()
    cmds = plan.commands
    for t in missing_tables:
        cmds.append({"add": {"table": {"family": t.family, "name": t.name}}})
    for k in scope.des_chains:
        if k not in act_chains:
            cmds.append({"add": {"chain": chain_obj(des_chains[k])}})
            plan.touched_chains.add(k)
            plan.count("chains+")
    for k in scope.des_sets:
        if k not in act_sets:
            s = des_sets[k]
            cmds.append({"add": {s.kind: set_obj(s, with_elements=True)}})
            plan.touched_sets.add(k)
            plan.count("sets+")
    # Elements: stale ones out first (an interval set refuses overlapping elements), then new ones in.
    adds: list[JSON] = []
    for k in scope.des_sets:
        if k not in act_sets:
            continue
        s, old = des_sets[k], act_sets[k].elements
        if old is s.elements:
            continue
        gone, new = old - s.elements, s.elements - old
        if gone:
            cmds.append({"delete": {"element": {**_t(s.table), "name": s.name, "elem": _elements(gone)}}})
            plan.count("elements-", len(gone))
        if new:
            adds.append({"add": {"element": {**_t(s.table), "name": s.name, "elem": _elements(new)}}})
            plan.count("elements+", len(new))
        if gone or new:
            plan.touched_sets.add(k)
    cmds.extend(adds)
    _plan_rules(plan, desired, actual, scope.des_chains)
    # Stale chains are emptied first, then stale sets and maps go (a map's verdicts may still name a stale
    # chain, and the kernel refuses to delete a chain something refers to), then the chains themselves.
    stale = [
        Chain(c.table, c.name)
        for k in scope.act_chains
        if k not in des_chains and (c := act_chains[k]).table in desired.tables
    ]
    cmds.extend({"flush": {"chain": chain_obj(c)}} for c in stale)
    for k in scope.act_sets:
        s = act_sets[k]
        if k not in des_sets and s.table in desired.tables:
            cmds.append({"delete": {s.kind: {**_t(s.table), "name": s.name}}})
            plan.count("sets-")
    cmds.extend({"delete": {"chain": chain_obj(c)}} for c in stale)
    if stale:
        plan.count("chains-", len(stale))
    return plan


def _plan_rules(plan: Plan, desired: Ruleset, actual: Actual, keys: list[Key]) -> None:
    des_rules = desired.chain_rules()
    act_rules = actual.ruleset.chain_rules()
    for key in keys:
        want = des_rules.get(key, [])
        have = act_rules.get(key, [])
        if have is want or have == want:
            continue
        plan.touched_chains.add(key)
        _plan_chain(plan, key, want, have, actual)
    # Rules in chains that should not exist go with their chain (flushed by the caller).


def _plan_chain(
    plan: Plan, key: tuple[TableId, str], want: list[Rule], have: list[Rule], actual: Actual
) -> None:
    table, chain = key
    # libnftables can only append (`add`) or prepend (`insert` without a handle) a rule cheaply: placing one
    # at a position makes it load every rule of the table first (~110 ms at 1,000 VMs, against ~5 ms). So
    # the planner keeps the longest prefix of the desired chain that the kernel already holds, unchanged and
    # in order (kernel rules in between are deleted), and appends the rest. Rules after the first change in
    # a chain therefore restart their counters; chains that did not change keep theirs.
    kept: set[str] = set()
    j = 0
    split = len(want)
    for i, r in enumerate(want):
        while j < len(have) and have[j].comment != r.comment:
            j += 1
        if j == len(have) or have[j].expr != r.expr:
            split = i
            break
        kept.add(r.comment)
        j += 1
    wanted = {r.comment for r in want}
    for r in have:
        if r.comment not in kept:
            handle = actual.handles[(table, chain, r.comment)]
            plan.commands.append({"delete": {"rule": {**_t(table), "chain": chain, "handle": handle}}})
            if r.comment not in wanted:
                plan.count("rules-")
    have_comments = {r.comment for r in have}
    for r in want[split:]:
        plan.commands.append({"add": {"rule": rule_obj(r)}})
        plan.count("rules~" if r.comment in have_comments else "rules+")
