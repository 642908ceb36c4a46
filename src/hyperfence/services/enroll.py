"""Enrol a VM's agent: a new key in the store and the agent's config file (`vm enroll`; next, the REST API).

A VM of the policy gets a unix-socket, virtio or TLS channel; a libvirt domain (`hypervisor` given) gets its
identity and channel socket from libvirt, and with `fw_cfg` the config is handed to the guest as QEMU
firmware config (written readable by QEMU's user only: adapters/qemu_files.py) instead of being copied in.
A running daemon is asked to reload the enrolments (`ask`); without one it reads them when it starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hyperfence.adapters.qemu_files import QemuUser, check_reachable, qemu_user, write_for_qemu
from hyperfence.codec.libvirt_xml import AGENT_FW_CFG, DomainInfo
from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError, Problem
from hyperfence.health.heartbeat import heartbeat_for
from hyperfence.model.policy import Policy, Vm
from hyperfence.reconcile.agents import channels_dir, enroll
from hyperfence.reconcile.engine import Engine
from hyperfence.services.ports import Ask
from hyperfence.system.state_dir import DIR_MODE, make_dirs, write_private


class Hypervisor(Protocol):
    """What enrolment needs of libvirt (`adapters/libvirt.py:LibvirtInventory` at one URI)."""

    uri: str

    def domains(self) -> list[DomainInfo]: ...

    def qemu_label(self, uuid: str) -> tuple[str | None, str]: ...

    def set_fw_cfg_file(self, uuid: str, name: str, path: str) -> None: ...


@dataclass(frozen=True)
class Enrolment:
    vm: str  # a VM's name or id (a libvirt domain's name or UUID with a hypervisor)
    channel: str = "unix"  # unix, virtio or tls; a libvirt domain's is always virtio
    out: str | None = None  # where to write the config (default: see `config_path`)
    fw_cfg: bool = False  # with a hypervisor: hand the config over as QEMU firmware config


@dataclass(frozen=True)
class Enrolled:
    vm: Vm
    path: Path  # the agent's config (it holds the key)
    qemu: QemuUser | None  # with fw_cfg: whom QEMU runs as (the only one who may read `path`)
    reloaded: bool  # a running daemon took the new key at once


def fw_cfg_dir(state_dir: str) -> Path:
    """Where `--fw-cfg` puts agent configs by default: ``<state dir>-fw-cfg`` (``/var/lib/hyperfence-fw-cfg``),
    a directory of its own beside the state directory. Not inside it: the state directory is 0700 root, and
    QEMU, running as its own user, could not reach a file there. `write_for_qemu` creates it so that only
    QEMU's group may pass (adapters/qemu_files.py)."""
    state = Path(os.path.abspath(state_dir))
    return state.with_name(f"{state.name}-fw-cfg")


def enroll_vm(
    request: Enrolment, *, engine: Engine, hypervisor: Hypervisor | None = None, ask: Ask | None = None
) -> Enrolled:
    """Issue a new key for the VM's agent and write its config (see the module). Checked before anything
    changes: the VM exists, `fw_cfg` has a hypervisor, QEMU could read the config where it goes."""
    if request.fw_cfg and hypervisor is None:
        raise InvalidInputError(
            "--fw-cfg needs --libvirt URI", [Problem("--fw-cfg", "given without --libvirt")]
        )
    host_path = None
    if hypervisor is not None:
        target, policy, host_path = _domain_vm(engine, request.vm, hypervisor)
    else:
        target, policy = _policy_vm(engine, request.vm)
    path = _config_path(request, engine.state_dir, target)
    qemu = None
    if request.fw_cfg and hypervisor is not None:  # before anything changes: the domain could not start
        qemu = qemu_user(*hypervisor.qemu_label(target.id))
        check_reachable(path, qemu)
    hb = heartbeat_for(policy, target)
    kind = "virtio" if hypervisor is not None else request.channel
    _, config = enroll(engine, target, kind, interval=hb.interval, host_path=host_path)
    text = json.dumps(config, indent=1) + "\n"
    if qemu is not None and hypervisor is not None:
        write_for_qemu(path, text, qemu)
        hypervisor.set_fw_cfg_file(target.id, AGENT_FW_CFG, str(path.resolve()))
    else:
        make_dirs(path.parent, mode=DIR_MODE)
        write_private(path, text)
    reply = ask({"op": "agents-reload"}) if ask is not None else None
    if reply is not None and not reply.get("ok"):
        raise ConflictError(
            f"enrolled, but the daemon refused to reload the enrolments: {reply.get('error')}"
        )
    return Enrolled(target, path, qemu, reply is not None)


def _config_path(request: Enrolment, state_dir: str, vm: Vm) -> Path:
    if request.out:
        return Path(request.out)
    if request.fw_cfg:
        return fw_cfg_dir(state_dir) / f"{vm.name}.agent.json"
    return Path(channels_dir(state_dir)) / f"{vm.name}.json"


def _policy_vm(engine: Engine, name: str) -> tuple[Vm, Policy]:
    compiled = engine.compiled()
    if compiled is None:
        raise NotFoundError("no policy yet: run `hyperfence policy apply FILE` first")
    for vm in compiled.policy.vms:
        if name in (vm.name, vm.id):
            return vm, compiled.policy
    names = ", ".join(sorted(v.name for v in compiled.policy.vms)[:10])
    raise NotFoundError(f"VM {name!r} is not in the policy (expected one of: {names})")


def _domain_vm(engine: Engine, name: str, hypervisor: Hypervisor) -> tuple[Vm, Policy, str]:
    """A libvirt domain (running or not) as the VM to enrol, its policy, and its agent channel's socket."""
    compiled = engine.compiled()
    if compiled is None:
        raise NotFoundError("no policy yet: run `hyperfence policy apply FILE` first")
    domain = next((d for d in hypervisor.domains() if name in (d.name, d.uuid)), None)
    if domain is None:
        raise NotFoundError(f"libvirt {hypervisor.uri} has no domain {name!r} (see `virsh list --all`)")
    if domain.agent_socket is None:
        raise InvalidInputError(
            f"domain {domain.name} has no agent channel: add a <channel type='unix'> with target virtio name "
            "'org.hyperfence.agent.0' (docs/libvirt.md)"
        )
    # Only its identity matters for enrolment (id, name, labels for the heartbeat policy); the inventory
    # gives the daemon the rest while the domain runs.
    vm = Vm(
        id=domain.uuid,
        name=domain.name,
        network=compiled.policy.networks[0].name,
        port="",
        mac="",
        ips=(),
        labels=tuple(sorted(domain.labels.items())),
    )
    return vm, compiled.policy, domain.agent_socket
