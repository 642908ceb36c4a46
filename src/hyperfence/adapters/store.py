"""The embedded store: SQLite (WAL) in the state directory.

Policies are kept as generations (the document as the user wrote it, already validated), never edited in
place; events (drift repaired, applies) are appended. A second process can read while the daemon writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import orjson

from hyperfence.errors import TemporaryError

SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    generation INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    vm TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm ON events(vm, id);
"""


@dataclass(frozen=True)
class StoredPolicy:
    generation: int
    created: float
    source: str
    document: Any  # plain data (dict), as parsed from YAML/JSON


class Store:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "hyperfence.db")
        self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A policy of 1,000 VMs is ~1 MB per generation: with the default (1,000 pages) a writer would fold
        # the WAL into the database every few generations, inside `policy apply`. The daemon checkpoints
        # when idle instead (`checkpoint`); this bound only matters when no daemon runs.
        self._db.execute("PRAGMA wal_autocheckpoint=20000")
        self._db.executescript(SCHEMA)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise TemporaryError(f"store {self.path} is busy ({e}); retry", retry_after=0.5) from None
            raise

    def put_policy(self, document: Any, *, source: str) -> int:
        cur = self._exec(
            "INSERT INTO policy(created, source, document) VALUES (?, ?, ?)",
            (time.time(), source, orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode()),
        )
        return int(cur.lastrowid or 0)

    def latest_generation(self) -> int:
        row = self._exec("SELECT MAX(generation) FROM policy").fetchone()
        return int(row[0] or 0)

    def get_policy(self, generation: int | None = None) -> StoredPolicy | None:
        if generation is None:
            row = self._exec(
                "SELECT generation, created, source, document FROM policy ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        else:
            row = self._exec(
                "SELECT generation, created, source, document FROM policy WHERE generation = ?", (generation,)
            ).fetchone()
        if row is None:
            return None
        return StoredPolicy(int(row[0]), float(row[1]), str(row[2]), orjson.loads(row[3]))

    def add_event(self, kind: str, data: dict[str, Any], *, vm: str | None = None) -> None:
        self._exec(
            "INSERT INTO events(time, kind, vm, data) VALUES (?, ?, ?, ?)",
            (time.time(), kind, vm, json.dumps(data, sort_keys=True)),
        )

    def events(self, *, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT id, time, kind, vm, data FROM events"
        args: tuple[Any, ...] = ()
        if kind:
            sql += " WHERE kind = ?"
            args = (kind,)
        rows = self._exec(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            {"id": r[0], "time": r[1], "kind": r[2], "vm": r[3], **json.loads(r[4])} for r in reversed(rows)
        ]

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database without waiting for readers (cheap when it is small)."""
        self._exec("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._db.close()
