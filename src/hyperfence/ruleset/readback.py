"""What the kernel holds (`nft -j list table ...` output) -> the IR, plus rule handles. Pure.

Only hyperfence's own tables are ever listed and parsed; foreign tables never reach this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hyperfence.ruleset.expr import ETHER_TYPE
from hyperfence.ruleset.ir import JSON, Chain, NftSet, Rule, Ruleset, TableId, canonical

RuleKey = tuple[TableId, str, str]  # table, chain, comment
# How nft lists the raw ethertype payload the compiler writes (see `expr.ETHER_TYPE`): hyperfence never
# writes the symbolic field, so every listed one is its raw form.
LISTED_ETHER_TYPE = canonical({"payload": {"protocol": "ether", "field": "type"}})
RAW_ETHER_TYPE = canonical(ETHER_TYPE)


def _rule_expr(expr: JSON) -> str:
    text = canonical(expr)
    return text.replace(LISTED_ETHER_TYPE, RAW_ETHER_TYPE) if LISTED_ETHER_TYPE in text else text


@dataclass(frozen=True)
class Actual:
    """The kernel's state as last read, with the handles needed to change single rules."""

    ruleset: Ruleset
    handles: dict[RuleKey, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Actual:
        return cls(Ruleset((), (), (), ()))


def parse_listing(objects: Iterable[JSON]) -> Actual:
    """Parse the `nftables` array of one or more `list table` outputs (metainfo entries are skipped).

    Rules without a comment (someone added them by hand) get the id `?handle=N`, so the planner sees them
    as foreign and deletes them.
    """
    tables: list[TableId] = []
    chains: list[Chain] = []
    sets: list[NftSet] = []
    rules: list[Rule] = []
    handles: dict[RuleKey, int] = {}
    for obj in objects:
        if "table" in obj:
            t = obj["table"]
            tables.append(TableId(t["family"], t["name"]))
        elif "chain" in obj:
            c = obj["chain"]
            chains.append(
                Chain(
                    TableId(c["family"], c["table"]),
                    c["name"],
                    type=c.get("type"),
                    hook=c.get("hook"),
                    priority=c.get("prio"),
                    policy=c.get("policy"),
                    device=c.get("dev"),
                )
            )
        elif "set" in obj or "map" in obj:
            s = obj.get("set") or obj["map"]
            elems = frozenset(canonical(e) for e in s.get("elem", []))
            flags = tuple(s.get("flags", ()))
            key_type = s["type"] if isinstance(s["type"], str) else " . ".join(s["type"])
            sets.append(
                NftSet(TableId(s["family"], s["table"]), s["name"], key_type, flags, s.get("map"), elems)
            )
        elif "rule" in obj:
            r = obj["rule"]
            table = TableId(r["family"], r["table"])
            comment = r.get("comment") or f"?handle={r['handle']}"
            rules.append(Rule(table, r["chain"], comment, _rule_expr(r["expr"])))
            handles[(table, r["chain"], comment)] = int(r["handle"])
    return Actual(Ruleset(tuple(tables), tuple(chains), tuple(sets), tuple(rules)), handles)


def rule_counters(objects: Iterable[JSON]) -> dict[RuleKey, tuple[int, int]]:
    """(packets, bytes) of every commented rule's first counter, from a listing."""
    out: dict[RuleKey, tuple[int, int]] = {}
    for obj in objects:
        r = obj.get("rule")
        if not r or not r.get("comment"):
            continue
        for stmt in r["expr"]:
            if "counter" in stmt and isinstance(stmt["counter"], dict):
                c = stmt["counter"]
                out[(TableId(r["family"], r["table"]), r["chain"], r["comment"])] = (
                    int(c.get("packets", 0)),
                    int(c.get("bytes", 0)),
                )
                break
    return out
