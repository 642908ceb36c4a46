"""In-memory fakes of the repository ports (`hyperfence/ports.py`), for tests and for trying the core
without a state directory. They keep the same contract as the SQLite store: `tests/unit/test_ports_contract.py`
runs one suite against both.

`FakeStore` is all five ports in one object, as `adapters/store:Store` is; each method takes one lock,
so the fakes are as safe to share between threads as the real store.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from hyperfence.errors import ConflictError
from hyperfence.health.tracker import AgentRecord
from hyperfence.model.lease import Lease
from hyperfence.model.overlay import Overlay
from hyperfence.policy import objects
from hyperfence.ports import Repository, StoredInventory, StoredPolicy

__all__ = [
    "FakeAgentState",
    "FakeClock",
    "FakeEventLog",
    "FakeInventoryStore",
    "FakeLeaseStore",
    "FakePolicyRepository",
    "FakeStore",
]


class FakeClock:
    """Time that moves only when told (`advance`): what the fakes stamp versions and events with unless
    given another clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Locked:
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock: Callable[[], float] = clock or FakeClock()
        self._cond = threading.Condition()


class FakePolicyRepository(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.versions: list[StoredPolicy] = []
        self.objects: dict[objects.Key, objects.Stored] = {}
        self.changes: list[list[objects.ObjectChange] | None] = []  # each generation's, None: not as objects

    def _check(self, expected: int | None) -> None:
        latest = len(self.versions)
        if expected is not None and latest != expected:
            raise ConflictError(
                f"policy generation {expected} was expected to be the latest, but the store holds "
                f"generation {latest} now: read it again and retry"
            )

    def put_policy(self, document: Any, *, source: str, expected: int | None = None) -> int:
        with self._cond:
            self._check(expected)
            # as JSON, as the SQLite store keeps it: what was stored cannot change afterwards
            document = _as_json(document)
            changes = objects.diff(self.objects, document) if isinstance(document, dict) else None
            return self._put(document, changes, source)

    def _put(self, document: Any, changes: list[objects.ObjectChange] | None, source: str) -> int:
        if changes is None:
            self.objects = {}
        else:
            objects.changed(self.objects, changes)
        self.changes.append(changes)
        self.versions.append(StoredPolicy(len(self.versions) + 1, self.clock(), source, document))
        self._cond.notify_all()
        return len(self.versions)

    def put_objects(
        self, changes: list[objects.ObjectChange], *, source: str, expected: int | None = None
    ) -> int:
        with self._cond:
            self._check(expected)
            if not self.objects and self.versions:
                raise ConflictError(
                    "the latest policy is not kept as objects (it is not a mapping of sections): "
                    "apply a whole policy with `hyperfence policy apply FILE` first"
                )
            held = dict(self.objects)
            objects.changed(held, [_as_json_change(ch) for ch in changes])
            document = objects.assemble((key, s.pos, orjson.loads(s.text)) for key, s in held.items())
            return self._put(document, [_as_json_change(ch) for ch in changes], source)

    def policy_changes(self, after: int, upto: int) -> list[objects.ObjectChange] | None:
        with self._cond:
            if after <= 0 or upto < after or upto > len(self.versions):
                return None
            batches = self.changes[after:upto]
            if self.changes[after - 1] is None or any(b is None for b in batches):
                return None
            return objects.fold(copy.deepcopy([b for b in batches if b is not None]))

    def latest_generation(self) -> int:
        with self._cond:
            return len(self.versions)

    def get_policy(self, generation: int | None = None) -> StoredPolicy | None:
        with self._cond:
            if not self.versions:
                return None
            if generation is None:
                return _copied(self.versions[-1])
            if 1 <= generation <= len(self.versions):
                return _copied(self.versions[generation - 1])
            return None

    def wait_for_change(
        self, after: int, timeout: float, *, cancelled: Callable[[], bool] | None = None
    ) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.versions) <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (cancelled is not None and cancelled()):
                    break
                self._cond.wait(remaining)
            return len(self.versions)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class FakeEventLog(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.rows: list[dict[str, Any]] = []

    def add_event(self, kind: str, data: dict[str, Any], *, vm: str | None = None) -> None:
        self.add_events([(kind, vm, data)])

    def add_events(self, rows: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        # as the SQLite store keeps them: JSON text (what cannot be JSON is refused, the whole batch)
        texts = [(kind, vm, json.dumps(data, sort_keys=True)) for kind, vm, data in rows]
        with self._cond:
            now = self.clock()
            for kind, vm, text in texts:
                # as the SQLite store returns them: id, time, kind and vm, then the data
                self.rows.append(
                    {"id": len(self.rows) + 1, "time": now, "kind": kind, "vm": vm, **json.loads(text)}
                )

    def events(
        self, *, kind: str | None = None, vm: str | None = None, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        with self._cond:
            found = [
                r
                for r in self.rows
                if r["id"] > after and (not kind or r["kind"] == kind) and (not vm or r["vm"] == vm)
            ]
            return [copy.deepcopy(r) for r in found[-limit:]] if limit > 0 else []


class FakeAgentState(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.records: dict[str, AgentRecord] = {}

    def enroll_agent(self, rec: AgentRecord) -> None:
        with self._cond:
            old = self.records.get(rec.vm)
            self.records[rec.vm] = AgentRecord(
                vm=rec.vm,
                key=rec.key,
                channel=copy.deepcopy(rec.channel),
                last_seq=0,
                # a new enrolment keeps what the store keeps: when it was last seen, by which agent, isolation
                last_seen=old.last_seen if old else None,
                agent=old.agent if old else None,
                isolated=old.isolated if old else None,
                isolated_since=old.isolated_since if old else None,
                released_at=old.released_at if old else None,
            )

    def agents(self) -> dict[str, AgentRecord]:
        with self._cond:
            return {vm: _record_copy(r) for vm, r in sorted(self.records.items())}

    def save_agents(self, records: list[AgentRecord]) -> None:
        with self._cond:
            for r in records:
                old = self.records.get(r.vm)
                if old is None:
                    continue
                self.records[r.vm] = dataclasses.replace(
                    old,
                    last_seq=max(old.last_seq, r.last_seq),
                    last_seen=r.last_seen,
                    agent=r.agent,
                    isolated=r.isolated,
                    isolated_since=r.isolated_since,
                    released_at=r.released_at,
                )

    def save_seqs(self, seqs: dict[str, int]) -> None:
        with self._cond:
            for vm, seq in seqs.items():
                old = self.records.get(vm)
                if old is not None:
                    self.records[vm] = dataclasses.replace(old, last_seq=max(old.last_seq, seq))


class FakeLeaseStore(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.stored: tuple[Lease, ...] = ()

    def leases(self) -> tuple[Lease, ...]:
        with self._cond:
            return self.stored

    def save_leases(self, leases: tuple[Lease, ...]) -> None:
        by_key = {(le.vm, le.ip): le for le in leases}  # (vm, ip) is the key, as in the table: the last wins
        with self._cond:
            self.stored = tuple(by_key[k] for k in sorted(by_key, key=lambda k: (k[0], str(k[1]))))


class FakeInventoryStore(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.stored_inventory: StoredInventory | None = None

    def inventory(self) -> StoredInventory | None:
        with self._cond:
            got = self.stored_inventory
            return None if got is None else StoredInventory(copy.deepcopy(got.vms), got.read)

    def save_inventory(self, vms: tuple[dict[str, Any], ...], *, read: float) -> None:
        # as JSON, as the SQLite store keeps it (what cannot be JSON is refused, nothing changed)
        stored = StoredInventory(tuple(_as_json(list(vms))), float(read))
        with self._cond:
            self.stored_inventory = stored


class FakeOverlayStore(_Locked):
    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock)
        self.stored_overlays: tuple[Overlay, ...] = ()

    def overlays(self) -> tuple[Overlay, ...]:
        with self._cond:
            every = self.stored_overlays
        return tuple(sorted(every, key=lambda o: (o.producer, o.vm, o.kind.value)))

    def save_overlays(self, producer: str, overlays: tuple[Overlay, ...]) -> None:
        # as the SQLite store: `producer`'s rows go, `overlays` come in (Overlay is frozen: no copies needed)
        with self._cond:
            self.stored_overlays = (
                *(o for o in self.stored_overlays if o.producer != producer),
                *overlays,
            )


class FakeStore(
    FakePolicyRepository, FakeEventLog, FakeAgentState, FakeLeaseStore, FakeInventoryStore, FakeOverlayStore
):
    """Every repository port in memory, sharing one lock and one clock (the base classes' constructors
    run in turn through `super()`)."""

    def close(self) -> None:
        """Nothing to release (as `Store.close`, so that a fake can stand in an `Engine`)."""


def _as_json(document: Any) -> Any:
    return orjson.loads(orjson.dumps(document, option=orjson.OPT_SORT_KEYS))


def _as_json_change(ch: objects.ObjectChange) -> objects.ObjectChange:
    return ch if ch.deleted else dataclasses.replace(ch, body=_as_json(ch.body))


def _copied(p: StoredPolicy) -> StoredPolicy:
    return dataclasses.replace(p, document=copy.deepcopy(p.document))


def _record_copy(r: AgentRecord) -> AgentRecord:
    return dataclasses.replace(r, channel=copy.deepcopy(r.channel))


def _implements_ports(store: FakeStore) -> Repository:
    """(mypy checks here that `FakeStore` satisfies every repository port)"""
    return store


class FailingTicker:
    """A monitor that raises on every tick (a `Ticker`, run through `reconcile/monitor.py:Ticking`), noting
    when it ticked: what the supervisor must restart with backoff and report, while the others go on."""

    name = "failing"
    interval = 0.01

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(time.monotonic())
        raise RuntimeError("a bug in a tick")
