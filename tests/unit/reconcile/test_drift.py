"""The drift watch's decisions, with a fake event source (no kernel)."""

from __future__ import annotations

import logging
import threading

import pytest

from hyperfence.adapters.nft_monitor import Batch, Generation
from hyperfence.errors import KernelError
from hyperfence.reconcile.drift import DriftWatcher

OWN = 100


class FakeMonitor:
    """Hands out scripted batches. At the end of its script it fails (the watcher reopens) or, if it is the
    last one, stops the loop."""

    def __init__(self, script: list[Batch], stop: threading.Event, *, last: bool) -> None:
        self.script, self.stop, self.last = script, stop, last
        self.closed = False

    def read(self, timeout: float, *, wake: int | None = None) -> Batch:
        if self.script:
            return self.script.pop(0)
        if not self.last:
            raise KernelError("socket gone")
        self.stop.set()
        return Batch()

    def close(self) -> None:
        self.closed = True


def watch(
    scripts: list[list[Batch] | Exception], untouched: list[list[int]] | None = None
) -> tuple[list[str], list[FakeMonitor], DriftWatcher]:
    """Run the watcher over one script per (re)opened monitor (an exception: that opening fails); what it
    tells of commits that touched nothing of ours goes to `untouched`."""
    stop = threading.Event()
    causes: list[str] = []
    opened: list[FakeMonitor] = []

    def open_monitor() -> FakeMonitor:
        script = scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        opened.append(FakeMonitor(script, stop, last=not scripts))
        return opened[-1]

    w = DriftWatcher(
        netns="ns",
        tables=[("bridge", "hyperfence")],
        is_own=lambda pid: pid == OWN,
        repair=causes.append,
        untouched=untouched.append if untouched is not None else None,
        open_monitor=open_monitor,
        backoff=(0.0, 0.0),
    )
    w.run(stop)
    return causes, opened, w


def gen(pid: int, touched: int = 1, comm: str = "nft") -> Generation:
    return Generation(gen_id=5, pid=pid, comm=comm, touched=touched)


STARTED = "the nftables event watch (re)started: changes before it were not seen"


def test_a_foreign_commit_on_our_tables_asks_for_a_repair_and_names_the_committer() -> None:
    causes, _, _ = watch([[Batch((gen(4242),))]])
    assert causes == [STARTED, "nftables generation 5 by process 4242 (nft) changed hyperfence's tables"]


def test_own_commits_and_foreign_commits_elsewhere_ask_for_nothing() -> None:
    causes, _, _ = watch([[Batch((gen(OWN), gen(OWN, touched=9))), Batch((gen(4242, touched=0),))]])
    assert causes == [STARTED]


def test_a_burst_of_commits_in_one_read_is_one_request() -> None:
    causes, _, _ = watch([[Batch((gen(1), gen(OWN), gen(2), gen(3)))]])
    assert causes[1:] == ["nftables generation 5 by process 3 (nft) (and 2 more) changed hyperfence's tables"]


def test_lost_events_ask_for_a_repair() -> None:
    causes, _, _ = watch([[Batch(lost=True)]])
    assert causes[1:] == ["nftables events were lost (receive buffer overrun)"]


def test_a_failed_watch_is_logged_and_reopened_and_each_opening_asks_for_a_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="hyperfence.drift"):
        causes, opened, w = watch([[], KernelError("no netns"), [Batch((gen(7),))]])
    assert w.restarts == 1
    assert all(m.closed for m in opened) and len(opened) == 2
    assert causes == [
        STARTED,
        STARTED,
        "nftables generation 5 by process 7 (nft) changed hyperfence's tables",
    ]
    text = caplog.text
    assert "the nftables event watch failed (socket gone)" in text
    assert "cannot watch nftables events (no netns)" in text


def test_backoff_doubles_up_to_its_maximum() -> None:
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            if len(waits) == 5:
                self.set()
            return self.is_set()

    def open_monitor() -> FakeMonitor:
        raise KernelError("down")

    w = DriftWatcher(
        netns=None,
        tables=[],
        is_own=lambda pid: False,
        repair=lambda cause: None,
        open_monitor=open_monitor,
        backoff=(0.5, 2.0),
    )
    w.run(Stop())
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_commits_that_touched_nothing_of_ours_are_told_in_order_unless_events_were_lost() -> None:
    told: list[list[int]] = []
    quiet = [Generation(7, 4242, "libvirtd", 0), Generation(8, OWN, "hf", 3), Generation(9, 1, "nft", 0)]
    watch([[Batch(tuple(quiet)), Batch((Generation(10, 1, "nft", 0),), lost=True)]], told)
    assert told == [[7, 9]]  # our own commit (8) touched our tables; the batch with lost events tells nothing
