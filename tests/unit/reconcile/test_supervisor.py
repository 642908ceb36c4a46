"""The daemon's loops under the supervisor (real threads, backoff shortened): a loop that fails is reported
and restarted with a growing backoff, the others keep running, and the status says which one is down."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from hyperfence.reconcile import supervisor as sup


@pytest.fixture
def stop(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    monkeypatch.setattr(sup, "BACKOFF_MIN", 0.02)
    monkeypatch.setattr(sup, "BACKOFF_MAX", 0.16)
    ev = threading.Event()
    yield ev
    ev.set()


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_a_failing_loop_is_restarted_with_backoff_reported_and_the_others_keep_working(
    stop: threading.Event,
) -> None:
    starts: list[float] = []
    reports: list[tuple[str, str, int]] = []
    ticks = [0]

    def broken(_: threading.Event) -> None:
        starts.append(time.monotonic())
        raise ValueError("bad input reached a loop")

    def healthy(ev: threading.Event) -> None:
        while not ev.wait(0.005):
            ticks[0] += 1

    s = sup.Supervisor(stop, on_failure=lambda *a: reports.append(a))
    s.start("healthy", healthy)
    s.start("broken", broken)
    wait_for(lambda: len(starts) >= 5)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.02 and gaps[2] >= 0.08 and gaps[3] >= 0.16  # doubling, up to the maximum
    assert reports[:2] == [
        ("broken", "ValueError: bad input reached a loop", 1),
        ("broken", "ValueError: bad input reached a loop", 2),
    ]
    status = s.status()
    assert status["broken"]["failures"] >= 4 and status["broken"]["last_error"].startswith("ValueError")
    assert status["healthy"] == {
        "state": "running",
        "failures": 0,
        "last_error": None,
        "last_failure": None,
        "restart_at": None,
    }
    ticked = ticks[0]
    wait_for(lambda: ticks[0] > ticked + 3)
    wait_for(lambda: s.down() == ["broken"])
    stop.set()
    s.join(2)
    assert {v["state"] for v in s.status().values()} == {"stopped"}


def test_a_loop_that_returns_while_the_daemon_runs_is_a_failure(stop: threading.Event) -> None:
    runs = [0]

    def quits(_: threading.Event) -> None:
        runs[0] += 1

    s = sup.Supervisor(stop)
    s.start("quits", quits)
    wait_for(lambda: runs[0] >= 2)
    assert s.status()["quits"]["last_error"] == "returned while the daemon runs"


def test_a_failing_report_does_not_stop_the_restarts(stop: threading.Event) -> None:
    runs = [0]

    def broken(_: threading.Event) -> None:
        runs[0] += 1
        raise RuntimeError("x")

    def report(*_: object) -> None:
        raise OSError("store gone")

    s = sup.Supervisor(stop, on_failure=report)
    s.start("broken", broken)
    wait_for(lambda: runs[0] >= 3)


def test_a_stop_signal_is_an_event_a_pipe_and_callbacks() -> None:
    """What a loop blocked on its sockets selects on (`wake_fd`), and what wakes a queue (`on_stop`)."""
    import select

    signal = sup.StopSignal()
    calls: list[str] = []
    try:
        sup.on_stop(signal, lambda: calls.append("a"))
        forget = sup.on_stop(signal, lambda: calls.append("forgotten"))
        forget()
        fd = sup.wake_fd(signal)
        assert fd is not None and select.select([fd], [], [], 0)[0] == []
        signal.set()
        signal.set()  # once set, setting again changes nothing
        assert signal.is_set() and signal.wait(0)
        assert select.select([fd], [], [], 0)[0] == [fd]  # readable, and stays so
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert calls == ["a"]
        sup.on_stop(signal, lambda: calls.append("late"))  # given after the set: runs at once
        assert calls == ["a", "late"]
    finally:
        signal.close()
    plain = threading.Event()  # a plain Event (tests): no descriptor, no callbacks, nothing breaks
    assert sup.wake_fd(plain) is None
    sup.on_stop(plain, lambda: calls.append("never"))()
    plain.set()
    assert calls == ["a", "late"]
