"""The policy's use cases on the in-memory store and a model kernel: nothing invalid, nothing that would cut
a network device off, and nothing a preview looked at is ever stored or applied; a daemon's refusal keeps
its kind."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.errors import (
    ConflictError,
    InvalidInputError,
    KernelError,
    NotFoundError,
    Problem,
    TemporaryError,
    to_wire,
)
from hyperfence.model.ports import BridgePort
from hyperfence.services.policy import apply_policy, check_policy, preview_policy, show_policy
from tests.unit.policy.test_parse import doc
from tests.unit.services.fakes import FakeEngine, no_ports_read, ports_reader

RULE = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}
NIC = BridgePort("br0", "eth9", parent="pci 0000:00:1f.6")
BAD = doc(rules=[{"from": "vm:ghost", "to": "vm:vm2", "services": ["tcp/99999"]}])
NO_DEVICES = ports_reader()


def asked(replies: list[dict[str, Any] | None]) -> tuple[list[dict[str, Any]], Any]:
    seen: list[dict[str, Any]] = []

    def ask(payload: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(payload)
        return replies.pop(0)

    return seen, ask


def test_check_counts_what_the_policy_compiles_to_and_reads_the_bridges_only_when_asked() -> None:
    r = check_policy(doc(rules=[RULE]), source="p.yaml", read_ports=no_ports_read)
    assert (r.source, r.vms, r.rules, r.ipsets, r.devices_checked) == ("p.yaml", 2, 1, 0, False)
    assert r.chains > 0 and r.nft_rules > 0 and r.sets > 0
    assert check_policy(doc(), source="p", devices=True, read_ports=NO_DEVICES).devices_checked
    with pytest.raises(ConflictError, match="eth9"):
        check_policy(doc(), source="p", devices=True, read_ports=ports_reader(NIC))


def test_check_lists_every_problem() -> None:
    with pytest.raises(InvalidInputError) as e:
        check_policy(BAD, source="p.yaml", read_ports=no_ports_read)
    assert [p.path for p in e.value.problems] == ["rules[0].from", "rules[0].services[0]"]


def test_preview_diffs_and_dry_runs_and_stores_and_applies_nothing() -> None:
    engine = FakeEngine()
    p = preview_policy(doc(rules=[RULE]), source="p.yaml", kernel=engine, read_ports=NO_DEVICES)
    assert (p.vms, p.rules) == (2, 1) and p.commands > 0 and p.summary
    assert "table bridge hyperfence is missing" in p.differences
    assert [len(b["nftables"]) for b in engine.nft.checked] == [p.commands]  # the kernel's dry run
    assert engine.store.latest_generation() == 0 and engine.firewall.read().ruleset.tables == ()
    assert engine.nft.model.ruleset().tables == ()
    assert engine.converges == []


def test_preview_of_what_the_kernel_holds_sends_nothing() -> None:
    engine = FakeEngine()
    apply_policy(doc(rules=[RULE]), source="p", kernel=engine, policies=engine.store, read_ports=NO_DEVICES)
    p = preview_policy(doc(rules=[RULE]), source="p", kernel=engine, read_ports=NO_DEVICES)
    assert (p.commands, p.summary, p.differences, engine.nft.checked) == (0, {}, (), [])


def test_a_batch_the_kernel_would_refuse_is_a_kernel_error_and_nothing_is_stored() -> None:
    engine = FakeEngine()
    engine.nft.refuse = "Error: Could not process rule: No such file or directory"
    with pytest.raises(KernelError, match=r"would refuse .* No such file or directory"):
        preview_policy(doc(), source="p", kernel=engine, read_ports=NO_DEVICES)
    assert engine.store.latest_generation() == 0


@pytest.mark.parametrize("reader", [ports_reader(NIC), no_ports_read], ids=["device", "invalid"])
def test_apply_refuses_before_anything_is_stored_or_asked(reader: Any) -> None:
    engine = FakeEngine()
    seen, ask = asked([])
    document = doc() if reader is not no_ports_read else BAD
    with pytest.raises(ConflictError if reader is not no_ports_read else InvalidInputError):
        apply_policy(document, source="p", kernel=engine, policies=engine.store, ask=ask, read_ports=reader)
    assert (engine.store.latest_generation(), seen, engine.converges) == (0, [], [])


def test_apply_without_a_daemon_stores_and_converges_here() -> None:
    engine = FakeEngine()
    seen, ask = asked([None])
    a = apply_policy(
        doc(rules=[RULE]),
        source="/p.yaml",
        kernel=engine,
        policies=engine.store,
        ask=ask,
        read_ports=NO_DEVICES,
    )
    assert (a.generation, a.by_daemon, a.vms, a.rules) == (1, False, 2, 1) and a.summary and a.ms is not None
    assert seen == [{"op": "reconcile", "policy": "gen:1"}] and engine.converges == [True]
    compiled = engine.compiled()
    assert compiled is not None and engine.nft.model.ruleset().chain_rules() == compiled.ruleset.chain_rules()
    stored = engine.store.get_policy()
    assert stored is not None and stored.source == "/p.yaml"


def test_apply_with_a_daemon_is_applied_by_it() -> None:
    engine = FakeEngine()
    reply = {"ok": True, "policy": "gen:1", "changed": True, "summary": {"add rule": 3}, "ms": 4.5}
    _, ask = asked([reply])
    a = apply_policy(doc(), source="p", kernel=engine, policies=engine.store, ask=ask, read_ports=NO_DEVICES)
    assert (a.generation, a.by_daemon, a.summary, a.ms) == (1, True, {"add rule": 3}, 4.5)
    assert engine.converges == []


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (to_wire(ConflictError("the policy would cut the host off its network")), ConflictError),
        (to_wire(InvalidInputError("p has 1 problem(s)", [Problem("vms[0].ips", "bad")])), InvalidInputError),
        (to_wire(NotFoundError("policy file /x does not exist")), NotFoundError),
        (to_wire(TemporaryError("busy", retry_after=3)), TemporaryError),
        # daemons from before error kinds: only whether it was a conflict
        ({"ok": False, "error": "refused", "conflict": True}, ConflictError),
        ({"ok": False, "error": "nftables refused the batch"}, KernelError),
    ],
    ids=["conflict", "invalid", "not-found", "temporary", "old-conflict", "old-other"],
)
def test_a_daemons_refusal_keeps_its_kind(reply: dict[str, Any], kind: type[Exception]) -> None:
    engine = FakeEngine()
    _, ask = asked([reply])
    with pytest.raises(kind) as e:
        apply_policy(doc(), source="p", kernel=engine, policies=engine.store, ask=ask, read_ports=NO_DEVICES)
    assert type(e.value) is kind
    assert str(e.value).startswith(
        f"the daemon could not apply generation 1: {reply.get('message', reply['error'])}"
    )
    if isinstance(e.value, InvalidInputError):
        assert [str(p) for p in e.value.problems] == ["vms[0].ips: bad"]
    if isinstance(e.value, TemporaryError):
        assert e.value.retry_after == 3
    assert engine.converges == []  # the daemon's answer is the answer


def test_apply_with_an_expected_generation_is_a_compare_and_swap() -> None:
    engine = FakeEngine()
    apply_policy(doc(), source="p", kernel=engine, policies=engine.store, read_ports=NO_DEVICES)
    with pytest.raises(ConflictError, match="generation 0 was expected"):
        apply_policy(
            doc(), source="p", kernel=engine, policies=engine.store, expected=0, read_ports=NO_DEVICES
        )
    a = apply_policy(
        doc(), source="p", kernel=engine, policies=engine.store, expected=1, read_ports=NO_DEVICES
    )
    assert a.generation == 2


def test_show_returns_a_generation_or_says_what_exists() -> None:
    engine = FakeEngine()
    with pytest.raises(NotFoundError, match="no policy stored yet"):
        show_policy(engine.store)
    with pytest.raises(NotFoundError, match="no policy stored yet"):
        show_policy(engine.store, 3)
    engine.store.put_policy(doc(), source="one")
    engine.store.put_policy(doc(rules=[RULE]), source="two")
    assert (show_policy(engine.store).generation, show_policy(engine.store).source) == (2, "two")
    assert show_policy(engine.store, 1).document == doc()
    with pytest.raises(NotFoundError, match=r"no generation 5 \(the latest is 2\)"):
        show_policy(engine.store, 5)


def test_a_document_the_caller_parsed_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperfence.policy.parse import parse_policy
    from hyperfence.services import policy as service

    parsed = parse_policy(doc(rules=[RULE]), source="p")
    monkeypatch.setattr(service, "parse_policy", lambda *a, **k: pytest.fail("parsed twice"))
    engine = FakeEngine()
    p = preview_policy(doc(rules=[RULE]), source="p", kernel=engine, parsed=parsed, read_ports=NO_DEVICES)
    a = apply_policy(
        doc(rules=[RULE]),
        source="p",
        kernel=engine,
        policies=engine.store,
        parsed=parsed,
        read_ports=NO_DEVICES,
    )
    assert (p.rules, a.rules, a.generation) == (1, 1, 1)
