"""Overlays in the compiled ruleset, both data planes: a rate limit is a flood limit on what the VM sends,
a shield drops what is not established towards the VM (IPv4 only), and a changed overlay recompiles only
its VM."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.model.kernel import Flavour
from hyperfence.model.overlay import Merged
from hyperfence.policy.overlays import with_overlays
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import Resolved, resolve_policy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.compile import BRIDGE, CompileCache, compile_ruleset, vm_sid
from hyperfence.ruleset.ir import Ruleset
from tests.unit.policy.test_parse import doc

FLAVOURS = pytest.mark.parametrize("flavour", list(Flavour))
DHCP = {"from": "vm:vm2", "to": "host", "protocol": "dhcp"}


def resolved(rules: list[dict[str, Any]] | None = None) -> tuple[Resolved, str, str]:
    r = resolve_policy(parse_policy(doc(rules=rules or [])))
    ids = {vp.vm.name: vp.vm.id for vp in r.vms}
    return r, ids["vm1"], ids["vm2"]


def chain(rs: Ruleset, name: str) -> list[Any]:
    return rs.chain_rules()[(BRIDGE, name)]


@FLAVOURS
def test_a_rate_limit_is_a_flood_limit_on_what_the_vm_sends(flavour: Flavour) -> None:
    r, a, _ = resolved()
    rs = compile_ruleset(with_overlays(r, Merged(rate_limits=((a, 25),))), flavour=flavour)
    out = chain(rs, f"{vm_sid(a)}_out")
    (rule,) = [rl for rl in out if rl.comment == "sys:flood:overlay:rate"]
    assert rule.statements() == [
        x.match(x.payload("ip", "version"), 4),
        x.limit_over(25, 50),
        x.COUNTER,
        x.DROP,
    ]
    assert "sys:flood:overlay:rate" not in [rl.comment for rl in chain(rs, f"{vm_sid(a)}_in")]


@FLAVOURS
def test_a_shield_drops_ipv4_first_in_the_vms_ingress_chain(flavour: Flavour) -> None:
    r, a, b = resolved([DHCP])
    rs = compile_ruleset(with_overlays(r, Merged(shielded=frozenset({a, b}))), flavour=flavour)
    inn = chain(rs, f"{vm_sid(a)}_in")
    assert [rl.comment for rl in inn[:2]] == ["sys:shield:log", "sys:shield"]
    assert inn[1].statements() == [x.match(x.payload("ip", "version"), 4), x.COUNTER, x.DROP]
    assert "sys:shield" not in [rl.comment for rl in chain(rs, f"{vm_sid(a)}_out")]
    # a DHCP client: the server's answers (UDP to 68) go on to its rules
    inn_b = chain(rs, f"{vm_sid(b)}_in")
    assert [rl.comment for rl in inn_b[:4]] == [
        "sys:shield:log",
        "sys:shield",
        "sys:shield#2:log",
        "sys:shield#2",
    ]
    assert x.match(x.payload("udp", "dport"), 68, op="!=") in inn_b[3].statements()
    # the established shortcut comes before the dispatch to the VM's chain: established flows go on
    ingress = [rl.comment for rl in chain(rs, "ingress")]
    assert ingress.index("sys:est") < ingress.index("sys:dispatch")


def test_an_overlay_change_recompiles_only_its_vm() -> None:
    r, a, _ = resolved()
    cache = CompileCache()
    compile_ruleset(r, cache)
    rs = compile_ruleset(with_overlays(r, Merged(shielded=frozenset({a}))), cache)
    assert rs.delta is not None
    assert {name for _, name in rs.delta.chains} == {f"{vm_sid(a)}_in"}
    assert rs == compile_ruleset(with_overlays(r, Merged(shielded=frozenset({a}))))  # as without a cache
