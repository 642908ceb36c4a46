"""Fail closed first: with the bridge's base chains gone, one small batch shuts every VM port (uplinks
excepted) before the full ruleset is put back, and the full plan that follows replaces it exactly."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.model.kernel import Flavour
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset.build import BRIDGE
from hyperfence.ruleset.closed import CLOSED, fail_closed
from hyperfence.ruleset.compile import compile_ruleset
from hyperfence.ruleset.ir import Ruleset
from hyperfence.ruleset.plan import plan_changes
from hyperfence.ruleset.readback import Actual
from tests.unit.policy.test_parse import BASE, doc
from tests.unit.ruleset.fake_kernel import FakeKernel

RULES = [{"id": "a", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}]


def desired(flavour: Flavour = Flavour.BR_NETFILTER, **network: Any) -> Ruleset:
    nets = [{**BASE["networks"][0], **network}]
    return compile_ruleset(resolve_policy(parse_policy(doc(networks=nets, rules=RULES))), flavour=flavour)


def test_an_empty_kernel_is_closed_first_then_filled_exactly() -> None:
    want = desired(uplinks=["eth9", "bond0"])
    empty = FakeKernel(Ruleset((), (), (), ()), {})
    closing = fail_closed(want, empty.ruleset())
    assert closing is not None
    empty.apply(closing.commands)
    closed = empty.ruleset()
    assert closed.tables == (BRIDGE,)
    chains = {c.name: c for c in closed.chains}
    assert set(chains) == {"guard", "ingress"}
    assert {(c.hook, c.priority, c.policy) for c in chains.values()} == {
        ("prerouting", -300, "drop"),
        ("postrouting", 10, "drop"),
    }
    assert [r.comment for r in closed.rules] == [CLOSED, CLOSED]
    assert all('"bond0"' in r.expr and '"eth9"' in r.expr for r in closed.rules)  # only uplinks pass
    # the full plan from there: one batch that ends exactly at the desired ruleset, sys:closed gone
    full = plan_changes(want, Actual(closed, empty.handles()))
    assert not full.full_replace
    empty.apply(full.commands)
    assert empty.ruleset().chain_rules() == want.chain_rules()
    assert {(s.name, s.elements) for s in empty.ruleset().sets} == {(s.name, s.elements) for s in want.sets}
    assert fail_closed(want, empty.ruleset()) is None  # nothing missing: nothing to close


def test_without_uplinks_the_base_chains_stay_empty_and_drop_everything() -> None:
    want = desired()
    closing = fail_closed(want, Ruleset((), (), (), ()))
    assert closing is not None
    assert closing.summary == {"chains+": 2}


def test_one_missing_base_chain_is_closed_alone() -> None:
    want = desired()
    kernel = FakeKernel(want, {(r.table, r.chain, r.comment): i + 1 for i, r in enumerate(want.rules)})
    kernel.apply([{"flush": {"chain": {"family": "bridge", "table": "hyperfence", "name": "ingress"}}}])
    kernel.apply([{"delete": {"chain": {"family": "bridge", "table": "hyperfence", "name": "ingress"}}}])
    closing = fail_closed(want, kernel.ruleset())
    assert closing is not None and closing.touched_chains == {(BRIDGE, "ingress")}


@pytest.mark.parametrize("flavour", list(Flavour))
def test_what_a_ruleset_in_the_kernel_lets_through(flavour: Flavour) -> None:
    """No hyperfence bridge table: every port passes; with one, only its uplinks do (a VM's port is
    filtered, any other port gets nothing), in either data plane."""
    from hyperfence.ruleset.closed import lets_through

    assert lets_through(Ruleset((), (), (), ()), "eno1")
    with_uplink = desired(flavour, uplinks=["eno1"])
    assert lets_through(with_uplink, "eno1")
    assert not lets_through(with_uplink, "eno2") and not lets_through(with_uplink, "vp1")
    assert not lets_through(desired(flavour), "eno1")
