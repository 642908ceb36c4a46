"""What the firewall knows without reading the kernel (reconcile/firewall.py `Record`): the namespace's
nftables generation, recorded when the kernel was verified, tells a restarted engine and a full converge
that nothing was committed since, so they skip listing the tables; any commit, by anyone, to any table,
makes them read everything again. Real kernel, lab namespaces."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hyperfence.adapters.nft import Nft
from hyperfence.lab.session import LabSession
from hyperfence.reconcile.drift import DriftWatcher
from hyperfence.reconcile.engine import RECORD_FILE, Engine
from hyperfence.ruleset.compile import TABLES, vm_sid

pytestmark = pytest.mark.kernel

PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
UDP_2_1 = {"id": "udp5000", "from": "vm:vm2", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}


class Listings:
    """Counts an engine's libnftables `list` calls (the whole-table reads the record saves)."""

    def __init__(self, engine: Engine) -> None:
        self.calls = 0
        real = engine.nft.list

        def counted(what: dict[str, Any]) -> list[Any]:
            self.calls += 1
            return real(what)

        engine.nft.list = counted  # type: ignore[method-assign]

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


@contextlib.contextmanager
def restarted(lab: LabSession) -> Iterator[tuple[Engine, Listings]]:
    """A second engine on the lab's state directory and namespace (what a restarted daemon builds), and
    its listings counted."""
    engine = Engine(netns=lab.plan.host_netns, state_dir=lab.state_dir)
    try:
        yield engine, Listings(engine)
    finally:
        engine.close()


