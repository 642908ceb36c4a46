"""`can` when an overlay decides: isolation (nothing passes), a shield (no new inbound flow)."""

from __future__ import annotations

from hyperfence.model.overlay import Merged
from hyperfence.model.policy import Action
from hyperfence.policy.overlays import with_overlays
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import Resolved, resolve_policy
from hyperfence.policy.whatif import Flow, can
from tests.unit.policy.test_parse import doc

PING = Flow("icmp", icmp_type=8, icmp_code=0)
RULES = [{"id": "ping", "from": "vms", "to": "vms", "protocol": "icmp"}]


def resolved(merged: Merged | None = None) -> Resolved:
    r = resolve_policy(parse_policy(doc(rules=RULES)))
    ids = {vp.vm.name: vp.vm.id for vp in r.vms}
    if merged is None:
        return r
    return with_overlays(
        r,
        Merged(
            frozenset(ids[n] for n in merged.isolated),
            tuple((ids[n], rate) for n, rate in merged.rate_limits),
            frozenset(ids[n] for n in merged.shielded),
        ),
    )


def test_without_overlays_the_rules_decide() -> None:
    assert can(resolved(), "vm1", "vm2", PING).allowed


def test_an_isolated_vm_neither_sends_nor_receives() -> None:
    r = resolved(Merged(isolated=frozenset({"vm2"})))
    for src, dst in (("vm1", "vm2"), ("vm2", "vm1")):
        answer = can(r, src, dst, PING)
        assert not answer.allowed
        assert answer.deciding is not None and answer.deciding.rule == "sys:quarantine"
        assert "vm2 is isolated by an overlay" in answer.reason


def test_a_shielded_vm_receives_no_new_flow_and_sends_as_before() -> None:
    r = resolved(Merged(shielded=frozenset({"vm2"})))
    answer = can(r, "vm1", "vm2", PING)
    assert not answer.allowed
    assert answer.deciding is not None and answer.deciding.rule == "sys:shield"
    assert answer.deciding.verdict is Action.DENY
    assert can(r, "vm2", "vm1", PING).allowed


def test_a_rate_limit_is_a_note() -> None:
    answer = can(resolved(Merged(rate_limits=(("vm1", 9),))), "vm1", "vm2", PING)
    assert answer.allowed
    assert "vm1 sends new flows at most at its overlay's rate limit (9 a second)" in answer.reason
