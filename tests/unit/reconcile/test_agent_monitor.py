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

from hyperfence import wire
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


# --- the whole receive path, fuzzed ----------------------------------------------------------------

import tempfile  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEY_A, KEY_B = b"a" * 32, b"b" * 32
ITEMS = st.one_of(
    st.just(("good",)),
    st.just(("replay",)),
    st.just(("forged",)),
    st.just(("other-vm",)),
    st.just(("deep",)),
    st.just(("big-seq",)),
    st.just(("bad-length",)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=200)),
)


def stream(items: list[tuple[object, ...]]) -> bytes:
    """The bytes a hostile or confused agent sends on VM a's channel."""
    out, seq, sent = b"", 0, []
    for item in items:
        kind = item[0]
        if kind == "good":
            seq += 1
            frame = wire.encode(KEY_A, wire.message("a", seq, "beat", {"res": {"cpu": seq}}, 1.0))
            sent.append(frame)
        elif kind == "replay":
            frame = sent[-1] if sent else wire.encode(KEY_A, wire.message("a", 0, "beat", {}, 1.0))
        elif kind == "forged":
            frame = wire.encode(b"x" * 32, wire.message("a", 10**12, "beat", {}, 1.0))
        elif kind == "other-vm":
            frame = wire.encode(KEY_B, wire.message("b", 10**12, "beat", {}, 1.0))
        elif kind == "deep":
            payload = (
                b'{"data":{"x":' + b"[" * 5000 + b"]" * 5000 + b'},"kind":"beat","seq":1,"t":1,"vm":"a"}'
            )
            import hashlib
            import hmac

            mac = hmac.new(KEY_A, b"\x01" + payload, hashlib.sha256).digest()
            frame = struct.pack(">I", 33 + len(payload)) + b"\x01" + mac + payload
        elif kind == "big-seq":
            frame = wire.encode(KEY_A, wire.message("a", 2**63, "beat", {}, 1.0))
        elif kind == "bad-length":
            frame = struct.pack(">I", wire.MAX_FRAME + 1)
        else:
            blob = item[1]
            assert isinstance(blob, bytes)
            frame = struct.pack(">I", len(blob)) + blob
        out += frame
    return out


def model(data: bytes) -> tuple[bool, int, int, dict[str, int]]:
    """What the receiver must make of `data` on a's unix channel: (claimed, last seq, accepted, refusals)."""
    from collections import Counter

    from hyperfence.adapters.agent_channels import MAX_CLAIM_FRAME

    reader = wire.FrameReader(MAX_CLAIM_FRAME)
    frames = reader.feed(data)
    try:
        first = next(frames, None)
    except wire.WireError:
        return False, 0, 0, {}
    if first is None:
        return False, 0, 0, {}
    try:
        if wire.verify(KEY_A, first, "a")["seq"] <= 0:
            return False, 0, 0, {}
    except wire.WireError:
        return False, 0, 0, {}
    reader.max_frame = wire.MAX_FRAME
    last, counts = 0, Counter[str]()
    rest = [first]
    try:
        rest.extend(reader.feed(b""))
        closed = False
    except wire.WireError as e:
        counts[e.reason] += 1
        closed = True
    for frame in rest:
        try:
            seq = wire.verify(KEY_A, frame, "a")["seq"]
        except wire.WireError as e:
            counts[e.reason] += 1
            continue
        if seq <= last:
            counts["replayed"] += 1
        else:
            last = seq
            counts["accepted"] += 1
    if not closed and reader.pending:
        counts["truncated"] += 1
    accepted = counts.pop("accepted", 0)
    return True, last, accepted, dict(counts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ITEMS, min_size=1, max_size=25), st.lists(st.integers(1, 400), max_size=30))
def test_no_frame_sequence_ends_the_receiver_or_touches_another_vm(
    items: list[tuple[object, ...]], cuts: list[int]
) -> None:
    data = stream(items)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(netns=None, state_dir=tmp)
        for vm, key in (("a", KEY_A), ("b", KEY_B)):
            engine.store.enroll_agent(AgentRecord(vm, key, {"type": "unix", "path": f"{tmp}/{vm}.sock"}))
        mon = AgentMonitor(engine, startup_grace=0)
        mon.hub.sync(mon._specs())
        b = SimAgent(f"{tmp}/b.sock", "b", KEY_B)
        b.send(b.frame())
        for _ in range(10):
            mon.round(timeout=0.01)
        b_before = (vars(mon.tracker.records["b"]).copy(), dict(mon.tracker.live["b"].counts))
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        a.connect(f"{tmp}/a.sock")
        pos = 0
        for cut in [*cuts, len(data)]:  # fragmented at random points, several frames per piece or less
            piece, pos = data[pos : pos + cut], pos + cut
            try:
                a.sendall(piece)
            except OSError:  # the receiver closed the channel (a bad length): the rest is lost
                break
            mon.round(timeout=0.005)
            if pos >= len(data):
                break
        a.close()
        for _ in range(20):
            mon.round(timeout=0.005)
        claimed, last, accepted, refused = model(data)
        rec, live = mon.tracker.records["a"], mon.tracker.live["a"]
        counts = dict(live.counts)
        try:
            assert (vars(mon.tracker.records["b"]).copy(), dict(mon.tracker.live["b"].counts)) == b_before
            if claimed:
                assert rec.last_seq == last and counts.pop("accepted", 0) == accepted
                assert counts == refused
                assert engine.store.agents()["a"].last_seq == last  # saved in the round that accepted it
            else:
                assert counts == {} and rec.last_seq == 0 and sum(mon.hub.refused.values()) == 1
        finally:
            b.close()
            mon.hub.close()
            engine.close()


