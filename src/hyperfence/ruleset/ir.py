"""The nftables state hyperfence owns, as plain comparable values (the IR).

The compiler produces a `Ruleset`; readback parses what the kernel holds into the same shape; the planner
diffs the two. Rule expressions and set elements are kept as canonical JSON text (keys sorted, counters
zeroed) in exactly the numeric form `nft -j` lists them, so "the kernel holds what we applied" is a string
comparison, not a guess.
"""

from __future__ import annotations

import functools
import itertools
import json
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, overload

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


class ChainedRules(Sequence[Rule]):
    """Every rule of a ruleset in chain order, as the rules of its chains one after the other: what an
    incremental compile gives instead of a new tuple of all rules (at 10,000 VMs, 200,000 of them: 9 ms a
    change). Made into one tuple only when indexed; equal to the tuple of the same rules."""

    def __init__(self, by_chain: dict[tuple[TableId, str], list[Rule]], count: int) -> None:
        self._by_chain = by_chain
        self._count = count
        self._flat: tuple[Rule, ...] | None = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Rule]:
        return itertools.chain.from_iterable(self._by_chain.values())

    def _tuple(self) -> tuple[Rule, ...]:
        if self._flat is None:
            self._flat = tuple(self)
        return self._flat

    @overload
    def __getitem__(self, i: int) -> Rule: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Rule, ...]: ...

    def __getitem__(self, i: int | slice) -> Rule | tuple[Rule, ...]:
        return self._tuple()[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChainedRules | tuple):
            return len(self) == len(other) and self._tuple() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return f"ChainedRules({self._count} rules in {len(self._by_chain)} chains)"


@dataclass(frozen=True)
class Ruleset:
    tables: tuple[TableId, ...]
    chains: tuple[Chain, ...]
    sets: tuple[NftSet, ...]
    rules: tuple[Rule, ...] | ChainedRules  # in chain order
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
