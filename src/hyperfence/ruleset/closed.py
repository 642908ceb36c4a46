"""Fail closed first: the small batch that shuts every VM port while the whole ruleset is being put back.

When hyperfence's bridge table or its dropping base chains are gone (a hand-run `nft flush ruleset`, a
fresh boot), the VMs' traffic passes the bridge unfiltered until the repair's batch commits, and at 1,000 VMs
that batch (17,000 objects) takes the kernel ~0.6 s. So the converge first commits this one: the bridge
table with its `guard` (prerouting) and `ingress` (postrouting) base chains exactly as desired (policy drop),
each accepting only the uplink ports, and nothing else. Every VM port then gets nothing, in both directions,
a few milliseconds after the drift was seen; the full batch that follows adds the rest and replaces the
`sys:closed` rules in the same transaction, so there is no moment in between with the VMs open.
"""

from __future__ import annotations

import json

from hyperfence.ruleset import expr as x
from hyperfence.ruleset.build import BRIDGE, GUARD_MAP
from hyperfence.ruleset.ir import Rule, Ruleset
from hyperfence.ruleset.plan import Plan, chain_obj, rule_obj

CLOSED = "sys:closed"
BASE_CHAINS = ("guard", "ingress")  # prerouting and postrouting: what a VM sends and what it is sent
_PORT_MATCH = {"guard": "iifname", "ingress": "oifname"}


def fail_closed(desired: Ruleset, actual: Ruleset) -> Plan | None:
    """The batch that closes every VM port, when the kernel lacks the bridge table or one of its dropping
    base chains; None when they are there (or when the desired ruleset has none: nothing to close)."""
    wanted = {c.name: c for c in desired.chains if c.table == BRIDGE and c.name in BASE_CHAINS}
    have = {c.name for c in actual.chains if c.table == BRIDGE} if BRIDGE in actual.tables else set()
    missing = [wanted[name] for name in BASE_CHAINS if name in wanted and name not in have]
    if not missing:
        return None
    uplinks = uplink_ports(desired)
    plan = Plan()
    plan.commands.append({"add": {"table": {"family": BRIDGE.family, "name": BRIDGE.name}}})
    for chain in missing:
        plan.commands.append({"add": {"chain": chain_obj(chain)}})
        plan.touched_chains.add((BRIDGE, chain.name))
        plan.count("chains+")
        if uplinks:
            match = x.match(x.meta(_PORT_MATCH[chain.name]), x.anon_set(sorted(uplinks)))
            rule = Rule(BRIDGE, chain.name, CLOSED, json.dumps([match, x.ACCEPT], sort_keys=True))
            plan.commands.append({"add": {"rule": rule_obj(rule)}})
            plan.count("rules+")
    return plan


def uplink_ports(rs: Ruleset) -> list[str]:
    """The ports the guard map lets through without a VM chain (`accept`): the declared uplinks."""
    ports: list[str] = []
    for s in rs.sets:
        if s.table == BRIDGE and s.name == GUARD_MAP:
            for element in s.elements:
                port, verdict = json.loads(element)
                if isinstance(verdict, dict) and "accept" in verdict:
                    ports.append(str(port))
    return ports


def lets_through(actual: Ruleset, port: str) -> bool:
    """Does a ruleset the kernel holds let bridge port `port` through: there is no hyperfence bridge table
    (nothing filters the bridges), or the port is one of its uplinks. (Any other port, the kernel's
    ruleset gives nothing: a VM's is filtered, an unknown one is dropped.)"""
    return BRIDGE not in actual.tables or port in uplink_ports(actual)
