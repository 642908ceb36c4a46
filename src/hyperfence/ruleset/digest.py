"""A ruleset's fingerprint: equal rulesets have equal digests, and a change costs what it touched.

Why: a daemon that restarts, or resyncs, and finds the kernel's nftables generation where it left it
(reconcile/firewall.py) must still know that the ruleset it compiles now is the one the kernel was verified
to hold then, without listing the kernel (seconds at 10,000 VMs). It compares this digest with the one it
recorded.

The digest is the sum, modulo 2**128, of one 128-bit BLAKE2b hash per object: each table, each chain with
its rules in order, each set or map with its elements. Object keys are unique within a ruleset, so no two
terms can cancel out. A ruleset compiled incrementally (`Ruleset.delta`) from one whose digest is known gets
its digest by taking out the old terms of the chains and sets it rebuilt and adding the new ones:
O(change), not O(ruleset).
"""

from __future__ import annotations

import hashlib

from hyperfence.ruleset.ir import Chain, NftSet, Rule, Ruleset, TableId

MOD = 1 << 128


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest(), "big")


def _chain_term(chain: Chain, rules: list[Rule]) -> int:
    head = repr((chain.table, chain.name, chain.type, chain.hook, chain.priority, chain.policy))
    return _h("chain", head, *(f"{r.comment}\x1e{r.expr}" for r in rules))


def _set_term(s: NftSet) -> int:
    head = repr((s.table, s.name, s.key_type, s.flags, s.map_type))
    return _h("set", head, *sorted(s.elements))


def _table_term(t: TableId) -> int:
    return _h("table", t.family, t.name)


def digest(rs: Ruleset) -> int:
    """The whole ruleset's digest."""
    total = sum(_table_term(t) for t in rs.tables)
    by_chain = rs.chain_rules()
    total += sum(_chain_term(c, by_chain.get((c.table, c.name), [])) for c in rs.chains)
    total += sum(_set_term(s) for s in rs.sets)
    return total % MOD


def digest_after(rs: Ruleset, base: Ruleset, base_digest: int) -> int:
    """`digest(rs)`, computed from `base`'s when `rs` was compiled incrementally from `base`; else whole."""
    delta = rs.delta
    if delta is None or delta.base() is not base or rs.tables != base.tables:
        return digest(rs)
    total = base_digest
    for view, sign in ((base, -1), (rs, 1)):
        chains, sets, rules = view.chain_by_key(), view.set_by_key(), view.chain_rules()
        for key in delta.chains:
            if key in chains:
                total += sign * _chain_term(chains[key], rules.get(key, []))
        for key in delta.sets:
            if key in sets:
                total += sign * _set_term(sets[key])
    return total % MOD
