"""The embedded store: SQLite (WAL) in the state directory (private: `system/state_dir.py`).

Implements the repository ports (`hyperfence/ports.py`: PolicyRepository, EventLog, AgentState, LeaseStore,
InventoryStore).
Policies are kept as generations (the document as the user wrote it, already validated), never edited in
place; a put can be a compare-and-swap on the latest generation. Events (drift repaired, applies) are
appended.

Concurrency: one connection per `Store`, shared by the daemon's threads (reconcile, agents, inventory, lease
learner, control socket handlers) under one lock: no statement or transaction of one thread interleaves
with another's (measured cheaper than a connection per thread: docs/design.md). Between processes (the
CLI writes while the daemon writes) WAL lets readers run beside the writer and `busy_timeout` makes a
writer wait up to BUSY_TIMEOUT for the other's write to end instead of failing with "database is locked";
every write transaction is `BEGIN IMMEDIATE`, so none fails on upgrading a read lock. New generations are
announced without polling by the change feed (`adapters/store/feed.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import orjson

from hyperfence.adapters.store.feed import ChangeFeed
from hyperfence.errors import ConflictError, TemporaryError
from hyperfence.health.tracker import AgentRecord
from hyperfence.model.lease import Lease, LeaseSource
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.policy import objects
from hyperfence.ports import Repository, StoredInventory, StoredPolicy
from hyperfence.system.state_dir import make_private_file, secure_state_dir

__all__ = ["BUSY_TIMEOUT", "Store", "StoredPolicy"]

BUSY_TIMEOUT = 10.0  # seconds a write waits for another connection's write transaction to end

SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    document TEXT NOT NULL
);
-- The latest policy as objects (policy/objects.py), and what each generation changed in them: what lets the
-- daemon read a change as itself (`policy_changes`). `policy.objects` is 1 for a generation whose changes
-- are in policy_change; `policy.document` is '' for one written as objects only (`put_objects`).
CREATE TABLE IF NOT EXISTS policy_object (
    section TEXT NOT NULL,
    name TEXT NOT NULL,
    pos INTEGER NOT NULL,
    body TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (section, name)
);
CREATE TABLE IF NOT EXISTS policy_change (
    generation INTEGER NOT NULL,
    section TEXT NOT NULL,
    name TEXT NOT NULL,
    pos INTEGER NOT NULL,
    body TEXT,
    PRIMARY KEY (generation, section, name)
);
-- The canonical text of each section of the latest policy (objects.section_texts), when known: a whole
-- document stored again is diffed only in the sections whose text moved, as values (an edit by objects
-- forgets the texts of its sections).
CREATE TABLE IF NOT EXISTS policy_text (
    section TEXT PRIMARY KEY,
    text BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    vm TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm ON events(vm, id);
CREATE TABLE IF NOT EXISTS agents (
    vm TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    channel TEXT NOT NULL,
    enrolled REAL NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_seen REAL,
    agent TEXT,
    isolated TEXT,
    isolated_since REAL,
    released_at REAL
);
CREATE TABLE IF NOT EXISTS leases (
    vm TEXT NOT NULL,
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    expires REAL NOT NULL,
    learned REAL NOT NULL,
    server TEXT,
    source TEXT NOT NULL,
    PRIMARY KEY (vm, ip)
);
CREATE TABLE IF NOT EXISTS overlays (
    producer TEXT NOT NULL,
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    until REAL,
    rate INTEGER,
    PRIMARY KEY (producer, vm, kind)
);
CREATE TABLE IF NOT EXISTS inventory (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    read REAL NOT NULL,
    vms TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_samples (
    vm TEXT NOT NULL,
    minute INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (vm, minute)
);
"""


