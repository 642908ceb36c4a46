"""services/enroll.py: a VM's agent enrolled through the service (a real store, a stand-in hypervisor)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.codec.libvirt_xml import DomainInfo
from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError
from hyperfence.reconcile.engine import Engine
from hyperfence.services.enroll import Enrolment, enroll_vm
from tests.unit.policy.test_parse import doc

UUID = "6f1c1f9e-2a3b-4c5d-8e9f-0a1b2c3d4e5f"


class Libvirt:
    uri = "test:///fake"

    def __init__(self, *domains: DomainInfo) -> None:
        self._domains = list(domains)
        self.fw_cfg: list[tuple[str, str, str]] = []

    def domains(self) -> list[DomainInfo]:
        return self._domains

    def qemu_label(self, uuid: str) -> tuple[str | None, str]:
        return None, "test"

    def set_fw_cfg_file(self, uuid: str, name: str, path: str) -> None:
        self.fw_cfg.append((uuid, name, path))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = Engine(netns=None, state_dir=str(tmp_path / "state"), read_addresses=lambda _ns: ())
    e.store.put_policy(doc(), source="test")
    try:
        yield e
    finally:
        e.close()


def test_a_policy_vm_gets_a_key_a_private_config_and_the_daemon_reloads(engine: Engine) -> None:
    asked: list[dict[str, Any]] = []
    done = enroll_vm(Enrolment("vm1"), engine=engine, ask=lambda p: asked.append(p) or {"ok": True})
    assert done.reloaded and asked == [{"op": "agents-reload"}]
    config = json.loads(done.path.read_text())
    assert config["vm"] == done.vm.id and config["channel"]["type"] == "unix"
    assert done.path.stat().st_mode & 0o777 == 0o600
    assert engine.store.agents()[done.vm.id].key.hex() == config["key"]
    # no daemon: enrolled all the same, it reads the key when it starts
    assert not enroll_vm(Enrolment("vm1"), engine=engine, ask=lambda _p: None).reloaded


def test_refusals_before_anything_changes(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="VM 'ghost' is not in the policy"):
        enroll_vm(Enrolment("ghost"), engine=engine)
    with pytest.raises(InvalidInputError, match="--fw-cfg needs --libvirt"):
        enroll_vm(Enrolment("vm1", fw_cfg=True), engine=engine)
    mute = DomainInfo(uuid=UUID, name="web", state="running", interfaces=(), agent_socket=None)
    with pytest.raises(InvalidInputError, match="no agent channel"):
        enroll_vm(Enrolment("web"), engine=engine, hypervisor=Libvirt(mute))
    with pytest.raises(NotFoundError, match="has no domain 'db'"):
        enroll_vm(Enrolment("db"), engine=engine, hypervisor=Libvirt(mute))
    assert engine.store.agents() == {}
    with pytest.raises(ConflictError, match="refused to reload"):
        enroll_vm(Enrolment("vm1"), engine=engine, ask=lambda _p: {"ok": False, "error": "busy"})


def test_a_libvirt_domain_gets_a_virtio_channel_on_its_socket(engine: Engine, tmp_path: Path) -> None:
    sock = str(tmp_path / "web.agent.sock")
    web = DomainInfo(
        uuid=UUID, name="web", state="shutoff", interfaces=(), agent_socket=sock, labels={"role": "web"}
    )
    done = enroll_vm(Enrolment("web", channel="unix"), engine=engine, hypervisor=Libvirt(web))
    config = json.loads(done.path.read_text())
    assert done.vm.id == UUID and config["channel"] == {"type": "virtio", "name": "org.hyperfence.agent.0"}
    assert engine.store.agents()[UUID].channel == {"type": "virtio", "path": sock}
