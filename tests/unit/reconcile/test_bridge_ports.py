"""Network devices on the managed bridges as an input of the engine: a new policy version that would cut one
off is refused (one-shot engines) or applied with it as a provisional uplink (the daemon's), one that joins
later is reported, and the watch that notices (no kernel: the port reader, the firewall and the link watch
are fakes)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.errors import ConflictError, KernelError
from hyperfence.model.ports import BridgePort
from hyperfence.reconcile.bridge_ports import BridgePortWatcher
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.firewall import ConvergeResult
from hyperfence.ruleset.closed import uplink_ports
from hyperfence.ruleset.ir import Ruleset
from hyperfence.ruleset.readback import Actual
from tests.unit.policy.test_parse import BASE, doc
from tests.unit.reconcile.test_host_addresses import FakeWatch

ENO1 = BridgePort("br0", "eno1", "", "pci 0000:00:1f.6")
VP1 = BridgePort("br0", "vp1", "veth")


class FakePorts:
    def __init__(self) -> None:
        self.ports: list[BridgePort] = [VP1]
        self.broken = False
        self.reads = 0

    def __call__(
        self,
        netns: str | None,
        bridges: Iterable[str],
        *,
        known: Collection[str] = (),
        list_known: bool = False,
    ) -> tuple[BridgePort, ...]:
        self.reads += 1
        if self.broken:
            raise KernelError("bridge ports: boom")
        return tuple(
            (BridgePort(p.bridge, p.name) if p.name in known else p)
            for p in self.ports
            if p.bridge in set(bridges) and (list_known or p.name not in known)
        )


class FakeFirewall:
    """Holds `actual` (what the kernel has: nothing at first, a fresh boot) and records converges."""

    def __init__(self) -> None:
        self.actual: Actual | None = None
        self.applied: list[Ruleset] = []

    def read(self) -> Actual:
        return Actual(Ruleset((), (), (), ()), {})

    def converge(self, ruleset: Ruleset, *, full: bool) -> ConvergeResult:
        self.applied.append(ruleset)
        self.actual = Actual(ruleset, {})
        return ConvergeResult(changed=True)


def policy(*, uplinks: tuple[str, ...] = (), rules: int = 0) -> dict[str, Any]:
    net = {**BASE["networks"][0], "uplinks": list(uplinks)}
    return doc(networks=[net], rules=[{"from": "vm:vm1", "to": "vm:vm2"}] * rules)


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()


@pytest.fixture
def firewall(monkeypatch: pytest.MonkeyPatch) -> FakeFirewall:
    fw = FakeFirewall()
    monkeypatch.setattr(Engine, "firewall", fw)
    return fw


@pytest.fixture
def engine(tmp_path: Path, ports: FakePorts, firewall: FakeFirewall) -> Iterator[Engine]:
    e = Engine(netns=None, state_dir=str(tmp_path), read_addresses=lambda _: (), read_ports=ports)
    yield e
    e.close()


def events(engine: Engine, kind: str) -> list[str]:
    return [e["port"] for e in engine.store.events(kind=kind)]


def test_a_new_version_that_would_cut_a_device_off_is_refused_and_changes_nothing(
    engine: Engine, ports: FakePorts, firewall: FakeFirewall
) -> None:
    ports.ports.append(ENO1)
    engine.store_policy(policy(), source="t")
    with pytest.raises(ConflictError) as e:
        engine.converge(full=True)  # the kernel has no hyperfence table: eno1 passes today
    assert 'networks[0].uplinks: add "eno1" (bridge br0, port eno1: a physical NIC' in str(e.value)
    assert firewall.applied == [] and engine.applied is None
    assert engine.refused_key == "gen:1" and engine.refused == str(e.value)
    engine.store_policy(policy(uplinks=("eno1",)), source="t")  # declared: applied, the refusal is over
    engine.converge()
    assert len(firewall.applied) == 1 and engine.refused_key is None and engine.refused is None
    assert engine.undeclared == () and events(engine, "undeclared-device") == []


def test_a_device_already_cut_off_stays_so_and_is_reported_once(
    engine: Engine, ports: FakePorts, firewall: FakeFirewall, caplog: pytest.LogCaptureFixture
) -> None:
    engine.store_policy(policy(), source="t")
    engine.converge(full=True)
    assert events(engine, "undeclared-device") == []
    ports.ports.append(ENO1)  # joins the bridge: the kernel's ruleset gives it nothing
    with caplog.at_level(logging.WARNING, logger="hyperfence.engine"):
        assert engine.refresh_devices()
    assert events(engine, "undeclared-device") == ["eno1"]
    assert (
        "network device eno1 on bridge br0 (a physical NIC (pci 0000:00:1f.6)) is not declared" in caplog.text
    )
    assert not engine.refresh_devices()  # the same: no second event
    engine.converge(full=True)  # the resync of the same version goes on (fail closed), reporting nothing new
    engine.store_policy(policy(rules=1), source="t")  # a new version: eno1 is already cut off, not refused
    engine.converge()
    assert len(firewall.applied) == 3 and events(engine, "undeclared-device") == ["eno1"]
    assert [d.port for d in engine.undeclared] == ["eno1"]
    engine.store_policy(policy(uplinks=("eno1",)), source="t")
    engine.converge()
    assert engine.undeclared == () and events(engine, "undeclared-device-gone") == ["eno1"]


def test_a_refused_version_is_refused_when_the_kernel_has_the_device_as_an_uplink(
    engine: Engine, ports: FakePorts, firewall: FakeFirewall
) -> None:
    """The policy in the kernel declares eno1; a new version forgets it: that would cut it off."""
    ports.ports.append(ENO1)
    engine.store_policy(policy(uplinks=("eno1",)), source="t")
    engine.converge()
    engine.store_policy(policy(), source="t")
    with pytest.raises(ConflictError):
        engine.converge()
    assert len(firewall.applied) == 1


def test_ports_that_cannot_be_read_stop_a_new_version_but_not_a_resync(
    engine: Engine, ports: FakePorts, firewall: FakeFirewall
) -> None:
    ports.broken = True
    engine.store_policy(policy(), source="t")
    with pytest.raises(KernelError):
        engine.converge()
    assert firewall.applied == []
    ports.broken = False
    engine.converge()
    ports.broken = True
    engine.converge(full=True)  # drift repair must not wait for the port read
    assert len(firewall.applied) == 2


def test_the_link_watch_reads_on_every_event_and_asks_for_a_converge_only_while_refused(
    engine: Engine, ports: FakePorts
) -> None:
    asked: list[str] = []
    engine.store_policy(policy(), source="t")
    engine.converge()
    reads = ports.reads
    stop = threading.Event()
    BridgePortWatcher(engine, on_change=asked.append, open_watch=lambda: FakeWatch(2, stop)).run(stop)
    assert ports.reads == reads + 3 and asked == []  # opening reads, then one read per event
    engine.refused_key = "gen:2"  # as `converge` leaves it when it refused a version
    stop.clear()
    BridgePortWatcher(engine, on_change=asked.append, open_watch=lambda: FakeWatch(1, stop)).run(stop)
    assert len(asked) == 2


def test_no_policy_applied_means_nothing_to_report(engine: Engine, ports: FakePorts) -> None:
    ports.ports.append(ENO1)
    assert not engine.refresh_devices() and ports.reads == 0


@pytest.fixture
def daemon_engine(tmp_path: Path, ports: FakePorts, firewall: FakeFirewall) -> Iterator[Engine]:
    e = Engine(
        netns=None,
        state_dir=str(tmp_path),
        read_addresses=lambda _: (),
        read_ports=ports,
        provisional_uplinks=True,
    )
    yield e
    e.close()


def test_the_daemon_passes_a_device_the_policy_would_cut_off_as_a_provisional_uplink(
    daemon_engine: Engine, ports: FakePorts, firewall: FakeFirewall, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh boot (no hyperfence table: eno1 passes) and a policy that forgets eno1: the VMs get their
    policy and eno1 keeps passing, reported once; declared, it is an uplink like any other."""
    engine = daemon_engine
    ports.ports.append(ENO1)
    engine.store_policy(policy(), source="t")
    with caplog.at_level(logging.WARNING, logger="hyperfence.engine"):
        engine.converge(full=True)
    assert len(firewall.applied) == 1 and uplink_ports(firewall.applied[-1]) == ["eno1"]
    assert [d.port for d in engine.provisional] == ["eno1"] and engine.undeclared == ()
    assert engine.refused is None and events(engine, "provisional-uplink") == ["eno1"]
    assert "network device eno1 on bridge br0" in caplog.text and "provisional uplink" in caplog.text
    assert events(engine, "undeclared-device") == []
    engine.converge(full=True)  # the resync keeps it, reporting nothing new
    engine.store_policy(policy(rules=1), source="t")  # and so does a new version that still forgets it
    engine.converge()
    assert uplink_ports(firewall.applied[-1]) == ["eno1"] and events(engine, "provisional-uplink") == ["eno1"]
    assert engine.applied is not None and engine.applied.policy.networks[0].uplinks == ()  # not the policy's
    engine.store_policy(policy(uplinks=("eno1",)), source="t")
    engine.converge()
    assert engine.provisional == () and events(engine, "provisional-uplink-gone") == ["eno1"]
    assert uplink_ports(firewall.applied[-1]) == ["eno1"]


