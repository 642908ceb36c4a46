"""Quarantine and the agent endpoint in the compiled ruleset."""

from __future__ import annotations

import dataclasses
import json

from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset.compile import BRIDGE, compile_ruleset, vm_sid
from hyperfence.ruleset.ir import Ruleset
from tests.unit.policy.test_parse import doc, problems


def compiled(settings: dict[str, object], quarantine: frozenset[str] = frozenset()) -> tuple[Ruleset, str]:
    r = resolve_policy(parse_policy(doc(settings=settings)))
    vm1 = next(vp.vm.id for vp in r.vms if vp.vm.name == "vm1")
    return compile_ruleset(
        dataclasses.replace(r, quarantine=frozenset({vm1}) if quarantine else frozenset())
    ), vm1


def comments(rs: Ruleset, chain: str) -> list[str]:
    return [r.comment for r in rs.chain_rules()[(BRIDGE, chain)]]


def test_no_quarantine_no_quarantine_rules() -> None:
    rs, _ = compiled({})
    assert "sys:quarantine" not in comments(rs, "egress") + comments(rs, "ingress")
    assert not any(s.name == "quarantine" for s in rs.sets)


def test_a_quarantined_vm_is_dropped_first_in_both_base_chains() -> None:
    rs, _ = compiled({}, quarantine=frozenset({"x"}))
    assert comments(rs, "egress")[0] == "sys:quarantine"
    assert comments(rs, "ingress")[0] == "sys:quarantine"
    (qset,) = [s for s in rs.sets if s.name == "quarantine"]
    assert qset.elements == frozenset({json.dumps("vp1")})


def test_the_agent_endpoint_is_open_to_every_vm_and_through_quarantine() -> None:
    rs, vm1 = compiled({"agent_endpoint": "10.77.0.1:7474"}, quarantine=frozenset({"x"}))
    out = comments(rs, f"{vm_sid(vm1)}_out")
    assert out[0] == "sys:agent" and "sys:arp-agent" in out
    assert comments(rs, "quarantine_out") == ["sys:agent", "sys:agent-arp", "sys:quarantine"]
    assert comments(rs, "quarantine_in") == ["sys:agent", "sys:agent-arp", "sys:quarantine"]
    agent = json.loads(rs.chain_rules()[(BRIDGE, "quarantine_in")][0].expr)
    assert {
        "match": {"left": {"payload": {"field": "sport", "protocol": "tcp"}}, "op": "==", "right": 7474}
    } in agent


def test_a_bad_endpoint_is_located() -> None:
    got = "\n".join(problems(doc(settings={"agent_endpoint": "10.77.0.1"})))
    assert "settings.agent_endpoint: '10.77.0.1' is not ADDRESS:PORT" in got
    got = "\n".join(problems(doc(settings={"agent_endpoint": "host:99999"})))
    assert "settings.agent_endpoint" in got
