"""The agent monitor's channels against bad input, over real unix sockets (no kernel needed: without a
policy there is nothing to isolate). Each bad input is counted and dropped, the monitor keeps running, its
memory stays bounded, and the other VM's agent is unaffected."""

from __future__ import annotations

import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.agent import wire
from hyperfence.health.tracker import AgentRecord
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.engine import Engine


class SimAgent:
    """The guest's side of a channel, speaking the wire format (the real agent is tested elsewhere)."""

    def __init__(self, path: str, vm: str, key: bytes) -> None:
        self.vm, self.key, self.seq = vm, key, 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def frame(self, kind: str = "beat", data: dict[str, object] | None = None) -> bytes:
        self.seq = wire.next_seq(self.seq, time.time())
        body = wire.message(
            self.vm, self.seq, kind, data if data is not None else {"res": {"cpu": 1}}, time.time()
        )
        return wire.encode(self.key, body)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


OPEN: list[SimAgent] = []


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[AgentMonitor]:
    engine = Engine(netns=None, state_dir=str(tmp_path))
    for vm in ("a", "b"):
        engine.store.enroll_agent(
            AgentRecord(vm, vm.encode() * 32, {"type": "unix", "path": str(tmp_path / f"{vm}.sock")})
        )
    mon = AgentMonitor(engine, startup_grace=0)
    stop = threading.Event()
    t = threading.Thread(target=mon.run, args=(stop,), daemon=True)
    t.start()
    yield mon
    for sim in OPEN:
        sim.close()
    OPEN.clear()
    stop.set()
    t.join(timeout=5)
    engine.close()


def agent(monitor: AgentMonitor, vm: str) -> SimAgent:
    sim = SimAgent(str(Path(monitor.engine.state_dir) / f"{vm}.sock"), vm, vm.encode() * 32)
    OPEN.append(sim)
    return sim


def counts(monitor: AgentMonitor, vm: str) -> dict[str, int]:
    with monitor.lock:
        return dict(monitor.tracker.live[vm].counts)


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_good_messages_are_accepted_and_saved(monitor: AgentMonitor) -> None:
    a = agent(monitor, "a")
    a.send(a.frame("hello", {"agent": "0.1.0"}) + a.frame())
    wait_for(lambda: counts(monitor, "a").get("accepted") == 2)
    monitor.save()
    rec = monitor.engine.store.agents()["a"]
    assert rec.last_seq == a.seq and rec.agent == "0.1.0"
    kinds = [e["kind"] for e in monitor.engine.store.events(vm="a")]
    assert "agent-hello" in kinds


def test_each_bad_input_is_counted_and_the_other_vm_is_unaffected(monitor: AgentMonitor) -> None:
    a, b = agent(monitor, "a"), agent(monitor, "b")
    good = a.frame()
    forged = SimAgent.__new__(SimAgent)
    forged.vm, forged.key, forged.seq = "a", b"x" * 32, a.seq
    a.send(good)
    a.send(good)  # replayed
    a.send(forged.frame())  # wrong key
    a.send(b.frame())  # b's frame on a's channel
    a.send(struct.pack(">I", 40) + b"\x01" + b"garbage" * 6)  # garbage (40 bytes, bad MAC)
    b.send(b.frame())
    wait_for(lambda: sum(counts(monitor, "a").values()) >= 5)
    c = counts(monitor, "a")
    assert (c["accepted"], c["replayed"], c["forged"]) == (1, 1, 3)
    wait_for(lambda: counts(monitor, "b").get("accepted") == 1)
    # a 10 MB frame: refused from its length, the channel closed; the agent reconnects and goes on
    a.send(struct.pack(">I", 10 * 1024 * 1024) + b"x" * 1000)
    wait_for(lambda: counts(monitor, "a").get("oversized") == 1)
    a.close()
    a2 = agent(monitor, "a")
    a2.seq = a.seq
    a2.send(a2.frame())
    wait_for(lambda: counts(monitor, "a").get("accepted") == 2)
    # a frame cut by a closed channel
    cut = a2.frame()
    a2.send(cut[: len(cut) // 2])
    a2.close()
    wait_for(lambda: counts(monitor, "a").get("truncated") == 1)
    assert sum(counts(monitor, "b").values()) == counts(monitor, "b")["accepted"] == 1


def test_ten_thousand_messages_a_second_are_cut_and_memory_stays_bounded(monitor: AgentMonitor) -> None:
    a, b = agent(monitor, "a"), agent(monitor, "b")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    frames = b"".join(a.frame() for _ in range(10_000))
    t0 = time.monotonic()
    a.send(frames)
    b.send(b.frame())
    wait_for(lambda: sum(counts(monitor, "a").values()) == 10_000, timeout=30)
    elapsed = time.monotonic() - t0
    c = counts(monitor, "a")
    assert c["flood"] >= 10_000 - 700 - int(20 * elapsed) - 5, (c, elapsed)
    wait_for(lambda: counts(monitor, "b").get("accepted") == 1)
    with monitor.lock:
        assert len(monitor.tracker.live["a"].samples) <= 60
    monitor.save()
    assert len(monitor.engine.store.events(vm="a", limit=10_000)) <= 62  # per-minute event budget
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 50_000, grown_kb


def test_a_restart_keeps_keys_replay_protection_and_isolation(tmp_path: Path) -> None:
    engine = Engine(netns=None, state_dir=str(tmp_path))
    rec = AgentRecord("a", b"a" * 32, {"type": "unix", "path": str(tmp_path / "a.sock")})
    engine.store.enroll_agent(rec)
    first = AgentMonitor(engine, startup_grace=0)
    sim = SimAgent.__new__(SimAgent)
    sim.vm, sim.key, sim.seq = "a", b"a" * 32, 0
    frame = sim.frame()[4:]
    assert first.tracker.ingest("a", frame, time.time()).ok
    first.tracker.isolate("a", "test: silent", time.time())
    first.save()
    first.hub.close()
    engine.close()

    engine2 = Engine(netns=None, state_dir=str(tmp_path))
    second = AgentMonitor(engine2, startup_grace=0)
    try:
        assert engine2.quarantine == frozenset({"a"})  # isolation is back before any converge
        assert second.tracker.records["a"].key == b"a" * 32
        assert second.tracker.ingest("a", frame, time.time()).reason == "replayed"
        assert second.tracker.ingest("a", sim.frame()[4:], time.time()).ok
    finally:
        second.hub.close()
        engine2.close()
