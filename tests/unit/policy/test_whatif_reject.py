"""`can` and reject rules: not allowed, naming the rule and what the sender gets, as the kernel answers."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.policy.whatif import Flow, can
from tests.unit.policy.test_parse import doc

REJECT_ALL = {"id": "rej", "from": "vm:vm1", "to": "vm:vm2", "action": "reject"}
BACK = {
    "id": "back",
    "from": "vm:vm2",
    "to": "vm:vm1",
    "services": ["tcp/80", "udp/5000", "icmp/echo-request"],
}


@pytest.mark.parametrize(
    ("flow", "answer"),
    [
        (Flow("tcp", 80), "the sender gets a TCP reset"),  # protocol any: a reset for TCP
        (Flow("6"), "the sender gets a TCP reset"),
        (Flow("udp", 53), "the sender gets ICMP port unreachable"),
        (Flow("icmp", icmp_type=8), "the sender gets ICMP administratively prohibited"),
        (Flow("47"), "the sender gets ICMP administratively prohibited"),
    ],
)
def test_a_reject_is_not_allowed_and_says_what_the_sender_gets(flow: Flow, answer: str) -> None:
    resolved = resolve_policy(parse_policy(doc(rules=[REJECT_ALL, BACK])))
    a = can(resolved, "vm1", "vm2", flow)
    assert not a.allowed
    assert a.reason == f"vm1 egress: reject by rej ({answer})"


def test_the_reverse_flows_a_reject_would_not_let_start_are_still_allowed() -> None:
    """Only first packets are asked about: vm2's flows to vm1 are allowed although vm1 rejects all it
    opens to vm2 (vm1's replies to them are never judged, by `can` or by the kernel)."""
    resolved = resolve_policy(parse_policy(doc(rules=[REJECT_ALL, BACK])))
    for flow in (Flow("tcp", 80), Flow("udp", 5000), Flow("icmp", icmp_type=8)):
        assert can(resolved, "vm2", "vm1", flow).allowed, flow


def test_without_a_gateway_a_reject_gets_no_answer() -> None:
    data: dict[str, Any] = doc(rules=[REJECT_ALL])
    data["networks"] = [{k: v for k, v in data["networks"][0].items() if k != "gateway"}]
    a = can(resolve_policy(parse_policy(data)), "vm1", "vm2", Flow("udp", 53))
    assert not a.allowed
    assert (
        a.reason == "vm1 egress: reject by rej (no answer: the host has no address on the sender's network)"
    )
