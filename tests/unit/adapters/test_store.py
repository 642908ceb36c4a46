"""The SQLite store beyond the ports' contract (`tests/unit/test_ports_contract.py`): other processes writing
the same database (the CLI while the daemon runs), the change feed across processes, and many threads at
once through one `Store`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyperfence.adapters.store import Store
from hyperfence.adapters.store import feed as store_feed
from hyperfence.errors import ConflictError, TemporaryError
from hyperfence.health.tracker import AgentRecord
from hyperfence.model.lease import Lease
from hyperfence.policy.objects import ObjectChange, apply_changes

# A second process on the same state directory: `put N` stores N generations (compare-and-swap, retried on a
# conflict) and prints each attempt; `events N` adds N events, one transaction each.
WRITER = """
import json, sys, threading, time
from hyperfence.adapters.store import Store
from hyperfence.errors import ConflictError
store = Store(sys.argv[1])
what, n = sys.argv[2], int(sys.argv[3])  # n: how many; 0: until told "stop" on stdin
attempts, i = [], 0
print("ready", flush=True)
sys.stdin.readline()  # "go"
stop = threading.Event()
if n == 0:
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
began = time.time()
print("writing", flush=True)
while (i < n) if n else not stop.is_set():
    if what == "events":
        store.add_event("process", {"i": i}, vm="proc")
    else:
        while True:
            seen = store.latest_generation()
            try:
                store.put_policy({"by": "process", "i": i}, source="process", expected=seen)
                attempts.append([seen, True])
                break
            except ConflictError:
                attempts.append([seen, False])
    i += 1
