"""The host's view of agents, with a fake clock: silence -> isolate within `misses` intervals, beats ->
release, and every bad input counted and dropped without touching another VM."""

from __future__ import annotations

import struct

from hyperfence import wire
from hyperfence.health.tracker import AgentRecord, Tracker
from hyperfence.model.policy import Heartbeat, Release, SilenceAction

T0 = 1_000_000.0
HB = Heartbeat("default", ())
KEYS = {"a": b"A" * 32, "b": b"B" * 32}


def tracker(**kw: float) -> Tracker:
    records = {vm: AgentRecord(vm, key) for vm, key in KEYS.items()}
    return Tracker(records, started=T0, startup_grace=0.0, **kw)


class Agent:
    def __init__(self, vm: str, key: bytes | None = None) -> None:
        self.vm, self.key, self.seq = vm, key or KEYS[vm], 0

    def frame(self, now: float, kind: str = "beat", data: dict[str, object] | None = None) -> bytes:
        self.seq = wire.next_seq(self.seq, now)
        body = wire.message(self.vm, self.seq, kind, data if data is not None else {"res": {"cpu": 3}}, now)
        return wire.encode(self.key, body)[4:]


def beat_until(t: Tracker, agent: Agent, start: float, end: float) -> None:
    now = start
    while now < end:
        assert t.ingest(agent.vm, agent.frame(now), now).ok
        now += 1.0


def test_a_silent_agent_is_isolated_within_three_intervals_and_released_when_it_beats_again() -> None:
    t, a, b = tracker(), Agent("a"), Agent("b")
    beat_until(t, a, T0, T0 + 5)
    beat_until(t, b, T0, T0 + 5)
    last = T0 + 4
    hbs = {"a": HB, "b": HB}
    # a stops; b keeps beating
    for k in range(1, 8):
        now = last + k * 0.5
        t.ingest("b", b.frame(now), now)
        for d in t.decide(hbs, now):
            assert d.vm == "a" and d.action == "isolate"
            t.isolate(d.vm, d.reason, now)
        if t.records["a"].isolated:
            break
    assert t.records["a"].isolated is not None
    assert now - last <= 3.5  # within misses x interval (+ the decision's 0.5 s tick)
    assert t.records["b"].isolated is None
    assert t.status("a", HB, now) == "silent"
    # a comes back: released after two good messages
    assert t.decide(hbs, now) == []  # level-triggered: no second isolate
    now += 1
    t.ingest("a", a.frame(now), now)
    assert [d.action for d in t.decide(hbs, now)] == []
    now += 1
    t.ingest("a", a.frame(now), now)
    (d,) = t.decide(hbs, now)
    assert (d.vm, d.action) == ("a", "release")


def test_manual_release_policy_waits_for_the_operator() -> None:
    t, a = tracker(), Agent("a")
    hb = Heartbeat("m", (), release=Release.MANUAL)
    t.isolate("a", "test", T0)
    for k in range(1, 5):
        t.ingest("a", a.frame(T0 + k), T0 + k)
    assert t.decide({"a": hb}, T0 + 5) == []
    t.release("a", T0 + 5, manual=True)
    assert t.records["a"].isolated is None
    assert t.decide({"a": hb}, T0 + 6) == []  # silence counts from the release


def test_alert_is_raised_once_per_silence() -> None:
    t = tracker()
    hb = Heartbeat("al", (), action=SilenceAction.ALERT)
    assert [d.action for d in t.decide({"a": hb}, T0 + 4)] == ["alert"]
    assert t.decide({"a": hb}, T0 + 5) == []
    assert t.records["a"].isolated is None


def test_never_seen_is_given_the_startup_grace() -> None:
    t = Tracker({"a": AgentRecord("a", KEYS["a"])}, started=T0, startup_grace=10.0)
    assert t.status("a", HB, T0 + 12) == "never"
    assert t.decide({"a": HB}, T0 + 12) == []
    assert [d.action for d in t.decide({"a": HB}, T0 + 13.5)] == ["isolate"]