def test_a_restart_that_finds_its_generation_fetches_only_the_rule_handles(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.engine is not None
    lab.engine.firewall.bodies_every = 0.0
    _, checked = lab.engine.converge(full=True)  # a full read: rule bodies verified
    assert checked is not None and not checked.changed
    with restarted(lab) as (engine, listings):
        _, result = engine.converge(full=True)
        assert result is not None and not result.changed and result.drift == []
        assert listings.take() == 0  # nothing listed: the generation and the digest matched
        assert engine.firewall.record is not None and engine.firewall.record.exact
        # the handles it fetched are the kernel's: a change through it is applied and verified
        engine.store_policy(lab.document([PING_1_2, UDP_2_1]), source="test")
        _, changed = engine.converge()
        assert changed is not None and changed.changed and changed.summary
        assert lab.ping("vm1", "vm2")[0] == 2
        assert lab.ping("vm3", "vm2")[0] == 0
    # and what it applied is exactly what a full read without a record finds
    os.unlink(os.path.join(lab.state_dir, RECORD_FILE))
    with restarted(lab) as (engine, listings):
        _, again = engine.converge(full=True)
        assert again is not None and not again.changed and again.drift == []
        assert listings.take() > 0


def test_any_commit_since_makes_a_restart_read_everything(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    foreign = "hfforeign" + secrets.token_hex(2)
    lab.run("host", ["nft", "add", "table", "inet", foreign]).check_returncode()  # not even our table
    try:
        with restarted(lab) as (engine, listings):
            # not `full`: a one-shot command's converge, which only the recall itself can send to a read
            _, result = engine.converge()
            assert result is not None and not result.changed and result.drift == []
            assert listings.take() > 0
    finally:
        lab.run("host", ["nft", "delete", "table", "inet", foreign])


def test_a_policy_that_changed_meanwhile_is_read_and_applied(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    with restarted(lab) as (engine, listings):
        engine.store_policy(lab.document([PING_1_2, UDP_2_1]), source="test")  # another digest
        _, result = engine.converge(full=True)
        assert result is not None and result.changed
        assert listings.take() > 0


def test_a_full_converge_skips_the_read_only_while_nothing_was_committed(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.engine is not None
    listings = Listings(lab.engine)
    fw = lab.engine.firewall
    # after an incremental apply only rule ids were read back: a full converge skips the read for up to
    # `bodies_every` seconds (nobody committed), then reads everything once to check the rule bodies
    _, early = lab.engine.converge(full=True)
    assert early is not None and not early.changed
    assert listings.take() == 0
    fw.bodies_every = 0.0
    _, first = lab.engine.converge(full=True)
    assert first is not None and not first.changed
    assert listings.take() > 0
    skipped = fw.skipped_reads
    _, second = lab.engine.converge(full=True)
    assert second is not None and not second.changed
    assert listings.take() == 0 and fw.skipped_reads == skipped + 1
    # what `hyperfence status` shows of it
    assert lab.engine.kernel_record() == {
        "generation": lab.engine.nft.generation().number,
        "exact": True,
        "full_reads_skipped": skipped + 1,
    }
    # a hand change is a commit: read, found and repaired
    vm2 = next(v for v in lab.engine.current.policy.vms if v.name == "vm2")  # type: ignore[union-attr]
    lab.run(
        "host", ["nft", "flush", "chain", "bridge", "hyperfence", f"{vm_sid(vm2.id)}_in"]
    ).check_returncode()
    _, repaired = lab.engine.converge(full=True)
    assert repaired is not None and repaired.changed and repaired.drift
    assert listings.take() > 0
    assert lab.ping("vm1", "vm2")[0] == 2


def test_commits_elsewhere_seen_by_the_drift_watch_keep_the_record(lab: LabSession) -> None:
    """A busy host commits to its own tables (libvirt's NAT, a container runtime): the drift watch sees those
    commits touch nothing of ours, and the resync after them still skips the read. A commit to our tables
    is repaired and read."""
    lab.apply([PING_1_2])
    assert lab.engine is not None
    engine = lab.engine
    engine.firewall.bodies_every = 0.0
    engine.converge(full=True)  # rule bodies read back: an exact record
    listings = Listings(engine)
    causes: list[str] = []
    stop = threading.Event()
    watcher = DriftWatcher(
        netns=lab.plan.host_netns,
        tables=[(t.family, t.name) for t in TABLES],
        is_own=engine.owns_commit,
        repair=causes.append,
        untouched=engine.note_untouched,
    )
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    foreign = "hfforeign" + secrets.token_hex(2)
    try:
        deadline = time.monotonic() + 10
        while not causes and time.monotonic() < deadline:  # the watch listens once it says it (re)started
            time.sleep(0.02)
        record = engine.firewall.record
        assert record is not None
        lab.run("host", ["nft", "add", "table", "inet", foreign]).check_returncode()
        lab.run("host", ["nft", "add", "chain", "inet", foreign, "c"]).check_returncode()
        while engine.firewall.record == record and time.monotonic() < deadline:
            time.sleep(0.02)
        moved = engine.firewall.record
        assert moved is not None and moved.generation.number == record.generation.number + 2
        _, result = engine.converge(full=True)
        assert result is not None and not result.changed
        assert listings.take() == 0
        assert len(causes) == 1  # (the watch's start) nothing else asked for a repair
        vm2 = next(v for v in engine.current.policy.vms if v.name == "vm2")  # type: ignore[union-attr]
        lab.run(
            "host", ["nft", "flush", "chain", "bridge", "hyperfence", f"{vm_sid(vm2.id)}_in"]
        ).check_returncode()
        while len(causes) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert "changed hyperfence's tables" in causes[-1]
        _, repaired = engine.converge(full=True)
        assert repaired is not None and repaired.changed and repaired.drift
        assert listings.take() > 0
    finally:
        stop.set()
        thread.join(timeout=5)
        lab.run("host", ["nft", "delete", "table", "inet", foreign])


def test_after_incremental_applies_a_restart_is_ready_at_once_and_checks_bodies_next(lab: LabSession) -> None:
    """After one-rule changes only rule ids were read back: a restarted engine's first (full) converge is
    ready without listing, and the first full converge once `bodies_every` has passed reads everything
    once to check rule bodies."""
    lab.apply([PING_1_2])
    lab.apply([PING_1_2, UDP_2_1])  # incremental: the record is not exact
    assert lab.engine is not None and lab.engine.firewall.record is not None
    assert not lab.engine.firewall.record.exact
    with restarted(lab) as (engine, listings):
        _, first = engine.converge(full=True)
        assert first is not None and not first.changed
        assert listings.take() == 0
        engine.firewall.bodies_every = 0.0
        _, second = engine.converge(full=True)
        assert second is not None and not second.changed and second.drift == []
        assert listings.take() > 0
        assert engine.firewall.record is not None and engine.firewall.record.exact
        _, third = engine.converge(full=True)
        assert third is not None and listings.take() == 0


def test_each_namespace_has_its_own_identity_and_generations(lab: LabSession) -> None:
    host, vm = Nft(lab.plan.host_netns), Nft(lab.plan.vms[0].netns)
    try:
        g_host, g_vm = host.generation(), vm.generation()
        assert g_host.namespace != g_vm.namespace
        assert host.generation() == g_host  # nothing committed: the same generation
        lab.run("vm1", ["nft", "add", "table", "inet", "hfgen"]).check_returncode()
        assert vm.generation().follows(g_vm)
        assert host.generation() == g_host  # a commit in another namespace is not this one's
    finally:
        host.close()
        vm.close()
