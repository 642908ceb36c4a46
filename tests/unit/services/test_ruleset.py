"""The ruleset's use cases on the in-memory store and a model kernel (the kernel probe stubbed)."""

from __future__ import annotations

import dataclasses

import pytest

from hyperfence.errors import KernelError, NotFoundError
from hyperfence.model.kernel import Capabilities
from hyperfence.ruleset.compile import vm_sid
from hyperfence.services import ruleset as service
from hyperfence.services.policy import apply_policy
from tests.unit.policy.test_parse import doc
from tests.unit.services.fakes import FakeEngine, FakeNft, ports_reader

RULE = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}
WORKS = Capabilities(bridge_conntrack=False, bridge_reject=False, br_netfilter=True, call_iptables=True)
SYSCTL_OFF = dataclasses.replace(WORKS, call_iptables=False)


@pytest.fixture
def caps(monkeypatch: pytest.MonkeyPatch) -> list[Capabilities]:
    """What the stubbed probe finds (the last item)."""
    found = [WORKS]
    monkeypatch.setattr(service.kernel_probe, "probe", lambda nft: found[-1])
    return found


def applied() -> FakeEngine:
    engine = FakeEngine()
    apply_policy(
        doc(rules=[RULE]), source="p", kernel=engine, policies=engine.store, read_ports=ports_reader()
    )
    return engine


def test_without_a_policy_the_desired_ruleset_is_not_found(caps: list[Capabilities]) -> None:
    engine = FakeEngine()
    assert service.desired_state(engine) is None
    for ask in (lambda: service.show_ruleset(engine, desired=True), lambda: service.diff_ruleset(engine)):
        with pytest.raises(NotFoundError, match="no policy stored yet"):
            ask()
    shown = service.show_ruleset(engine, desired=False)  # the kernel's state needs no policy
    assert shown.ruleset.tables == () and not shown.desired


def test_show_gives_the_desired_or_the_kernels_ruleset_and_what_the_kernel_offers(
    caps: list[Capabilities],
) -> None:
    engine = applied()
    compiled = engine.compiled()
    assert compiled is not None
    desired = service.show_ruleset(engine, desired=True)
    assert desired.ruleset == compiled.ruleset and desired.kernel.broken == ()
    assert "br_netfilter" in desired.kernel.description and engine.caps == [WORKS]
    engine.firewall.actual = dataclasses.replace(
        engine.firewall.actual, ruleset=dataclasses.replace(compiled.ruleset, rules=())
    )
    assert service.show_ruleset(engine, desired=False).ruleset.rules == ()
    caps.append(SYSCTL_OFF)
    (broken,) = service.show_ruleset(engine, desired=False).kernel.broken
    assert "bridge-nf-call-iptables" in broken


def test_diff_is_in_sync_after_an_apply_and_names_drift_and_broken_preconditions(
    caps: list[Capabilities],
) -> None:
    engine = applied()
    diff = service.diff_ruleset(engine)
    assert diff.in_sync and (diff.differences, diff.commands, diff.broken) == ((), 0, ())
    compiled = engine.compiled()
    assert compiled is not None
    flushed = [r for r in compiled.ruleset.rules if r.chain == "guard"]
    assert flushed
    engine.firewall.actual = dataclasses.replace(
        engine.firewall.actual,
        ruleset=dataclasses.replace(
            compiled.ruleset, rules=tuple(r for r in compiled.ruleset.rules if r.chain != "guard")
        ),
    )
    diff = service.diff_ruleset(engine)
    assert not diff.in_sync and diff.differences == (
        f"chain guard: {len(flushed)} rule(s) missing, 0 unexpected",
    )
    assert diff.commands > 0 and diff.summary
    caps.append(SYSCTL_OFF)
    engine.firewall.actual = dataclasses.replace(engine.firewall.actual, ruleset=compiled.ruleset)
    diff = service.diff_ruleset(engine)
    assert not diff.in_sync and diff.broken and not diff.differences and not diff.commands


def test_a_kernel_that_cannot_be_probed_is_a_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(nft: FakeNft) -> Capabilities:
        raise KernelError("netns hf-x-host: no such namespace")

    monkeypatch.setattr(service.kernel_probe, "probe", refuse)
    with pytest.raises(KernelError, match="could not probe the kernel: netns hf-x-host"):
        service.diff_ruleset(applied())


def counted(family: str, chain: str, comment: str, packets: int) -> dict[str, object]:
    return {
        "rule": {
            "family": family,
            "table": "hyperfence",
            "chain": chain,
            "comment": comment,
            "expr": [{"counter": {"packets": packets, "bytes": packets * 100}}, {"accept": None}],
        }
    }


def test_stats_sum_the_kernels_counters_by_rule_and_name_the_vms() -> None:
    engine = applied()
    one, two = vm_sid("vm1"), vm_sid("vm2")
    engine.nft.listing = [
        counted("bridge", f"{one}_out", "rule:web#1", 3),
        counted("bridge", f"{one}_out", "rule:web#2", 1),
        counted("bridge", f"{two}_in", "rule:web#1", 4),
        counted("inet", f"{one}_cap_drop", "sys:ct-cap", 7),
    ]
    assert service.ruleset_stats(engine, by_vm=False) == [
        {"rule": "sys:ct-cap", "vm": "", "direction": "both", "packets": 7, "bytes": 700},
        {"rule": "web", "vm": "", "direction": "egress", "packets": 4, "bytes": 400},
        {"rule": "web", "vm": "", "direction": "ingress", "packets": 4, "bytes": 400},
    ]
    by_vm = service.ruleset_stats(engine, by_vm=True)
    assert [(r["rule"], r["vm"], r["packets"]) for r in by_vm] == [
        ("sys:ct-cap", "vm1", 7),
        ("web", "vm1", 4),
        ("web", "vm2", 4),
    ]
    bare = FakeEngine()  # without a policy the counters are there, the VMs have no names
    bare.nft.listing = engine.nft.listing
    assert {r["vm"] for r in service.ruleset_stats(bare, by_vm=True)} == {"-"}