def test_a_vm_that_was_off_was_not_silent_its_clock_starts_at_its_start() -> None:
    """Seen long ago, then shut off for an hour, then started: not silent at once (the hour off is no
    silence); it has its boot grace, then `misses` intervals; the first beat ends the grace."""
    t, a = tracker(), Agent("a")
    hb = Heartbeat("p", (), action=SilenceAction.PAUSE, release=Release.MANUAL, boot_grace=20.0)
    assert t.ingest("a", a.frame(T0), T0).ok
    start = T0 + 3600
    t.vm_started("a", start)
    assert t.status("a", hb, start + 0.2) == "booting"
    assert t.decide({"a": hb}, start + 0.2) == []
    assert t.decide({"a": hb}, start + 20 + 3) == []  # boot grace + misses x interval: not yet
    assert t.ingest("a", a.frame(start + 17), start + 17).ok  # the agent's first beat after boot
    assert t.status("a", hb, start + 17.5) == "ok"
    assert t.decide({"a": hb}, start + 19) == []
    # from the first beat on, the usual clock: silent 3 intervals after the last beat, grace or not
    (d,) = t.decide({"a": hb}, start + 17 + 3.5)
    assert d.action == "pause" and "silent for 3 s" in d.reason


def test_a_vm_whose_agent_never_speaks_after_a_start_is_silent_after_grace_plus_misses() -> None:
    t = tracker()
    hb = Heartbeat("i", (), boot_grace=10.0)
    t.vm_started("a", T0 + 100)
    assert t.decide({"a": hb}, T0 + 112.9) == []
    assert t.status("a", hb, T0 + 112.9) == "booting"
    (d,) = t.decide({"a": hb}, T0 + 113.5)
    assert d.action == "isolate" and "not heard since the VM started 13 s ago (boot grace 10 s)" in d.reason
    # a reset of a beating VM: the same grace again
    t2, a = tracker(), Agent("a")
    beat_until(t2, a, T0, T0 + 50)
    t2.vm_started("a", T0 + 50)  # reset: the agent restarts with the guest
    assert t2.decide({"a": hb}, T0 + 62) == []
    assert [d.action for d in t2.decide({"a": hb}, T0 + 63.5)] == ["isolate"]


def test_boot_grace_zero_counts_silence_from_the_start() -> None:
    t = tracker()
    hb = Heartbeat("z", (), boot_grace=0.0)
    t.vm_started("a", T0 + 100)
    assert t.decide({"a": hb}, T0 + 102.9) == []
    assert [d.action for d in t.decide({"a": hb}, T0 + 103.1)] == ["isolate"]


def test_alert_is_raised_again_after_a_restart() -> None:
    t = tracker()
    hb = Heartbeat("al", (), action=SilenceAction.ALERT, boot_grace=5.0)
    assert [d.action for d in t.decide({"a": hb}, T0 + 4)] == ["alert"]
    t.vm_started("a", T0 + 10)
    assert t.decide({"a": hb}, T0 + 17) == []
    assert [d.action for d in t.decide({"a": hb}, T0 + 18.5)] == ["alert"]


def test_forged_replayed_and_garbage_are_counted_per_vm_and_change_nothing() -> None:
    t, a = tracker(), Agent("a")
    good = a.frame(T0)
    assert t.ingest("a", good, T0).ok
    assert t.ingest("a", good, T0 + 1).reason == "replayed"
    assert t.ingest("a", Agent("a", key=b"x" * 32).frame(T0 + 1), T0 + 1).reason == "forged"
    assert t.ingest("a", b"\x01" + b"\0" * 40, T0 + 1).reason == "forged"
    assert t.ingest("a", b"garbage", T0 + 1).reason in ("malformed", "version")
    assert t.refuse("a", "oversized", "10 MB").reason == "oversized"
    counts = t.live["a"].counts
    assert counts["accepted"] == 1 and counts["replayed"] == 1 and counts["forged"] == 2
    assert t.records["a"].last_seen == T0  # only the accepted frame moved it
    assert sum(t.live["b"].counts.values()) == 0


def test_a_vm_cannot_speak_for_another() -> None:
    t = tracker()
    b_frame_signed_by_a = Agent("b", key=KEYS["a"]).frame(T0)
    assert t.ingest("b", b_frame_signed_by_a, T0).reason == "forged"
    a_frame_on_b_channel = Agent("a").frame(T0)
    assert t.ingest("b", a_frame_on_b_channel, T0).reason == "forged"
    assert t.records["a"].last_seen is None and t.records["b"].last_seen is None
    assert t.ingest("nobody", Agent("a").frame(T0), T0).reason == "forged"


def test_a_flood_is_cut_by_the_token_bucket_and_other_vms_are_unaffected() -> None:
    t, a, b = tracker(rate=20.0, burst=50.0), Agent("a"), Agent("b")
    results = [t.ingest("a", a.frame(T0 + i / 10_000), T0 + i / 10_000).reason for i in range(10_000)]
    assert results.count("accepted") <= 50 + 20 + 1
    assert results.count("flood") >= 9_900
    assert t.ingest("b", b.frame(T0 + 1), T0 + 1).ok
    assert len(t.live["a"].samples) <= 60  # memory stays bounded


