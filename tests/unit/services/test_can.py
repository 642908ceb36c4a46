"""services/can.py: the what-if use case over the Kernel port (an in-memory store and a model kernel)."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.errors import InvalidInputError, NotFoundError
from hyperfence.model.kernel import Flavour
from hyperfence.policy.whatif import Flow
from hyperfence.services.can import check_flow
from tests.unit.policy.test_parse import BASE, doc
from tests.unit.services.fakes import FakeEngine

WEB = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}


def engine_with(**extra: Any) -> FakeEngine:
    engine = FakeEngine()
    engine.store.put_policy(doc(**extra), source="test")
    return engine


def flavour() -> Flavour:
    return Flavour.BR_NETFILTER


def test_the_rule_decides_and_is_named() -> None:
    engine = engine_with(rules=[WEB])
    yes = check_flow(engine, "vm1", "10.77.0.12", Flow("tcp", port=80), flavour=flavour)
    assert yes.allowed and "web" in yes.reason
    no = check_flow(engine, "vm1", "vm2", Flow("tcp", port=81), flavour=flavour)
    assert not no.allowed
    back = check_flow(engine, "vm2", "vm1", Flow("tcp", port=80), flavour=flavour)
    assert not back.allowed  # a rule has a direction


def test_no_policy_an_unknown_endpoint_and_a_vm_without_an_address_are_refused() -> None:
    asked: list[int] = []

    def counted() -> Flavour:
        asked.append(1)
        return Flavour.BR_NETFILTER

    with pytest.raises(NotFoundError, match="no policy stored yet"):
        check_flow(FakeEngine(), "vm1", "vm2", Flow("icmp"), flavour=counted)
    assert asked == []  # the data plane is asked only once there is a policy
    with pytest.raises(InvalidInputError, match="neither a VM name nor an IPv4 address"):
        check_flow(engine_with(rules=[WEB]), "vm1", "ghost", Flow("icmp"), flavour=flavour)
    learner = {"name": "vm3", "port": "vp3", "mac": "02:77:00:00:00:0d"}  # no `ips`: learns them by DHCP
    engine = engine_with(vms=[*BASE["vms"], learner], rules=[WEB])
    with pytest.raises(NotFoundError, match="VM vm3 has no address yet"):
        check_flow(engine, "vm1", "vm3", Flow("icmp"), flavour=flavour)
