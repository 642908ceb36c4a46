"""A tiny model of what nftables does with the commands the planner emits (for unit tests only)."""

from __future__ import annotations

import re
from typing import Any

from hyperfence.ruleset.ir import Chain, NftSet, Rule, Ruleset, TableId, canonical


class FakeKernel:
    def __init__(self, rs: Ruleset, handles: dict[tuple[TableId, str, str], int]) -> None:
        self.tables = list(rs.tables)
        self.chains = {(c.table, c.name): c for c in rs.chains}
        self.sets = {(s.table, s.name): s for s in rs.sets}
        self.rules: dict[tuple[TableId, str], list[tuple[int, Rule]]] = {k: [] for k in self.chains}
        for r in rs.rules:
            self.rules[(r.table, r.chain)].append((handles[(r.table, r.chain, r.comment)], r))
        # Like the kernel: a handle is never reused, also not by a model built from an earlier model's state.
        self.next_handle = max([10_000, *handles.values()])

    def apply(self, commands: list[Any]) -> None:
        for cmd in commands:
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            getattr(self, f"_{verb}_{kind}")(obj)

    def _t(self, o: dict[str, Any]) -> TableId:
        return TableId(o["family"], o.get("table", o.get("name")))

    def _add_table(self, o: dict[str, Any]) -> None:
        t = TableId(o["family"], o["name"])
        if t not in self.tables:
            self.tables.append(t)

    def _delete_table(self, o: dict[str, Any]) -> None:
        t = TableId(o["family"], o["name"])
        self.tables.remove(t)
        for d in (self.chains, self.sets, self.rules):
            for k in [k for k in d if k[0] == t]:
                del d[k]

    def _add_chain(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        self.chains[key] = Chain(
            key[0], o["name"], o.get("type"), o.get("hook"), o.get("prio"), o.get("policy")
        )
        self.rules.setdefault(key, [])

    def _flush_chain(self, o: dict[str, Any]) -> None:
        self.rules[(self._t(o), o["name"])] = []

    def _delete_chain(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        assert not self.rules[key], "deleting a non-empty chain"
        # Like the kernel (EBUSY): a chain that a map verdict or a rule still jumps to cannot be deleted.
        target = f'"target":"{key[1]}"'
        assert not any(target in e for (t, _), st in self.sets.items() if t == key[0] for e in st.elements), (
            f"deleting chain {key[1]} while a map still refers to it"
        )
        assert not any(
            target in r.expr for (t, _), rules in self.rules.items() if t == key[0] for _, r in rules
        ), f"deleting chain {key[1]} while a rule still jumps to it"
        del self.chains[key], self.rules[key]

    def _add_set(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        self.sets[key] = NftSet(
            key[0],
            o["name"],
            o["type"],
            tuple(o.get("flags", ())),
            o.get("map"),
            frozenset(canonical(e) for e in o.get("elem", [])),
        )

    _add_map = _add_set

    def _delete_set(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        # Like the kernel (EBUSY): a set that a rule still looks up cannot be deleted.
        assert not any(
            f'"@{key[1]}"' in r.expr for (t, _), rules in self.rules.items() if t == key[0] for _, r in rules
        ), f"deleting set {key[1]} while a rule still refers to it"
        del self.sets[key]

    _delete_map = _delete_set

    def _add_element(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        s = self.sets[key]
        new = {canonical(e) for e in o["elem"]}
        assert not new & s.elements, "adding an element that exists"
        self.sets[key] = NftSet(s.table, s.name, s.key_type, s.flags, s.map_type, s.elements | new)

    def _delete_element(self, o: dict[str, Any]) -> None:
        key = (self._t(o), o["name"])
        s = self.sets[key]
        gone = {canonical(e) for e in o["elem"]}
        assert gone <= s.elements, "deleting a missing element"
        self.sets[key] = NftSet(s.table, s.name, s.key_type, s.flags, s.map_type, s.elements - gone)

    def _rule(self, o: dict[str, Any]) -> Rule:
        rule = Rule(self._t(o), o["chain"], o["comment"], canonical(o["expr"]))
        # Like the kernel (ENOENT, the whole batch refused): a rule may only look up a set that exists.
        for name in re.findall(r'"@([^"]+)"', rule.expr):
            assert (rule.table, name) in self.sets, f"rule {rule.comment} refers to missing set {name}"
        return rule

    def _index(self, o: dict[str, Any]) -> int:
        rules = self.rules[(self._t(o), o["chain"])]
        return next(i for i, (h, _) in enumerate(rules) if h == o["handle"])

    def _add_rule(self, o: dict[str, Any]) -> None:
        rules = self.rules[(self._t(o), o["chain"])]
        self.next_handle += 1
        pos = self._index(o) + 1 if "handle" in o else len(rules)
        rules.insert(pos, (self.next_handle, self._rule(o)))

    def _insert_rule(self, o: dict[str, Any]) -> None:
        rules = self.rules[(self._t(o), o["chain"])]
        self.next_handle += 1
        rules.insert(self._index(o) if "handle" in o else 0, (self.next_handle, self._rule(o)))

    def _replace_rule(self, o: dict[str, Any]) -> None:
        rules = self.rules[(self._t(o), o["chain"])]
        i = self._index(o)
        rules[i] = (rules[i][0], self._rule(o))

    def _delete_rule(self, o: dict[str, Any]) -> None:
        rules = self.rules[(self._t(o), o["chain"])]
        del rules[self._index(o)]

    def ruleset(self) -> Ruleset:
        return Ruleset(
            tuple(self.tables),
            tuple(self.chains.values()),
            tuple(sorted(self.sets.values(), key=lambda s: s.name)),
            tuple(r for k in self.chains for _, r in self.rules[k]),
        )

    def handles(self) -> dict[tuple[TableId, str, str], int]:
        return {(k[0], k[1], r.comment): h for k, rules in self.rules.items() for h, r in rules}