def test_events_and_metrics_are_bounded_and_flattened() -> None:
    t, a = tracker(), Agent("a")
    data = {
        "res": {
            "cpu": 5.5,
            "mem": {"used": 100, "total": 200},
            "bad": "x",
            "flag": True,
            "nan": float("inf"),
        },
        "events": [{"type": "listen", "port": 22, "blob": "y" * 1000}] * 60 + ["not an event"],
    }
    r = t.ingest("a", a.frame(T0, data=data), T0)
    assert r.ok
    assert r.metrics == {"cpu": 5.5, "mem.used": 100.0, "mem.total": 200.0}
    assert len(r.events) == 51 and r.events[-1] == {"type": "truncated", "count": 11}
    assert len(r.events[0]["blob"]) == 200


def test_frames_arrive_through_a_reader_even_one_byte_at_a_time() -> None:
    t, a = tracker(), Agent("a")
    stream = b"".join(struct.pack(">I", len(f)) + f for f in (a.frame(T0), a.frame(T0 + 1)))
    reader = wire.FrameReader()
    got = [
        t.ingest("a", f, T0 + 1).reason for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])
    ]
    assert got == ["accepted", "accepted"]


def test_statuses_ok_late_silent() -> None:
    t, a = tracker(), Agent("a")
    assert t.ingest("a", a.frame(T0), T0).ok
    assert t.status("a", HB, T0 + 1.0) == "ok"
    assert t.status("a", HB, T0 + 1.6) == "late"  # a beat is overdue
    assert t.status("a", HB, T0 + 3.1) == "silent"


# --- claims, refusals and what must be saved ------------------------------------------------------


def state(t: Tracker) -> object:
    """Everything a frame could change, comparable."""
    return (
        {vm: vars(rec).copy() for vm, rec in t.records.items()},
        {vm: (dict(live.counts), live.tokens, live.good, len(live.samples)) for vm, live in t.live.items()},
        set(t.unsaved),
    )


def test_a_claim_is_checked_without_changing_anything() -> None:
    t, a, stranger = tracker(), Agent("a"), Agent("a", key=b"X" * 32)
    before = state(t)
    assert t.verify_claim("a", a.frame(T0)) is True
    assert t.verify_claim("a", stranger.frame(T0)) is False
    assert t.verify_claim("b", a.frame(T0)) is False  # a's frame is not b's
    assert t.verify_claim("nobody", a.frame(T0)) is False
    assert state(t) == before
    frame = a.frame(T0 + 1)
    assert t.ingest("a", frame, T0 + 1).ok
    assert t.verify_claim("a", frame) is False  # not fresh any more: a replay cannot claim


def test_a_refused_frame_changes_nothing_but_its_own_count() -> None:
    t, a = tracker(), Agent("a")
    assert t.ingest("a", a.frame(T0), T0).ok
    t.take_unsaved()
    deep = b"{" * 100_000
    refused = [
        Agent("a", key=b"X" * 32).frame(T0 + 1),
        wire.encode(KEYS["a"], wire.message("a", 1, "beat", {}, T0))[4:],  # replayed
        wire.encode(KEYS["a"], wire.message("a", 2**63, "beat", {}, T0))[4:],
        Agent("b").frame(T0 + 1),
        b"\x01" + b"m" * 32 + deep,
    ]
    for frame in refused:
        before = state(t)
        result = t.ingest("a", frame, T0 + 1)
        assert not result.ok
        recs, lives, unsaved = state(t)  # type: ignore[misc]
        b_recs, b_lives, b_unsaved = before  # type: ignore[misc]
        assert recs == b_recs and unsaved == b_unsaved
        assert lives["b"] == b_lives["b"]
        assert lives["a"][0][result.reason] == b_lives["a"][0].get(result.reason, 0) + 1


def test_accepted_seqs_are_handed_out_once_for_saving() -> None:
    t, a, b = tracker(), Agent("a"), Agent("b")
    assert t.ingest("a", a.frame(T0), T0).ok
    assert t.ingest("a", a.frame(T0 + 1), T0 + 1).ok
    assert t.ingest("b", b.frame(T0), T0).ok
    assert t.take_unsaved() == {"a": a.seq, "b": b.seq}
    assert t.take_unsaved() == {}