def test_a_provisional_uplink_that_leaves_its_bridge_is_taken_out_at_the_next_converge(
    daemon_engine: Engine, ports: FakePorts, firewall: FakeFirewall
) -> None:
    engine = daemon_engine
    ports.ports.append(ENO1)
    engine.store_policy(policy(), source="t")
    engine.converge()
    asked: list[str] = []
    stop = threading.Event()
    BridgePortWatcher(engine, on_change=asked.append, open_watch=lambda: FakeWatch(1, stop)).run(stop)
    assert asked == [] and not engine.provisional_stale  # still on the bridge: nothing to do
    ports.ports.remove(ENO1)
    stop.clear()
    BridgePortWatcher(engine, on_change=asked.append, open_watch=lambda: FakeWatch(1, stop)).run(stop)
    assert asked and engine.provisional_stale
    engine.converge(full=True)
    assert uplink_ports(firewall.applied[-1]) == [] and engine.provisional == ()
    assert events(engine, "provisional-uplink-gone") == ["eno1"] and not engine.provisional_stale
    ports.ports.append(ENO1)  # back on the bridge after the policy was applied: it gets nothing (fail closed)
    assert engine.refresh_devices() and events(engine, "undeclared-device") == ["eno1"]
    engine.converge(full=True)
    assert uplink_ports(firewall.applied[-1]) == [] and engine.provisional == ()