class Store:
    def __init__(self, state_dir: str) -> None:
        # Every start checks (and repairs) that the state directory and the keys in it are private.
        self.repaired = secure_state_dir(state_dir)
        self.path = os.path.join(state_dir, "hyperfence.db")
        # 0600 before SQLite opens it: SQLite would create it 0644 (less the umask), and gives its -wal and
        # -shm files the database file's mode. Never by opening it: see `make_private_file`.
        make_private_file(self.path)
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # (`timeout` is SQLite's busy timeout; said again so that it reads as the contract it is)
        self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A policy of 1,000 VMs is ~1 MB per generation: with the default (1,000 pages) a writer would fold
        # the WAL into the database every few generations, inside `policy apply`. The daemon checkpoints
        # when idle instead (`checkpoint`); this bound only matters when no daemon runs.
        self._db.execute("PRAGMA wal_autocheckpoint=20000")
        self._db.executescript(SCHEMA)
        # One connection, used by the daemon's threads in turn: a transaction must not take in another
        # thread's statements, nor one thread's BEGIN meet another's open transaction.
        self._lock = threading.RLock()
        self._upgrade()
        self._feed = ChangeFeed(self.path)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise TemporaryError(f"store {self.path} is busy ({e}); retry", retry_after=0.5) from None
            raise

    def _row(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._exec(sql, args).fetchall()

    def _upgrade(self) -> None:
        """A store written before policies were kept as objects: add `policy.objects`, and the latest
        document's objects (its generations before stay readable as the documents they are)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(policy)")}
        if "objects" in columns:
            return
        with self._transaction():
            self._db.execute("ALTER TABLE policy ADD COLUMN objects INTEGER NOT NULL DEFAULT 0")
            row = self._db.execute(
                "SELECT generation, document FROM policy ORDER BY generation DESC LIMIT 1"
            ).fetchone()
            if row is not None:
                self._write_objects(int(row[0]), objects.diff({}, orjson.loads(row[1])), record=False)

    def _latest(self) -> int:
        return int(self._db.execute("SELECT MAX(generation) FROM policy").fetchone()[0] or 0)

    def _check_expected(self, expected: int | None) -> None:
        if expected is None:
            return
        latest = self._latest()
        if latest != expected:
            raise ConflictError(
                f"policy generation {expected} was expected to be the latest, but the store holds "
                f"generation {latest} now: read it again and retry"
            )

    def _diff(self, document: dict[str, Any]) -> list[objects.ObjectChange]:
        """The object changes `document` makes: sections whose text did not move have none; one edited in
        place or appended to is compared as values against its last text (`objects.section_changes`);
        any other is diffed object by object. Then the new texts are kept."""
        texts = objects.section_texts(document)
        known = dict(self._db.execute("SELECT section, text FROM policy_text").fetchall())
        heads = {
            (section, name): objects.Stored(pos, body)
            for section, name, pos, body in self._db.execute(
                "SELECT section, name, pos, body FROM policy_object WHERE name = ?", (objects.HEAD,)
            )
        }
        quick: list[objects.ObjectChange] = []
        slow = {s for s, _ in heads if s not in document}
        for section, text in texts.items():
            was = known.get(section)
            if was == text:
                continue
            found = None
            if was is not None:
                found = objects.section_changes(section, orjson.loads(was), document[section], text)
            if found is None:
                slow.add(section)
            else:
                quick += found
        held = dict(heads)
        for section in slow:
            held.update(
                ((section, name), objects.Stored(pos, body))
                for name, pos, body in self._db.execute(
                    "SELECT name, pos, body FROM policy_object WHERE section = ? AND name != ?",
                    (section, objects.HEAD),
                ).fetchall()
            )
        # (only what moved is written again: a one-rule change of a 10,000-VM policy rewrites its rules)
        self._db.executemany(
            "INSERT OR REPLACE INTO policy_text(section, text) VALUES (?, ?)",
            [(section, text) for section, text in texts.items() if known.get(section) != text],
        )
        self._db.executemany(
            "DELETE FROM policy_text WHERE section = ?", [(s,) for s in known if s not in texts]
        )
        return objects.diff(held, document, only=slow) + quick

    def _write_objects(self, generation: int, changes: list[objects.ObjectChange], *, record: bool) -> None:
        rows = [
            (ch.section, ch.name, ch.pos, None if ch.deleted else objects.canonical(ch.body))
            for ch in changes
        ]
        self._db.executemany(
            "DELETE FROM policy_object WHERE section = ? AND name = ?",
            [(section, name) for section, name, _, body in rows if body is None],
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO policy_object(section, name, pos, body, generation) VALUES (?, ?, ?, ?, ?)",
            [(section, name, pos, body, generation) for section, name, pos, body in rows if body is not None],
        )
        if record:
            self._db.executemany(
                "INSERT INTO policy_change(generation, section, name, pos, body) VALUES (?, ?, ?, ?, ?)",
                [(generation, *row) for row in rows],
            )

    def put_policy(self, document: Any, *, source: str, expected: int | None = None) -> int:
        """A new generation (see `ports.PolicyRepository.put_policy`): with `expected`, only if the latest
        generation is still `expected` (checked and written in one write transaction, so two processes
        racing for the same generation cannot both win), else `ConflictError`. The document is kept whole,
        and as the object changes it makes (`policy/objects.py diff`)."""
        text = orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode()
        with self._transaction():
            self._check_expected(expected)
            split = isinstance(document, dict)
            cur = self._db.execute(
                "INSERT INTO policy(created, source, document, objects) VALUES (?, ?, ?, ?)",
                (time.time(), source, text, int(split)),
            )
            generation = int(cur.lastrowid or 0)
            if split:
                self._write_objects(generation, self._diff(document), record=True)
            else:  # not a policy's shape (only tests store such): no objects, readers load it whole
                self._db.execute("DELETE FROM policy_object")
                self._db.execute("DELETE FROM policy_text")
        self._feed.announce(generation)
        return generation

    def put_objects(
        self, changes: list[objects.ObjectChange], *, source: str, expected: int | None = None
    ) -> int:
        """See `ports.PolicyRepository.put_objects`."""
        with self._transaction():
            self._check_expected(expected)
            if not self._db.execute("SELECT 1 FROM policy_object LIMIT 1").fetchone() and self._latest():
                raise ConflictError(
                    "the latest policy is not kept as objects (it is not a mapping of sections): "
                    "apply a whole policy with `hyperfence policy apply FILE` first"
                )
            cur = self._db.execute(
                "INSERT INTO policy(created, source, document, objects) VALUES (?, ?, '', 1)",
                (time.time(), source),
            )
            generation = int(cur.lastrowid or 0)
            self._write_objects(generation, changes, record=True)
            self._db.executemany(
                "DELETE FROM policy_text WHERE section = ?", [(s,) for s in {ch.section for ch in changes}]
            )
        self._feed.announce(generation)
        return generation

    def policy_changes(self, after: int, upto: int) -> list[objects.ObjectChange] | None:
        """See `ports.PolicyRepository.policy_changes`."""
        if after <= 0 or upto < after:
            return None
        with self._lock:
            recorded = self._db.execute(
                "SELECT COUNT(*), MIN(objects) FROM policy WHERE generation >= ? AND generation <= ?",
                (after, upto),
            ).fetchone()
            if int(recorded[0]) != upto - after + 1 or not recorded[1]:
                return None
            return objects.fold([self._changes(after, upto)])

    def wait_for_change(
        self, after: int, timeout: float, *, cancelled: Callable[[], bool] | None = None
    ) -> int:
        """See `ports.PolicyRepository.wait_for_change`: a put through this object wakes the wait at once,
        a commit by another process through inotify (`adapters/store/feed.py`)."""
        return self._feed.wait(after, timeout, self.latest_generation, cancelled)

    def wake(self) -> None:
        self._feed.wake()

    def latest_generation(self) -> int:
        with self._lock:
            return self._latest()

    def get_policy(self, generation: int | None = None) -> StoredPolicy | None:
        # One read transaction: a generation assembled from the latest objects must not meet the objects of
        # a generation another process commits between two of these statements.
        with self._lock, self._snapshot():
            if generation is None:
                row = self._db.execute(
                    "SELECT generation, created, source, document FROM policy ORDER BY generation DESC LIMIT 1"
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT generation, created, source, document FROM policy WHERE generation = ?",
                    (generation,),
                ).fetchone()
            if row is None:
                return None
            gen, created, source, text = int(row[0]), float(row[1]), str(row[2]), str(row[3])
            document = orjson.loads(text) if text else self._document_at(gen)
        return StoredPolicy(gen, created, source, document)

    def _document_at(self, generation: int) -> Any:
        """The document of a generation written as objects: its objects as they are now when it is the
        latest, else the last whole document before it with the changes after (up to it) made."""
        if generation == self._latest():
            return objects.assemble(
                ((section, name), pos, orjson.loads(body))
                for section, name, pos, body in self._db.execute(
                    "SELECT section, name, pos, body FROM policy_object"
                )
            )
        base = self._db.execute(
            "SELECT generation, document FROM policy WHERE generation < ? AND document != '' "
            "ORDER BY generation DESC LIMIT 1",
            (generation,),
        ).fetchone()
        held = objects.split(orjson.loads(base[1])) if base is not None else {}
        objects.replay(held, self._changes(0 if base is None else int(base[0]), generation))
        return objects.assemble((key, pos, body) for key, (pos, body) in held.items())

    def _changes(self, after: int, upto: int) -> list[objects.ObjectChange]:
        """The recorded object changes of generations `after` (excluded) to `upto`, oldest first."""
        return [
            objects.ObjectChange(
                section, name, pos, None if body is None else orjson.loads(body), body is None
            )
            for section, name, pos, body in self._db.execute(
                "SELECT section, name, pos, body FROM policy_change WHERE generation > ? AND generation <= ? "
                "ORDER BY generation",
                (after, upto),
            )
        ]

    def add_event(self, kind: str, data: dict[str, Any], *, vm: str | None = None) -> None:
        self._exec(
            "INSERT INTO events(time, kind, vm, data) VALUES (?, ?, ?, ?)",
            (time.time(), kind, vm, json.dumps(data, sort_keys=True)),
        )

    def events(
        self, *, kind: str | None = None, vm: str | None = None, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The latest `limit` events (oldest first), of one kind and/or VM, with an id above `after`."""
        where: list[str] = ["id > ?"]
        args: list[object] = [after]
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if vm:
            where.append("vm = ?")
            args.append(vm)
        sql = f"SELECT id, time, kind, vm, data FROM events WHERE {' AND '.join(where)}"  # noqa: S608 - fixed
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [
            {"id": r[0], "time": r[1], "kind": r[2], "vm": r[3], **json.loads(r[4])} for r in reversed(rows)
        ]

    def vm_with_events(self, name: str) -> str | None:
        """The VM id `name` is, among VMs with events: an id itself, or the libvirt domain name the
        inventory's events were recorded with (field ``domain``; the latest such event wins). For VMs that
        are not in the policy now (a domain that lost its address, a shut-off one)."""
        row = self._row(
            "SELECT vm FROM events WHERE vm IS NOT NULL AND (vm = ? OR json_extract(data, '$.domain') = ?) "
            "ORDER BY id DESC LIMIT 1",
            (name, name),
        )
        return None if row is None else str(row[0])

    # --- learned addresses ----------------------------------------------------------------------------

    def leases(self) -> tuple[Lease, ...]:
        """Every DHCP lease that taught a VM an address (expired ones too, until the learner drops them)."""
        rows = self._rows("SELECT vm, mac, ip, expires, learned, server, source FROM leases ORDER BY vm, ip")
        return tuple(
            Lease(
                vm=r[0],
                mac=r[1],
                ip=IPv4Address(r[2]),
                expires=float(r[3]),
                learned=float(r[4]),
                server=None if r[5] is None else IPv4Address(r[5]),
                source=LeaseSource(r[6]),
            )
            for r in rows
        )

    def save_leases(self, leases: tuple[Lease, ...]) -> None:
        """Replace the stored leases with `leases`, in one transaction (a VM holds a few: this is small)."""
        with self._transaction():
            self._db.execute("DELETE FROM leases")
            self._db.executemany(
                "INSERT INTO leases(vm, ip, mac, expires, learned, server, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        le.vm,
                        str(le.ip),
                        le.mac,
                        le.expires,
                        le.learned,
                        None if le.server is None else str(le.server),
                        le.source.value,
                    )
                    for le in leases
                ],
            )

    # --- overlays (isolation, rate limits, shields by producer: model/overlay.py) ----------------------

    def overlays(self) -> tuple[Overlay, ...]:
        """Every producer's overlays, expired ones too (until their producer or the daemon drops them)."""
        rows = self._rows(
            "SELECT producer, vm, kind, reason, since, until, rate FROM overlays ORDER BY producer, vm, kind"
        )
        return tuple(
            Overlay(
                producer=r[0],
                vm=r[1],
                kind=OverlayKind(r[2]),
                reason=r[3],
                since=float(r[4]),
                until=None if r[5] is None else float(r[5]),
                rate=None if r[6] is None else int(r[6]),
            )
            for r in rows
        )

    def save_overlays(self, producer: str, overlays: tuple[Overlay, ...]) -> None:
        """Replace `producer`'s overlays with `overlays` (all of that producer), in one transaction."""
        with self._transaction():
            self._db.execute("DELETE FROM overlays WHERE producer = ?", (producer,))
            self._db.executemany(
                "INSERT INTO overlays(producer, vm, kind, reason, since, until, rate) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(o.producer, o.vm, o.kind.value, o.reason, o.since, o.until, o.rate) for o in overlays],
            )

    # --- the last known inventory (VMs discovered from the hypervisor) ----------------------------------

    def inventory(self) -> StoredInventory | None:
        """The VMs of the hypervisor's last successful read and when it was; None when never saved."""
        row = self._row("SELECT read, vms FROM inventory WHERE id = 1")
        if row is None:
            return None
        return StoredInventory(tuple(orjson.loads(row[1])), float(row[0]))

    def save_inventory(self, vms: tuple[dict[str, Any], ...], *, read: float) -> None:
        """Replace the stored inventory (one row: a few hundred bytes per VM)."""
        text = orjson.dumps(list(vms), option=orjson.OPT_SORT_KEYS).decode()
        self._exec("INSERT OR REPLACE INTO inventory(id, read, vms) VALUES (1, ?, ?)", (read, text))

    # --- agents ---------------------------------------------------------------------------------------

    def enroll_agent(self, rec: AgentRecord) -> None:
        """Store a VM's agent key and channel; a new enrolment replaces the key and resets the sequence."""
        self._exec(
            "INSERT INTO agents(vm, key, channel, enrolled, last_seq) VALUES (?, ?, ?, ?, 0) "
            "ON CONFLICT(vm) DO UPDATE SET key = excluded.key, channel = excluded.channel, "
            "enrolled = excluded.enrolled, last_seq = 0",
            (rec.vm, rec.key.hex(), json.dumps(rec.channel, sort_keys=True), time.time()),
        )

    def agents(self) -> dict[str, AgentRecord]:
        rows = self._rows(
            "SELECT vm, key, channel, last_seq, last_seen, agent, isolated, isolated_since, released_at "
            "FROM agents ORDER BY vm"
        )
        return {
            r[0]: AgentRecord(
                vm=r[0],
                key=bytes.fromhex(r[1]),
                channel=json.loads(r[2]),
                last_seq=int(r[3]),
                last_seen=r[4],
                agent=r[5],
                isolated=r[6],
                isolated_since=r[7],
                released_at=r[8],
            )
            for r in rows
        }

    def save_agents(self, records: list[AgentRecord]) -> None:
        """The changing part of each record (sequence, last seen, isolation), in one transaction."""
        with self._transaction():
            self._db.executemany(
                "UPDATE agents SET last_seq = MAX(last_seq, ?), last_seen = ?, agent = ?, isolated = ?, "
                "isolated_since = ?, released_at = ? WHERE vm = ?",
                [
                    (r.last_seq, r.last_seen, r.agent, r.isolated, r.isolated_since, r.released_at, r.vm)
                    for r in records
                ],
            )

    def save_seqs(self, seqs: dict[str, int]) -> None:
        """The last accepted sequence number of each VM (VM id -> seq), in one transaction; a seq never goes
        back. Written every round in which agents were heard (replay protection across a crash)."""
        with self._transaction():
            self._db.executemany(
                "UPDATE agents SET last_seq = MAX(last_seq, ?) WHERE vm = ?",
                [(seq, vm) for vm, seq in seqs.items()],
            )

    def add_samples(self, rows: list[tuple[str, int, dict[str, float]]]) -> None:
        """Downsampled history: one row per VM and minute (the latest write of a minute wins)."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO agent_samples(vm, minute, data) VALUES (?, ?, ?)",
                [(vm, minute, json.dumps(data, sort_keys=True)) for vm, minute, data in rows],
            )

    def samples(self, vm: str, *, limit: int = 60) -> list[tuple[int, dict[str, float]]]:
        rows = self._rows(
            "SELECT minute, data FROM agent_samples WHERE vm = ? ORDER BY minute DESC LIMIT ?", (vm, limit)
        )
        return [(int(r[0]), json.loads(r[1])) for r in reversed(rows)]

    def add_events(self, rows: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Many events in one transaction: (kind, vm, data)."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO events(time, kind, vm, data) VALUES (?, ?, ?, ?)",
                [(now, kind, vm, json.dumps(data, sort_keys=True)) for kind, vm, data in rows],
            )

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A read transaction (the caller holds `_lock`): every statement in it sees the same commit."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise TemporaryError(f"store {self.path} is busy ({e}); retry", retry_after=0.5) from None
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database without waiting for readers (cheap when it is small)."""
        self._exec("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._feed.close()
        with self._lock:
            self._db.close()


def _implements_ports(store: Store) -> Repository:
    """(mypy checks here that `Store` satisfies every repository port)"""
    return store