ended = time.time()
store.close()
print(json.dumps({"attempts": attempts, "done": i, "began": began, "ended": ended}))
"""


def writer(state: Path, what: str, n: int) -> subprocess.Popen[str]:
    """The writer, started and ready; it writes once given "go" on its stdin (`go`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(state), what, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"


def finish(proc: subprocess.Popen[str], *, stop: bool = False) -> dict[str, Any]:
    """The writer's report, once it ended (told to stop first if `stop`). Read through the same buffered
    stream as `writer` and `go` (their readline may have buffered the report already)."""
    assert proc.stdin is not None and proc.stdout is not None
    if stop:
        proc.stdin.write("stop\n")
    proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    assert proc.wait(120) == 0
    result: dict[str, Any] = json.loads(out)
    return result


def test_a_put_by_another_process_ends_the_wait_without_polling(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    try:
        assert store.wait_for_change(0, 0.01) == 0  # starts the feed's watcher
        assert store._feed.watched  # inotify works here: another process's commit is an event
        proc = writer(tmp_path, "put", 1)
        go(proc)
        t0 = time.monotonic()
        assert store.wait_for_change(0, 30) == 1  # the 30 s safety net is not what ends it
        assert time.monotonic() - t0 < 20
        finish(proc)
    finally:
        store.close()


def test_another_process_s_events_wake_no_waiter(tmp_path: Path) -> None:
    """The watcher wakes on every write to the database, but only a new generation wakes the waiters
    (`data_version`, then the latest generation, filter the rest)."""
    store = Store(str(tmp_path))
    try:
        store.wait_for_change(0, 0.01)
        proc = writer(tmp_path, "events", 20)
        go(proc)
        t0 = time.monotonic()
        assert store.wait_for_change(0, 1.0) == 0
        assert time.monotonic() - t0 >= 0.99
        finish(proc)
        assert len(store.events(vm="proc", limit=100)) == 20
        assert store._feed._bumps == 0
    finally:
        store.close()


def test_without_inotify_a_put_in_this_process_still_wakes_at_once_and_another_s_by_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify(directory: str) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(store_feed, "DirectoryWatch", no_inotify)
    store = Store(str(tmp_path))
    try:
        timer = threading.Timer(0.2, lambda: store.put_policy({}, source="this process"))
        timer.start()
        t0 = time.monotonic()
        assert store.wait_for_change(0, 20) == 1
        assert time.monotonic() - t0 < 5  # the put's own notification, not the 20 s timeout
        timer.join()
        assert not store._feed.watched
        proc = writer(tmp_path, "put", 1)
        timer = threading.Timer(0.2, go, (proc,))  # the other process writes 0.2 s into the wait
        timer.start()
        t0 = time.monotonic()
        assert store.wait_for_change(1, 2.0) == 2  # seen at the safety net's timeout, not at once
        assert time.monotonic() - t0 >= 1.99
        timer.join()
        finish(proc)
    finally:
        store.close()


def test_a_watcher_that_fails_is_reported_to_a_wait_and_the_next_wait_starts_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feed's watcher thread dying (here: its inotify read raises once) is no silent fall-back to the
    waits' timeout: the wait in progress raises at once, naming it, and the next wait watches again."""
    broken = [1]

    class FailingWatch(store_feed.DirectoryWatch):
        def read(self) -> set[str]:
            if broken[0]:
                broken[0] -= 1
                raise OSError(9, "Bad file descriptor")
            return super().read()

    monkeypatch.setattr(store_feed, "DirectoryWatch", FailingWatch)
    store = Store(str(tmp_path))
    try:
        assert store.wait_for_change(0, 0.01) == 0  # starts the watcher
        timer = threading.Timer(0.2, lambda: store.add_event("x", {}))  # a write: the watcher reads
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(TemporaryError) as e:
            store.wait_for_change(0, 20)
        timer.join()
        assert time.monotonic() - t0 < 10  # at once, not at the 20 s timeout
        assert "change feed failed (OSError: [Errno 9] Bad file descriptor)" in str(e.value)
        assert store._feed.failure is not None and store._feed.restarts == 0
        proc = writer(tmp_path, "put", 1)
        timer = threading.Timer(0.2, go, (proc,))  # the other process writes 0.2 s into the next wait
        timer.start()
        t0 = time.monotonic()
        assert store.wait_for_change(0, 30) == 1  # a new watcher saw it, not the 30 s safety net
        assert time.monotonic() - t0 < 20
        assert store._feed.restarts == 1 and store._feed.failure is None
        timer.join()
        finish(proc)
    finally:
        store.close()


THREADS = 4
ROUNDS = 40
EVENTS = 150


class Writers:
    """THREADS threads writing through one Store: events (one by one and in batches), agent state, leases,
    then ROUNDS races in which every thread puts a generation expecting the same latest one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.errors: list[BaseException] = []
        self.attempts: list[tuple[int, bool]] = []  # (expected generation, won)
        self.saved_leases: list[tuple[Lease, ...]] = []
        self._lock = threading.Lock()
        self._start = threading.Barrier(THREADS)
        self._race = threading.Barrier(THREADS)

    def work(self, t: int) -> None:
        try:
            self._start.wait()
            for i in range(EVENTS):
                self._write(t, i)
            for r in range(ROUNDS):
                self._race.wait()  # every thread reads the latest generation, then all put expecting it
                seen = self.store.latest_generation()
                self._race.wait()
                try:
                    self.store.put_policy({"t": t, "r": r}, source=f"thread {t}", expected=seen)
                    won = True
                except ConflictError:
                    won = False
                with self._lock:
                    self.attempts.append((seen, won))
        except BaseException as e:  # anything but a lost race fails the test (and ends the others' races)
            self.errors.append(e)
            self._start.abort()
            self._race.abort()

    def _write(self, t: int, i: int) -> None:
        vm = f"vm{t}"
        self.store.add_event("thread", {"t": t, "i": i}, vm=vm)
        if i % 3 == 0:
            self.store.add_events([("batch", vm, {"t": t, "i": i, "j": j}) for j in range(3)])
        self.store.save_seqs({vm: i})
        self.store.save_agents([AgentRecord(vm=vm, key=b"", last_seq=i, last_seen=float(i))])
        if i % 10 == 0:
            mac = "52:54:00:00:00:01"
            leases = tuple(
                Lease(vm=vm, mac=mac, ip=IPv4Address(f"10.{t}.{i}.{k}"), expires=1, learned=0)
                for k in range(4)
            )
            with self._lock:
                self.saved_leases.append(leases)
            self.store.save_leases(leases)

    def expected_events(self, process_events: int) -> Counter[Any]:
        want: Counter[Any] = Counter()
        for t in range(THREADS):
            for i in range(EVENTS):
                want[("thread", f"vm{t}", t, i, None)] += 1
                if i % 3 == 0:
                    for j in range(3):
                        want[("batch", f"vm{t}", t, i, j)] += 1
        for i in range(process_events):
            want[("process", "proc", None, i, None)] += 1
        return want


def test_threads_and_another_process_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    """The acceptance's concurrency test: threads writing events, agent state, leases and policy versions
    (compare-and-swap: THREADS threads race for each generation) through one Store, and other processes
    writing events and generations into the same database all along. Nothing is lost; the only errors are
    the losing side of each race, and each generation is won exactly once."""
    store = Store(str(tmp_path))
    for t in range(THREADS):
        store.enroll_agent(AgentRecord(vm=f"vm{t}", key=b"k" * 32, channel={"type": "unix"}))
    w = Writers(store)
    puts, events = writer(tmp_path, "put", 0), writer(tmp_path, "events", 0)  # until the threads are done
    threads = [threading.Thread(target=w.work, args=(t,)) for t in range(THREADS)]
    try:
        go(puts)
        go(events)
        began = time.time()
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        ended = time.time()
        put_run, event_run = finish(puts, stop=True), finish(events, stop=True)
    finally:
        for proc in (puts, events):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    try:
        assert w.errors == []
        # the other processes wrote while the threads did (else this would test nothing across processes)
        for run in (put_run, event_run):
            assert run["began"] < began and run["ended"] > ended and run["done"] > 0
        # each generation was created by exactly one winning put, which expected the one before it
        every = w.attempts + [(int(s), bool(won)) for s, won in put_run["attempts"]]
        wins = Counter(seen for seen, won in every if won)
        latest = store.latest_generation()
        assert sorted(wins) == list(range(latest)) and set(wins.values()) == {1}
        assert {seen for seen, _ in every} <= set(range(latest))
        assert latest == put_run["done"] + sum(won for _, won in w.attempts)
        assert sum(won for _, won in w.attempts) >= 1  # the threads won races too
        assert all(store.get_policy(g) is not None for g in range(1, latest + 1))
        # events: every one of them, exactly once
        rows = store.events(limit=10**9)
        got = Counter((e["kind"], e["vm"], e.get("t"), e["i"], e.get("j")) for e in rows)
        assert got == w.expected_events(event_run["done"])
        assert len({e["id"] for e in rows}) == len(rows)
        # agent state: each thread's last write
        agents = store.agents()
        assert {vm: (a.last_seq, a.last_seen) for vm, a in agents.items()} == {
            f"vm{t}": (EVENTS - 1, float(EVENTS - 1)) for t in range(THREADS)
        }
        # leases: replaced whole, never a mix of two saves
        final = store.leases()
        assert any(final == tuple(sorted(s, key=lambda le: (le.vm, str(le.ip)))) for s in w.saved_leases)
    finally:
        store.close()


@pytest.mark.parametrize("expected", [None, 0])
def test_a_writer_waits_for_another_process_s_write_instead_of_failing(
    tmp_path: Path, expected: int | None
) -> None:
    """A CLI process writing while the daemon holds a write transaction waits (busy_timeout)."""
    store = Store(str(tmp_path))
    other = Store(str(tmp_path))
    try:
        with other._transaction():  # as another process's long write would: the write lock is held
            done: list[int] = []
            t = threading.Thread(
                target=lambda: done.append(store.put_policy({}, source="s", expected=expected))
            )
            t.start()
            time.sleep(0.3)
            assert done == []  # waiting, not failed
            other._db.execute("INSERT INTO events(time, kind, vm, data) VALUES (0, 'x', NULL, '{}')")
        t.join(10)
        assert done == [1]
    finally:
        store.close()
        other.close()


def test_an_existing_database_file_is_never_opened_behind_sqlites_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POSIX locks belong to the process and go when *any* descriptor of the file is closed (SQLite's "how to
    corrupt" 2.2): a `Store` that opened the database file to fix its mode dropped the locks of another
    connection of this process (seen as `disk I/O error` with two stores in one process). Its mode is still
    narrowed to 0600."""
    import os as real_os

    Store(str(tmp_path)).close()
    db = tmp_path / "hyperfence.db"
    db.chmod(0o644)
    opened: list[str] = []
    real_open = real_os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        opened.append(str(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(real_os, "open", spy)
    Store(str(tmp_path)).close()
    assert str(db) not in opened
    assert db.stat().st_mode & 0o777 == 0o600


def test_a_store_from_before_objects_is_upgraded_and_its_documents_stay_readable(tmp_path: Path) -> None:
    import sqlite3

    old = {"networks": [{"name": "lan"}], "rules": [{"id": "r1"}]}
    db = sqlite3.connect(tmp_path / "hyperfence.db")
    db.execute(
        "CREATE TABLE policy (generation INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
        "source TEXT NOT NULL, document TEXT NOT NULL)"
    )
    db.execute("INSERT INTO policy(created, source, document) VALUES (1.0, 'old', ?)", (json.dumps(old),))
    db.commit()
    db.close()
    tmp_path.chmod(0o700)
    (tmp_path / "hyperfence.db").chmod(0o600)
    store = Store(str(tmp_path))
    try:
        assert (got := store.get_policy(1)) is not None and got.document == old
        # the latest document's objects are there: a change written as objects builds on it
        g2 = store.put_objects([ObjectChange("rules", "r2", 1, {"id": "r2"})], source="api", expected=1)
        assert (got := store.get_policy(g2)) is not None and got.document["rules"] == [
            {"id": "r1"},
            {"id": "r2"},
        ]
        assert store.policy_changes(1, g2) is None  # generation 1 was not kept as objects: read whole
        assert store.policy_changes(g2, g2) == []
    finally:
        store.close()
    again = Store(str(tmp_path))  # a second open upgrades nothing more
    try:
        assert (got := again.get_policy()) is not None and got.generation == g2
    finally:
        again.close()


_names = st.sampled_from(["a", "b", "c", "#1", ""])
_values = st.one_of(st.integers(0, 2), st.booleans(), st.floats(0, 2).filter(lambda f: f in (0.0, 1.0, 1.5)))
_docs = st.fixed_dictionaries(
    {},
    optional={
        "settings": st.dictionaries(st.sampled_from(["x", "y"]), _values, max_size=2),
        "vms": st.lists(st.fixed_dictionaries({"name": _names}, optional={"v": _values}), max_size=4),
        "rules": st.lists(st.fixed_dictionaries({}, optional={"id": _names, "v": _values}), max_size=4),
        "ipsets": st.dictionaries(_names, st.lists(_values, max_size=2), max_size=3),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(versions=st.lists(_docs, min_size=1, max_size=5))
def test_any_documents_stored_in_turn_are_their_objects_and_their_changes(
    tmp_path_factory: pytest.TempPathFactory, versions: list[dict[str, Any]]
) -> None:
    """Whole documents put one after the other (sections compared as values when they can be: `1`, `1.0`
    and `true` are equal values, never equal objects): the latest objects make the latest document, and the
    changes between two generations make one from the other."""
    store = Store(str(tmp_path_factory.mktemp("store")))
    try:
        previous: tuple[int, dict[str, Any]] | None = None
        for document in versions:
            generation = store.put_policy(document, source="t")
            # (as the store keeps JSON: mappings' keys sorted; list order and value types kept)
            assert json.dumps(store._document_at(generation), sort_keys=True) == json.dumps(
                document, sort_keys=True
            )
            if previous is not None:
                changes = store.policy_changes(previous[0], generation)
                assert changes is not None
                made = apply_changes(previous[1], changes)
                assert json.dumps(made, sort_keys=True) == json.dumps(document, sort_keys=True)
            previous = (generation, document)
    finally:
        store.close()


def test_values_equal_in_python_but_not_in_json_are_changes(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    try:
        versions: list[dict[str, Any]] = [
            {"rules": [{"id": "a", "v": 1}, {"id": "b"}], "ipsets": {"s": [0]}},
            {"rules": [{"id": "a", "v": True}, {"id": "b"}], "ipsets": {"s": [0.0]}},  # == the one before
            {"rules": [{"id": "a", "v": 1.0}, {"id": "b", "v": 2}], "ipsets": {"s": [False]}},
        ]
        for before, document in zip([None, *versions], versions, strict=False):
            generation = store.put_policy(document, source="t")
            assert json.dumps(store._document_at(generation)) == json.dumps(document)
            if before is not None:
                changes = store.policy_changes(generation - 1, generation)
                assert changes is not None and json.dumps(apply_changes(before, changes)) == json.dumps(
                    document
                )
    finally:
        store.close()


def test_a_generation_read_as_objects_never_meets_a_later_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`get_policy` of the latest generation, when it was written as objects, assembles it from the objects:
    a generation another process commits meanwhile must not leak into it (one read transaction)."""
    reader, writer = Store(str(tmp_path)), Store(str(tmp_path))
    try:
        g1 = writer.put_policy({"rules": [{"id": "a"}]}, source="t")
        g2 = writer.put_objects([ObjectChange("rules", "b", 1, {"id": "b"})], source="t", expected=g1)
        real = reader._latest

        def latest_then_another_commit() -> int:
            seen = real()
            if seen == g2:  # the reader now knows g2 as the latest: a writer commits g3 right after
                writer.put_objects([ObjectChange("rules", "c", 2, {"id": "c"})], source="t", expected=g2)
            return seen

        monkeypatch.setattr(reader, "_latest", latest_then_another_commit)
        got = reader.get_policy(g2)
        assert got is not None and got.document == {"rules": [{"id": "a"}, {"id": "b"}]}
    finally:
        reader.close()
        writer.close()
