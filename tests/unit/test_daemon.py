"""The daemon's housekeeping between changes (no kernel needed: the engine's nft context is never opened)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest

from hyperfence.daemon import CHECKPOINT_IDLE, Daemon
from hyperfence.reconcile.engine import Engine


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return Daemon(Engine(netns=None, state_dir=str(tmp_path)), traffic_log=False)


def test_the_store_is_checkpointed_only_after_an_idle_period(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    monkeypatch.setattr(daemon.engine.store, "checkpoint", lambda: calls.append(time.monotonic()))
    daemon._checkpoint_when_idle()
    assert calls == []  # nothing changed yet
    daemon._last_change = time.monotonic()
    daemon._checkpoint_when_idle()
    assert calls == []  # a change just now: a checkpoint's fsync could stall the next apply
    daemon._last_change = time.monotonic() - CHECKPOINT_IDLE - 0.1
    daemon._checkpoint_when_idle()
    daemon._checkpoint_when_idle()
    assert len(calls) == 1  # once per quiet period


def test_a_real_checkpoint_folds_the_write_ahead_log(daemon: Daemon) -> None:
    store = daemon.engine.store
    store.put_policy({"networks": [], "blob": "x" * 200_000}, source="test")
    db = Path(store.path)
    assert db.stat().st_size < 100_000  # the new generation is still in the write-ahead log only
    daemon._last_change = time.monotonic() - CHECKPOINT_IDLE - 0.1
    daemon._checkpoint_when_idle()
    assert db.stat().st_size > 200_000  # folded into the database file
    stored = store.get_policy()
    assert stored is not None and stored.document["blob"] == "x" * 200_000


def test_tidy_freezes_what_exists_and_a_full_tidy_collects_first(daemon: Daemon) -> None:
    gc.unfreeze()
    try:
        daemon._tidy(full=False)
        assert gc.get_freeze_count() > 0
        daemon._tidy(full=True)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_repair_requests_are_coalesced_into_one_full_converge_with_their_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Daemon(
        Engine(netns=None, state_dir=str(tmp_path)),
        traffic_log=False,
        watch_drift=False,
        poll=60,
        resync=3600,
    )
    calls: list[tuple[bool, str | None]] = []
    done = threading.Event()

    def converge(*, full: bool, cause: str | None = None) -> dict[str, object]:
        calls.append((full, cause))
        if len(calls) == 2:
            done.set()
        return {"ok": True}

    monkeypatch.setattr(d, "_converge", converge)
    monkeypatch.setattr(d.engine, "policy_key", lambda: None)
    d.repair_now("generation 5 by process 7 (nft)")
    d.repair_now("generation 6 by process 7 (nft)")
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        assert done.wait(10)
    finally:
        d.stop()
        t.join(5)
    assert calls == [
        (True, "daemon start"),
        (True, "generation 5 by process 7 (nft); generation 6 by process 7 (nft)"),
    ]
