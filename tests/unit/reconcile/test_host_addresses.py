"""The host's addresses as an input of the engine, and the watch that keeps them current (no kernel: the
reader and the event watch are fakes)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from hyperfence.errors import KernelError
from hyperfence.model.policy import AddressRange
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.firewall import ConvergeResult
from hyperfence.reconcile.host_addresses import HostAddressWatcher
from tests.unit.policy.test_parse import doc

UPLINK = AddressRange(A("10.78.0.1"), A("10.78.0.1"))
EXTRA = AddressRange(A("192.0.2.1"), A("192.0.2.1"))


class FakeKernel:
    def __init__(self) -> None:
        self.addresses: tuple[AddressRange, ...] = (UPLINK,)
        self.reads = 0
        self.broken = False

    def read(self, netns: str | None) -> tuple[AddressRange, ...]:
        self.reads += 1
        if self.broken:
            raise KernelError("cannot read the host's addresses in this namespace: boom")
        return self.addresses


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def engine(tmp_path: Path, kernel: FakeKernel) -> Iterator[Engine]:
    e = Engine(netns=None, state_dir=str(tmp_path), read_addresses=kernel.read)
    e.store_policy(
        doc(rules=[{"id": "o", "from": "vm:vm1", "to": "outside", "services": ["any"]}]), source="t"
    )
    yield e
    e.close()


def test_the_engine_compiles_with_the_hosts_addresses_and_again_when_they_change(
    engine: Engine, kernel: FakeKernel
) -> None:
    first = engine.compiled()
    assert first is not None and UPLINK in first.resolved.host and kernel.reads == 1
    assert engine.compiled() is first  # nothing changed: nothing read, nothing compiled
    kernel.addresses = (UPLINK, EXTRA)
    assert engine.refresh_host_addresses()
    second = engine.compiled()
    assert second is not None and second is not first and EXTRA in second.resolved.host
    (event,) = engine.store.events(kind="host-addresses")
    assert event["added"] == ["192.0.2.1"] and event["removed"] == []
    assert not engine.refresh_host_addresses()  # read again, the same: no change, no event
    assert len(engine.store.events(kind="host-addresses")) == 1


def test_addresses_that_cannot_be_read_are_an_error_before_the_first_read_only(
    engine: Engine, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.broken = True
    with pytest.raises(KernelError):
        engine.compiled()  # compiling without them would put the host's uplink in `outside`
    kernel.broken = False
    assert engine.compiled() is not None
    kernel.broken = True
    monkeypatch.setattr(Engine, "firewall", FakeFirewall())  # no kernel
    engine.converge(full=True)  # the resync keeps the last known addresses
    assert engine.host_addresses == (UPLINK,)


class FakeFirewall:
    def converge(self, ruleset: object, *, full: bool) -> ConvergeResult:
        return ConvergeResult(changed=False)


class FakeWatch:
    def __init__(self, events: int, stop: threading.Event) -> None:
        self.events, self.stop, self.closed = events, stop, False

    def wait(self, timeout: float, *, wake: int | None = None) -> bool:
        if self.events:
            self.events -= 1
            return True
        self.stop.set()
        return False

    def close(self) -> None:
        self.closed = True


def test_an_address_event_reads_again_and_converges_only_on_a_change(
    engine: Engine, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    converges: list[tuple[AddressRange, ...] | None] = []
    monkeypatch.setattr(engine, "converge", lambda **_: converges.append(engine.host_addresses))
    stop = threading.Event()
    watch = FakeWatch(2, stop)
    watcher = HostAddressWatcher(engine, open_watch=lambda: watch)
    watcher.run(stop)  # opening reads (first read: a change), then two events with nothing new
    assert converges == [(UPLINK,)] and kernel.reads == 3 and watch.closed
    kernel.addresses = (UPLINK, EXTRA)
    stop.clear()
    HostAddressWatcher(engine, open_watch=lambda: FakeWatch(1, stop)).run(stop)
    assert converges == [(UPLINK,), (UPLINK, EXTRA)]


def test_a_read_from_before_a_change_never_lands_after_a_read_from_after_it(
    engine: Engine, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch reads the old addresses and is slow to store them; meanwhile the address changes and a
    full converge reads the new ones. The new ones must win (reads are taken under the engine's lock)."""
    monkeypatch.setattr(Engine, "firewall", FakeFirewall())
    engine.compiled()
    first_read, go, second_read = threading.Event(), threading.Event(), threading.Event()
    real_read = kernel.read

    def read(netns: str | None) -> tuple[AddressRange, ...]:
        value = real_read(netns)
        if not first_read.is_set():
            first_read.set()
            go.wait(10)  # the watch, stalled after reading the old addresses
        else:
            second_read.set()
        return value

    monkeypatch.setattr(engine, "_read_addresses", read)
    watch = threading.Thread(target=engine.refresh_host_addresses)
    watch.start()
    assert first_read.wait(10)
    kernel.addresses = (UPLINK, EXTRA)
    resync = threading.Thread(target=lambda: engine.converge(full=True))
    resync.start()
    second_read.wait(0.5)  # the resync reads only once the watch's update is stored (with the lock)
    go.set()
    watch.join(10)
    resync.join(10)
    assert engine.host_addresses == (UPLINK, EXTRA)