def test_a_frame_accepted_before_a_crash_is_refused_after_it(tmp_path: Path) -> None:
    """No save() between: the round that accepted the frame made its seq durable."""
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store.enroll_agent(AgentRecord("a", KEY_A, {"type": "unix", "path": str(tmp_path / "a.sock")}))
    mon = AgentMonitor(engine, startup_grace=0)
    mon.hub.sync(mon._specs())
    sim = SimAgent(str(tmp_path / "a.sock"), "a", KEY_A)
    frame = sim.frame()
    sim.send(frame)
    for _ in range(10):
        mon.round(timeout=0.01)
    assert mon.tracker.live["a"].counts["accepted"] == 1
    # "crash": no save, no close of the monitor; a new one reads the store
    sim.close()
    engine2 = Engine(netns=None, state_dir=str(tmp_path))
    second = AgentMonitor(engine2, startup_grace=0)
    try:
        assert second.tracker.ingest("a", frame[4:], time.time()).reason == "replayed"
    finally:
        mon.hub.close()
        second.hub.close()
        engine.close()
        engine2.close()


def test_an_error_while_processing_a_frame_is_counted_and_the_receiver_goes_on(
    monitor: AgentMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = agent(monitor, "a"), agent(monitor, "b")
    a.send(a.frame())
    wait_for(lambda: counts(monitor, "a").get("accepted") == 1)
    real = monitor._accepted

    def buggy(vm: str, *args: object) -> None:
        if vm == "a":
            raise KeyError("a bug")
        real(vm, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(monitor, "_accepted", buggy)
    a.send(a.frame())
    wait_for(lambda: counts(monitor, "a").get("error") == 1)
    b.send(b.frame())
    wait_for(lambda: counts(monitor, "b").get("accepted") == 1)


def test_the_tls_endpoint_follows_the_policy_while_the_daemon_runs(monitor: AgentMonitor) -> None:
    """A policy that sets, moves or drops `settings.agent_endpoint` opens, moves or closes the listener
    without a restart (here on 127.0.0.1: no kernel, the engine's namespace is ours)."""
    from tests.unit.policy.test_parse import doc

    def ports() -> tuple[int, int]:
        socks = [socket.socket() for _ in range(2)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        found = tuple(s.getsockname()[1] for s in socks)
        for s in socks:
            s.close()
        return found  # type: ignore[return-value]

    def listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def apply(endpoint: str | None) -> None:
        settings = {"agent_endpoint": endpoint} if endpoint else {}
        monitor.engine.store_policy(doc(settings=settings), source="test")
        monitor.engine.compiled()

    first, second = ports()
    apply(f"127.0.0.1:{first}")
    wait_for(lambda: listening(first))
    wait_for(lambda: monitor.channel_stats.get("endpoint") == f"127.0.0.1:{first}")
    apply(f"127.0.0.1:{second}")
    wait_for(lambda: listening(second) and not listening(first))
    apply(None)
    wait_for(lambda: not listening(second))
    monitor.save()
    endpoints = [e["endpoint"] for e in monitor.engine.store.events(kind="agent-endpoint")]
    assert endpoints == [f"127.0.0.1:{first}", f"127.0.0.1:{second}", None]


def test_each_vms_heartbeat_follows_the_policy_and_a_change_of_rules_reuses_it(tmp_path: Path) -> None:
    """The heartbeat of each enrolled VM is worked out again when the policy's VMs or heartbeat entries
    change, and not for a change of rules only (the same VMs and entries: no pass over 10,000 VMs)."""
    from tests.unit.policy.test_parse import doc

    engine = Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _ns: ())
    try:
        for vm in ("vm1", "vm2"):
            engine.store.enroll_agent(AgentRecord(vm, vm.encode() * 16, {"type": "unix", "path": "x"}))
        mon = AgentMonitor(engine, startup_grace=0)
        rule = {"id": "r", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}
        slow = [{"id": "slow", "vms": "vm:vm2", "interval": 5}]

        def apply(**extra: object) -> dict[str, float]:
            engine.store_policy(doc(**extra), source="t")
            engine.compiled()
            return {vm: hb.interval for vm, hb in mon.heartbeats().items()}

        assert apply(rules=[rule]) == {"vm1": 1.0, "vm2": 1.0}
        assert apply(rules=[rule], heartbeats=slow) == {"vm1": 1.0, "vm2": 5.0}  # an entry changed
        before = mon.heartbeats()
        assert apply(rules=[{**rule, "services": ["tcp/81"]}], heartbeats=slow) == {"vm1": 1.0, "vm2": 5.0}
        assert mon.heartbeats() is before  # rules only: the same
        vms = [{**v, "labels": {"t": "x"}} if v["name"] == "vm1" else v for v in doc()["vms"]]
        relabelled = [{"id": "slow", "vms": "label:t=x", "interval": 7}]
        assert apply(vms=vms, heartbeats=relabelled) == {"vm1": 7.0, "vm2": 1.0}  # VMs and entries changed
        assert apply(vms=doc()["vms"], heartbeats=relabelled) == {"vm1": 1.0, "vm2": 1.0}  # VMs changed
    finally:
        engine.close()
