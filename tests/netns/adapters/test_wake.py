"""The kernel watches the daemon's loops wait on (nftables events, address events, NFLOG) end their wait as
soon as the daemon's stop signal is set, not when their timeout runs out: each waits with a 30 s timeout in
an empty throwaway namespace (`hf-wk<hex>`), where nothing else would wake it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from hyperfence.adapters.host_addresses import AddressWatch
from hyperfence.adapters.nflog import NflogReader
from hyperfence.adapters.nft_monitor import NftMonitor
from hyperfence.reconcile.supervisor import StopSignal
from hyperfence.ruleset.compile import TABLES

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]
WAIT = 30.0


@pytest.fixture
def netns() -> Iterator[str]:
    name = "hf-wk" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def woken_after(wait: Callable[[int], object]) -> tuple[float, object]:
    """Call `wait(wake_fd)` on a thread, set the stop signal 0.2 s later: (seconds from the set to the
    return, what the wait returned)."""
    stop = StopSignal()
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(wait(stop.fileno())), daemon=True)
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    stop.set()
    thread.join(timeout=WAIT + 5)
    took = time.monotonic() - t0
    stop.close()
    assert result, "the wait did not return"
    return took, result[0]


def test_the_nftables_event_watch_wakes(netns: str) -> None:
    with NftMonitor([(t.family, t.name) for t in TABLES], netns=netns) as monitor:
        took, batch = woken_after(lambda fd: monitor.read(WAIT, wake=fd))
    assert took < 5 and batch == type(batch)()  # nothing was committed


def test_the_address_watch_wakes(netns: str) -> None:
    watch = AddressWatch(netns)
    try:
        took, events = woken_after(lambda fd: watch.wait(WAIT, wake=fd))
    finally:
        watch.close()
    assert took < 5 and events is False


def test_the_nflog_reader_wakes(netns: str) -> None:
    with NflogReader(7, netns=netns) as reader:
        took, packets = woken_after(lambda fd: reader.read(WAIT, wake=fd))
    assert took < 5 and packets == []
