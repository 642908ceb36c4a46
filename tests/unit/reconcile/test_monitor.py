"""The monitor interface (reconcile/monitor.py): `Ticking` runs a `Ticker` as a supervised loop."""

from __future__ import annotations

import threading
import time

import pytest

from hyperfence.reconcile.monitor import Monitor, Primed, Ticking
from hyperfence.reconcile.supervisor import StopSignal


class Ticks:
    name = "ticks"

    def __init__(self, interval: float, *, fail_at: int | None = None, stop_at: int | None = None) -> None:
        self.interval = interval
        self.fail_at, self.stop_at = fail_at, stop_at
        self.at: list[float] = []
        self.stop: threading.Event | None = None

    def tick(self) -> None:
        self.at.append(time.monotonic())
        if len(self.at) == self.fail_at:
            raise ValueError(f"tick {self.fail_at} failed")
        if len(self.at) == self.stop_at and self.stop is not None:
            self.stop.set()


def test_it_ticks_at_once_then_every_interval_until_the_stop() -> None:
    ticker = Ticks(0.05, stop_at=4)
    stop = threading.Event()
    ticker.stop = stop
    t0 = time.monotonic()
    Ticking(ticker).run(stop)  # returns once the stop is set (by the fourth tick)
    assert len(ticker.at) == 4
    assert ticker.at[0] - t0 < 0.04  # the first tick does not wait an interval
    gaps = [b - a for a, b in zip(ticker.at, ticker.at[1:], strict=False)]
    assert all(0.05 <= g < 1.0 for g in gaps), gaps


@pytest.mark.parametrize("signal", [StopSignal, threading.Event])
def test_a_stop_ends_the_wait_between_ticks_at_once(signal: type[threading.Event]) -> None:
    ticker = Ticks(30.0)
    stop = signal()
    t = threading.Thread(target=Ticking(ticker).run, args=(stop,))
    t.start()
    while not ticker.at:
        time.sleep(0.005)
    t0 = time.monotonic()
    stop.set()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0  # not the 30 s interval
    assert len(ticker.at) == 1


def test_a_tick_that_raises_ends_the_run_with_its_error_for_the_supervisor() -> None:
    ticker = Ticks(0.001, fail_at=3)
    with pytest.raises(ValueError, match="tick 3 failed"):
        Ticking(ticker).run(threading.Event())
    assert len(ticker.at) == 3


def test_a_ticking_monitor_is_a_monitor_named_as_its_ticker_and_is_not_primed() -> None:
    monitor: Monitor = Ticking(Ticks(1.0))  # (mypy checks the Protocol here)
    assert monitor.name == "ticks"
    assert not isinstance(monitor, Primed)

    class WithPrime:
        name = "primed"

        def prime(self) -> None: ...

        def run(self, stop: threading.Event) -> None: ...

    assert isinstance(WithPrime(), Primed)
