"""Only the VMs whose port is on this host's bridges get chains (`Engine(local_only=True)`, the daemon's and
the CLI's): the others stay addresses in the rules' sets; a port that joins or leaves a bridge is converged
by the link watch (no kernel: the port reader, the firewall and the link watch are fakes)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.model.ports import BridgePort
from hyperfence.policy.local import parse_chains
from hyperfence.reconcile.bridge_ports import BridgePortWatcher
from hyperfence.reconcile.engine import Engine
from hyperfence.ruleset.compile import vm_sid
from hyperfence.ruleset.ir import Ruleset
from tests.unit.policy.test_parse import BASE, doc
from tests.unit.reconcile.test_bridge_ports import VP1, FakeFirewall, FakePorts
from tests.unit.reconcile.test_host_addresses import FakeWatch

VP2 = BridgePort("br0", "vp2", "veth")
RULES = [
    {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]},
    {"id": "back", "from": "vm:vm2", "to": "vm:vm1", "services": ["tcp/22"]},
]


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()  # vp1 is on br0, vp2 is not


@pytest.fixture
def firewall(monkeypatch: pytest.MonkeyPatch) -> FakeFirewall:
    fw = FakeFirewall()
    monkeypatch.setattr(Engine, "firewall", fw)
    return fw


def make(tmp_path: Path, ports: FakePorts, *, local_only: bool = True) -> Engine:
    return Engine(
        netns=None,
        state_dir=str(tmp_path),
        read_addresses=lambda _: (),
        read_ports=ports,
        local_only=local_only,
        provisional_uplinks=True,
    )


@pytest.fixture
def engine(tmp_path: Path, ports: FakePorts, firewall: FakeFirewall) -> Iterator[Engine]:
    e = make(tmp_path, ports)
    yield e
    e.close()


def chained(ruleset: Ruleset) -> set[str]:
    """The VMs (by name; their ids are their names) that have chains in `ruleset`."""
    sids = {vm_sid(vm["name"]): vm["name"] for vm in BASE["vms"]}
    return {sids[c.name.split("_", 1)[0]] for c in ruleset.chains if c.name.split("_", 1)[0] in sids}


def addresses(ruleset: Ruleset) -> set[str]:
    """Every element of every set, as nft JSON."""
    return {e for s in ruleset.sets for e in s.elements}


def rule(document: dict[str, Any], port: int) -> dict[str, Any]:
    return {**document, "rules": [{**RULES[0], "services": [f"tcp/{port}"]}, RULES[1]]}


def test_only_the_vms_on_this_hosts_bridges_get_chains_and_their_peers_stay_addresses(engine: Engine) -> None:
    engine.store_policy(doc(rules=RULES), source="t")
    compiled = engine.compiled()
    assert compiled is not None
    assert chained(compiled.ruleset) == {"vm1"}
    assert '"10.77.0.12"' in addresses(compiled.ruleset)  # vm1's rules still name vm2's address
    assert [vp.vm.name for vp in compiled.resolved.vms] == ["vm1", "vm2"]  # `can`, `vm list`: every VM
    assert compiled.ports == {("br0", "vp1")}


def test_every_declared_vm_gets_chains_without_local_only_and_no_port_is_read(
    tmp_path: Path, ports: FakePorts, firewall: FakeFirewall
) -> None:
    e = make(tmp_path, ports, local_only=False)
    try:
        e.store_policy(doc(rules=RULES), source="t")
        compiled = e.compiled()
        assert compiled is not None and chained(compiled.ruleset) == {"vm1", "vm2"}
        assert ports.reads == 0 and compiled.ports is None
        e.converge()
        assert e.chained() == {"chains": "declared", "here": 2, "declared": 2}
    finally:
        e.close()


def test_a_vm_whose_port_joins_gets_its_chains_from_the_link_watch_and_loses_them_when_it_leaves(
    engine: Engine, ports: FakePorts, firewall: FakeFirewall
) -> None:
    engine.store_policy(doc(rules=RULES), source="t")
    assert engine.chained() is None
    engine.converge()
    assert chained(firewall.applied[-1]) == {"vm1"} and not engine.local_stale
    assert engine.chained() == {"chains": "local", "here": 1, "declared": 2}
    asked: list[str] = []

    def watch_once() -> None:
        stop = threading.Event()
        BridgePortWatcher(engine, on_change=asked.append, open_watch=lambda: FakeWatch(1, stop)).run(stop)

    ports.ports.append(VP2)  # vm2 starts here (or migrates in): its tap joins br0
    watch_once()
    assert chained(firewall.applied[-1]) == {"vm1", "vm2"} and not engine.local_stale
    assert engine.chained() == {"chains": "local", "here": 2, "declared": 2}
    applied = len(firewall.applied)
    watch_once()  # nothing changed: nothing applied
    assert len(firewall.applied) == applied
    ports.ports.remove(VP1)  # vm1 stops: its chains go
    watch_once()
    assert chained(firewall.applied[-1]) == {"vm2"} and asked == []  # (no full converge was asked)


def test_a_rules_only_change_reads_no_port_and_a_new_bridge_is_read(engine: Engine, ports: FakePorts) -> None:
    engine.store_policy(doc(rules=RULES), source="t")
    engine.converge(full=True)
    reads = ports.reads
    engine.store_policy(rule(doc(rules=RULES), 8080), source="t")
    compiled, _ = engine.converge()
    assert compiled is not None and ports.reads == reads and chained(compiled.ruleset) == {"vm1"}
    ports.ports.append(BridgePort("br1", "vp3", "veth"))
    net2 = {"name": "two", "bridge": "br1", "subnet": "10.88.0.0/24"}
    vm3 = {"name": "vm3", "network": "two", "port": "vp3", "mac": "02:88:00:00:00:0b", "ips": ["10.88.0.11"]}
    vms = [{**vm, "network": "lab"} for vm in BASE["vms"]]
    engine.store_policy(doc(networks=[*BASE["networks"], net2], vms=[*vms, vm3]), source="t")
    assert (compiled := engine.compiled()) is not None and ports.reads > reads
    assert {c.name.split("_", 1)[0] for c in compiled.ruleset.chains} >= {vm_sid("vm1"), vm_sid("vm3")}
    assert vm_sid("vm2") not in {c.name.split("_", 1)[0] for c in compiled.ruleset.chains}


def test_the_chains_setting_names_the_field_and_the_value() -> None:
    assert parse_chains(None) and parse_chains("local") and parse_chains(" Local ")
    assert not parse_chains("declared")
    with pytest.raises(InvalidInputError) as e:
        parse_chains("some", field="HYPERFENCE_CHAINS")
    assert (
        str(e.value) == "HYPERFENCE_CHAINS: 'some' is not a chains setting; expected one of local, declared"
    )
