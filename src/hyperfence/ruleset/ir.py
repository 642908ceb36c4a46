"""The nftables state hyperfence owns, as plain comparable values (the IR).

The compiler produces a `Ruleset`; readback parses what the kernel holds into the same shape; the planner
diffs the two. Rule expressions and set elements are kept as canonical JSON text (keys sorted, counters
zeroed) in exactly the numeric form `nft -j` lists them, so "the kernel holds what we applied" is a string
comparison, not a guess.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

JSON = Any


def canonical(obj: JSON) -> str:
    """Stable text of a JSON value: sorted keys, no spaces, every counter zeroed."""
    return json.dumps(_zero_counters(obj), sort_keys=True, separators=(",", ":"))


def _zero_counters(obj: JSON) -> JSON:
    if isinstance(obj, dict):
        if set(obj) == {"counter"} and isinstance(obj["counter"], dict):
            return {"counter": {"bytes": 0, "packets": 0}}
        return {k: _zero_counters(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_zero_counters(v) for v in obj]
    return obj


class TableId(NamedTuple):
    """A named tuple, not a dataclass: it is hashed tens of thousands of times per plan."""

    family: str
    name: str


@dataclass(frozen=True)
class Chain:
    table: TableId
    name: str
    type: str | None = None  # base chains only: filter / nat
    hook: str | None = None
    priority: int | None = None
    policy: str | None = None
    # netdev ingress chains. Not compared: nft 1.0.6 lists netdev chains without their device, so equality
    # (readback vs desired) cannot see it; hyperfence names those chains after the device instead.
    device: str | None = field(default=None, compare=False)

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True)
class NftSet:
    """A named set or map. `elements` hold canonical JSON texts of the elements."""

    table: TableId
    name: str
    key_type: str
    flags: tuple[str, ...] = ()
    map_type: str | None = None  # "verdict" for verdict maps
    elements: frozenset[str] = frozenset()

    @property
    def kind(self) -> str:
        return "map" if self.map_type else "set"

    def shape(self) -> tuple[str, tuple[str, ...], str | None]:
        """What cannot change in place: a different shape means delete and re-create."""
        return (self.key_type, self.flags, self.map_type)


@dataclass(frozen=True)
class Rule:
    """One nft rule. `comment` is its id, unique within its chain; `expr` canonical JSON of its statements."""

    table: TableId
    chain: str
    comment: str
    expr: str

    def statements(self) -> list[JSON]:
        result: list[JSON] = json.loads(self.expr)
        return result


@dataclass(frozen=True)
class Delta:
    """`Ruleset` R equals `base()` except for the chains (with their rules) and sets named here. A weak
    reference, so a chain of compiles never keeps old rulesets alive."""

    base: weakref.ref[Ruleset]
    chains: frozenset[tuple[TableId, str]]
    sets: frozenset[tuple[TableId, str]]


@dataclass(frozen=True)
class Ruleset:
    tables: tuple[TableId, ...]
    chains: tuple[Chain, ...]
    sets: tuple[NftSet, ...]
    rules: tuple[Rule, ...]  # in chain order
    # Set by an incremental compile: how this ruleset differs from the one compiled before it.
    delta: Delta | None = field(default=None, compare=False, hash=False, repr=False)

    def chain_rules(self) -> dict[tuple[TableId, str], list[Rule]]:
        """Rules by chain, in order. Computed once per ruleset: callers must not change the result."""
        return self._chain_rules

    def preset_chain_rules(self, by_chain: dict[tuple[TableId, str], list[Rule]]) -> None:
        """For builders that already hold the rules grouped by chain (same content as `rules`)."""
        self.__dict__["_chain_rules"] = by_chain

    def preset_lookups(
        self,
        chains: dict[tuple[TableId, str], Chain] | None,
        sets: dict[tuple[TableId, str], NftSet] | None,
    ) -> None:
        """For builders that already hold `chain_by_key()` / `set_by_key()` (same content)."""
        if chains is not None:
            self.__dict__["_chain_by_key"] = chains
        if sets is not None:
            self.__dict__["_set_by_key"] = sets

    @functools.cached_property
    def _chain_rules(self) -> dict[tuple[TableId, str], list[Rule]]:
        out: dict[tuple[TableId, str], list[Rule]] = {(c.table, c.name): [] for c in self.chains}
        for r in self.rules:
            out.setdefault((r.table, r.chain), []).append(r)
        return out

    def set_by_key(self) -> dict[tuple[TableId, str], NftSet]:
        return self._set_by_key

    @functools.cached_property
    def _set_by_key(self) -> dict[tuple[TableId, str], NftSet]:
        return {(s.table, s.name): s for s in self.sets}

    def chain_by_key(self) -> dict[tuple[TableId, str], Chain]:
        return self._chain_by_key

    @functools.cached_property
    def _chain_by_key(self) -> dict[tuple[TableId, str], Chain]:
        return {(c.table, c.name): c for c in self.chains}

    def counts(self) -> dict[str, int]:
        return {
            "tables": len(self.tables),
            "chains": len(self.chains),
            "sets": len(self.sets),
            "rules": len(self.rules),
            "elements": sum(len(s.elements) for s in self.sets),
        }
