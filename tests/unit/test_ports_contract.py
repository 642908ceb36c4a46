"""The repository ports' contract (`hyperfence/ports.py`), run against the SQLite store and the in-memory
fakes alike, so that a test written against a fake means the same against the real store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hyperfence.adapters.store import Store
from hyperfence.errors import ConflictError
from hyperfence.health.tracker import AgentRecord
from hyperfence.model.lease import Lease, LeaseSource
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.policy.objects import ObjectChange
from hyperfence.ports import Repository
from hyperfence.testing import FakeStore


@pytest.fixture(params=["sqlite", "fake"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repository]:
    if request.param == "fake":
        yield FakeStore()
        return
    store = Store(str(tmp_path))
    try:
        yield store
    finally:
        store.close()


# --- PolicyRepository ------------------------------------------------------------------------------------


def test_generations_start_at_one_grow_and_keep_each_document(repo: Repository) -> None:
    assert repo.latest_generation() == 0
    assert repo.get_policy() is None
    assert repo.put_policy({"vms": [{"name": "a"}]}, source="one") == 1
    assert repo.put_policy({"vms": []}, source="two") == 2
    assert repo.latest_generation() == 2
    latest = repo.get_policy()
    assert latest is not None and (latest.generation, latest.source, latest.document) == (
        2,
        "two",
        {"vms": []},
    )
    first = repo.get_policy(1)
    assert first is not None and first.document == {"vms": [{"name": "a"}]} and first.source == "one"
    assert repo.get_policy(3) is None
    assert repo.get_policy(0) is None


def test_a_stored_document_cannot_be_changed_through_the_caller_s_object(repo: Repository) -> None:
    doc = {"vms": [{"name": "a"}]}
    repo.put_policy(doc, source="s")
    doc["vms"].append({"name": "b"})
    got = repo.get_policy(1)
    assert got is not None and got.document == {"vms": [{"name": "a"}]}
    got.document["vms"].clear()
    again = repo.get_policy(1)
    assert again is not None and again.document == {"vms": [{"name": "a"}]}


def test_a_compare_and_swap_put_wins_only_on_the_expected_latest_generation(repo: Repository) -> None:
    assert repo.put_policy({"n": 1}, source="s", expected=0) == 1
    with pytest.raises(ConflictError) as e:
        repo.put_policy({"n": 2}, source="s", expected=0)
    assert "generation 0" in str(e.value) and "generation 1" in str(e.value)
    assert repo.latest_generation() == 1  # nothing stored by the loser
    assert repo.put_policy({"n": 2}, source="s", expected=1) == 2
    with pytest.raises(ConflictError, match=r"generation 5 .* generation 2"):
        repo.put_policy({"n": 3}, source="s", expected=5)  # from the future: a conflict too
    assert repo.put_policy({"n": 3}, source="s") == 3  # without `expected`: always a new generation


def test_wait_for_change_returns_at_once_when_a_newer_generation_exists(repo: Repository) -> None:
    repo.put_policy({}, source="s")
    t0 = time.monotonic()
    assert repo.wait_for_change(0, 10) == 1
    assert time.monotonic() - t0 < 1


def test_wait_for_change_times_out_with_the_latest_generation(repo: Repository) -> None:
    repo.put_policy({}, source="s")
    t0 = time.monotonic()
    assert repo.wait_for_change(1, 0.3) == 1
    assert time.monotonic() - t0 >= 0.29


def test_a_put_from_another_thread_ends_the_wait_at_once(repo: Repository) -> None:
    timer = threading.Timer(0.2, lambda: repo.put_policy({}, source="other thread"))
    timer.start()
    try:
        t0 = time.monotonic()
        assert repo.wait_for_change(0, 20) == 1
        waited = time.monotonic() - t0
    finally:
        timer.join()
    assert 0.15 <= waited < 5  # woken by the put (~0.2 s), not by the 20 s timeout


def test_a_cancelled_wait_returns_when_woken(repo: Repository) -> None:
    stop = threading.Event()

    def cancel() -> None:
        stop.set()
        repo.wake()

    timer = threading.Timer(0.2, cancel)
    timer.start()
    try:
        t0 = time.monotonic()
        assert repo.wait_for_change(0, 20, cancelled=stop.is_set) == 0
        waited = time.monotonic() - t0
    finally:
        timer.join()
    assert waited < 5
    t0 = time.monotonic()
    assert repo.wait_for_change(0, 20, cancelled=stop.is_set) == 0  # cancelled before it waits
    assert time.monotonic() - t0 < 1


def test_a_wake_without_cancel_does_not_end_the_wait(repo: Repository) -> None:
    timer = threading.Timer(0.1, repo.wake)
    timer.start()
    try:
        t0 = time.monotonic()
        assert repo.wait_for_change(0, 0.5, cancelled=lambda: False) == 0
        assert time.monotonic() - t0 >= 0.49
    finally:
        timer.join()


# --- EventLog --------------------------------------------------------------------------------------------


def test_events_come_oldest_first_with_their_fields_and_filters(repo: Repository) -> None:
    repo.add_event("applied", {"summary": "+1"})
    repo.add_events([("isolated", "vm1", {"why": "silent"}), ("released", "vm1", {}), ("applied", None, {})])
    repo.add_event("isolated", {"why": "x"}, vm="vm2")
    every = repo.events()
    assert [(e["kind"], e["vm"]) for e in every] == [
        ("applied", None),
        ("isolated", "vm1"),
        ("released", "vm1"),
        ("applied", None),
        ("isolated", "vm2"),
    ]
    ids = [e["id"] for e in every]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert every[0]["summary"] == "+1" and isinstance(every[0]["time"], float)
    assert [e["vm"] for e in repo.events(kind="isolated")] == ["vm1", "vm2"]
    assert [e["kind"] for e in repo.events(vm="vm1")] == ["isolated", "released"]
    assert [e["kind"] for e in repo.events(kind="isolated", vm="vm2")] == ["isolated"]
    assert [e["id"] for e in repo.events(after=ids[2])] == ids[3:]
    assert [e["id"] for e in repo.events(limit=2)] == ids[3:]  # the latest two, oldest first


def test_a_failing_batch_of_events_stores_none_of_them(repo: Repository) -> None:
    with pytest.raises(TypeError):
        repo.add_events([("ok", None, {}), ("bad", None, {"x": object()})])
    assert repo.events() == []


# --- AgentState ------------------------------------------------------------------------------------------


def _record(vm: str, **kw: object) -> AgentRecord:
    return AgentRecord(vm=vm, key=b"k" * 32, channel={"type": "unix", "path": f"/run/{vm}.sock"}, **kw)  # type: ignore[arg-type]


def test_agents_enrol_save_and_a_sequence_never_goes_back(repo: Repository) -> None:
    repo.enroll_agent(_record("vm2"))
    repo.enroll_agent(_record("vm1"))
    assert list(repo.agents()) == ["vm1", "vm2"]
    rec = repo.agents()["vm1"]
    assert (rec.key, rec.channel, rec.last_seq, rec.isolated) == (
        b"k" * 32,
        {"type": "unix", "path": "/run/vm1.sock"},
        0,
        None,
    )
    repo.save_agents(
        [_record("vm1", last_seq=7, last_seen=5.0, agent="1.0", isolated="silent", isolated_since=4.0)]
    )
    repo.save_agents([_record("ghost", last_seq=3)])  # not enrolled: ignored
    assert "ghost" not in repo.agents()
    repo.save_seqs({"vm1": 5, "vm2": 9, "ghost": 1})  # 5 < 7: kept at 7
    got = repo.agents()
    assert (got["vm1"].last_seq, got["vm1"].last_seen, got["vm1"].agent) == (7, 5.0, "1.0")
    assert (got["vm1"].isolated, got["vm1"].isolated_since) == ("silent", 4.0)
    assert got["vm2"].last_seq == 9
    repo.save_agents([_record("vm1", last_seq=2, isolated=None)])
    assert repo.agents()["vm1"].last_seq == 7 and repo.agents()["vm1"].isolated is None


def test_a_new_enrolment_replaces_the_key_and_resets_the_sequence(repo: Repository) -> None:
    repo.enroll_agent(_record("vm1"))
    repo.save_agents([_record("vm1", last_seq=7, isolated="silent", isolated_since=1.0)])
    repo.enroll_agent(AgentRecord(vm="vm1", key=b"n" * 32, channel={"type": "tcp"}))
    rec = repo.agents()["vm1"]
    assert (rec.key, rec.channel, rec.last_seq, rec.isolated) == (b"n" * 32, {"type": "tcp"}, 0, "silent")


# --- LeaseStore ------------------------------------------------------------------------------------------


def _lease(vm: str, ip: str, **kw: object) -> Lease:
    args: dict[str, object] = {
        "vm": vm,
        "mac": "52:54:00:00:00:01",
        "ip": IPv4Address(ip),
        "expires": 100.0,
        "learned": 50.0,
        "server": IPv4Address("10.0.0.1"),
        "source": LeaseSource.DHCP,
    }
    args.update(kw)
    return Lease(**args)  # type: ignore[arg-type]


def test_leases_are_replaced_whole_and_come_ordered(repo: Repository) -> None:
    assert repo.leases() == ()
    first = (_lease("vm2", "10.0.0.5"), _lease("vm1", "10.0.0.9", server=None, source=LeaseSource.LIBVIRT))
    repo.save_leases(first)
    assert repo.leases() == (first[1], first[0])
    second = (_lease("vm3", "10.0.0.7"),)
    repo.save_leases(second)
    assert repo.leases() == second
    repo.save_leases(())
    assert repo.leases() == ()


# --- InventoryStore --------------------------------------------------------------------------------------


def _vm_doc(name: str, ip: str | None = None) -> dict[str, object]:
    return {
        "name": name,
        "id": f"uuid-{name}",
        "network": "lan",
        "port": f"tap-{name}",
        "mac": "52:54:00:00:00:01",
        **({"ips": [ip]} if ip else {}),
        "labels": {"tier": "web"},
    }


def test_the_inventory_is_replaced_whole_and_read_back_equal(repo: Repository) -> None:
    assert repo.inventory() is None
    first = (_vm_doc("a", "10.0.0.2"), _vm_doc("b"))
    repo.save_inventory(first, read=100.5)
    got = repo.inventory()
    assert got is not None and (got.vms, got.read) == (first, 100.5)
    repo.save_inventory((), read=200.0)
    got = repo.inventory()
    assert got is not None and (got.vms, got.read) == ((), 200.0)


def test_a_stored_inventory_cannot_be_changed_through_the_caller_s_objects(repo: Repository) -> None:
    vm = _vm_doc("a", "10.0.0.2")
    repo.save_inventory((vm,), read=1.0)
    vm["ips"] = ["10.0.0.99"]
    got = repo.inventory()
    assert got is not None
    got.vms[0]["labels"]["tier"] = "db"
    again = repo.inventory()
    assert again is not None and again.vms == (_vm_doc("a", "10.0.0.2"),)


def test_an_inventory_that_is_not_json_is_refused_and_the_old_one_kept(repo: Repository) -> None:
    repo.save_inventory((_vm_doc("a"),), read=1.0)
    with pytest.raises(TypeError):
        repo.save_inventory(({"name": object()},), read=2.0)
    got = repo.inventory()
    assert got is not None and got.vms == (_vm_doc("a"),) and got.read == 1.0


def test_the_sqlite_inventory_outlives_the_process_that_wrote_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.save_inventory((_vm_doc("a", "10.0.0.2"),), read=5.0)
    store.close()
    again = Store(str(tmp_path))
    try:
        got = again.inventory()
        assert got is not None and got.vms == (_vm_doc("a", "10.0.0.2"),) and got.read == 5.0
    finally:
        again.close()


def test_each_producer_s_overlays_are_replaced_without_touching_the_others(repo: Repository) -> None:
    assert repo.overlays() == ()
    op = Overlay("operator", "vm2", OverlayKind.ISOLATE, "probe", since=10.0, until=None)
    hb = Overlay("heartbeat", "vm2", OverlayKind.ISOLATE, "silent", since=11.0, until=None)
    rate = Overlay("operator", "vm1", OverlayKind.RATE_LIMIT, "noisy", since=12.0, until=99.5, rate=100)
    repo.save_overlays("operator", (op, rate))
    repo.save_overlays("heartbeat", (hb,))
    assert repo.overlays() == (hb, rate, op)  # by producer, VM, kind
    repo.save_overlays("heartbeat", ())  # the heartbeat releases its own: the operator's stay
    assert repo.overlays() == (rate, op)
    repo.save_overlays("operator", (op,))
    assert repo.overlays() == (op,)


# --- PolicyRepository: the policy as objects --------------------------------------------------------------

BASE = {"networks": [{"name": "lan"}], "rules": [{"id": "r1", "ports": 1}, {"id": "r2", "ports": 2}]}


def test_a_whole_document_is_kept_as_the_object_changes_it_makes(repo: Repository) -> None:
    assert repo.policy_changes(0, 0) is None  # nothing held yet: read whole
    g1 = repo.put_policy(BASE, source="s")
    g2 = repo.put_policy({**BASE, "rules": [{"id": "r1", "ports": 9}, BASE["rules"][1]]}, source="s")
    assert repo.policy_changes(g1, g2) == [ObjectChange("rules", "r1", 0, {"id": "r1", "ports": 9})]
    assert repo.policy_changes(g2, g2) == []
    g3 = repo.put_policy({**BASE, "rules": [{"id": "r1", "ports": 9}]}, source="s")
    assert repo.policy_changes(g2, g3) == [ObjectChange("rules", "r2", -1, deleted=True)]
    folded = repo.policy_changes(g1, g3)
    assert folded is not None and {c.name for c in folded} == {"r1", "r2"}
    assert repo.policy_changes(g1, g3 + 1) is None  # not there (yet)


def test_objects_written_one_by_one_make_a_generation_readable_whole(repo: Repository) -> None:
    g1 = repo.put_policy(BASE, source="s")
    g2 = repo.put_objects([ObjectChange("rules", "r3", 2, {"id": "r3"})], source="api", expected=g1)
    with pytest.raises(ConflictError):
        repo.put_objects([ObjectChange("rules", "r4", 3, {"id": "r4"})], source="api", expected=g1)
    g3 = repo.put_objects([ObjectChange("rules", "r1", -1, deleted=True)], source="api")
    assert repo.policy_changes(g1, g2) == [ObjectChange("rules", "r3", 2, {"id": "r3"})]
    latest = repo.get_policy()
    assert latest is not None and latest.generation == g3 and latest.source == "api"
    assert latest.document == {
        "networks": [{"name": "lan"}],
        "rules": [{"id": "r2", "ports": 2}, {"id": "r3"}],
    }
    older = repo.get_policy(g2)
    assert older is not None and older.document["rules"] == [*BASE["rules"], {"id": "r3"}]
    g4 = repo.put_policy(BASE, source="file")  # a whole document again: back to what it says
    assert repo.policy_changes(g3, g4) is not None
    assert (got := repo.get_policy()) is not None and got.document == BASE


def test_objects_cannot_be_written_over_a_document_that_is_not_a_mapping(repo: Repository) -> None:
    g1 = repo.put_policy(["not", "a", "policy"], source="s")
    with pytest.raises(ConflictError, match="policy apply"):
        repo.put_objects([ObjectChange("rules", "r1", 0, {"id": "r1"})], source="api")
    g2 = repo.put_policy(BASE, source="s")
    assert repo.policy_changes(g1, g2) is None  # across a generation not kept as objects: read whole
    assert (got := repo.get_policy(g1)) is not None and got.document == ["not", "a", "policy"]
