"""`hyperfence lab up --qemu`: the lab's VMs as real QEMU (TCG) guests under libvirt, on the lab bridge.

Each VM: the tiny guest (`lab image`), a libvirt domain `hf-<lab>-vmN` with the plan's tap, MAC and address,
a virtio-serial agent channel, an agent enrolled for the domain's UUID whose config QEMU hands over as a
firmware-config file, and the lab shell (`hyperfence.lab.guest_shell`). The policy declares no VMs: the daemon takes them from libvirt (`daemon --libvirt`).

`up_qemu` is idempotent, like `lab up`: a guest that runs with its agent enrolled is left alone (same
domain, same key, no reboot); a domain that exists but is shut off, or whose enrolment is gone, is redefined
with its own UUID (libvirt refuses a second domain of the same name), enrolled again and (re)started; a
missing one is made.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.adapters.qemu_files import qemu_user
from hyperfence.codec.libvirt_xml import DomainInfo
from hyperfence.errors import HyperfenceError
from hyperfence.lab.domains import (
    agent_config_file,
    define_lab_domain,
    domain_name,
    lab_domain_spec,
    lab_domains,
    prepare_qemu_dir,
    qemu_dir,
    undefine_lab_domains,
    write_agent_config,
)
from hyperfence.lab.image import GuestImage, build_image
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.policy import lab_policy
from hyperfence.lab.topology import read_ports
from hyperfence.model.policy import Vm
from hyperfence.reconcile.agents import enroll
from hyperfence.reconcile.engine import Engine

URI = "qemu:///system"


def qemu_policy(plan: LabPlan) -> dict[str, Any]:
    """The lab's starting policy for QEMU guests: its network, VMs from libvirt, no rules."""
    doc = lab_policy(plan)
    doc["vms"] = []
    doc["settings"] = {**doc.get("settings", {}), "inventory": "libvirt"}
    return doc


def define_lab_guest(
    inventory: LibvirtInventory,
    plan: LabPlan,
    engine: Engine,
    vm: str,
    image: GuestImage,
    *,
    interval: float = 1.0,
    start: bool = True,
) -> DomainInfo:
    """Lab VM `vm` as a guest: define the domain (again, with its own UUID, if it exists), enrol an agent
    for its UUID (virtio channel), write the agent's config where the domain's fw_cfg entry reads it, then
    start it (unless `start` is False). A domain that runs is stopped first: the config reaches the guest
    only at boot."""
    lab_vm = plan.vm(vm)
    spec = lab_domain_spec(plan, vm, kernel=str(image.kernel), initrd=str(image.initrd))
    existing = _lab_domain(inventory, plan, vm)
    if existing is not None:
        spec = dataclasses.replace(spec, uuid=existing.uuid)
        if existing.is_active:
            inventory.destroy(existing.uuid)
    info = define_lab_domain(inventory, spec, start=False)  # its UUID is the VM's id
    record = Vm(
        id=info.uuid,
        name=info.name,
        network=plan.name,
        port=lab_vm.port,
        mac=lab_vm.mac,
        ips=(lab_vm.ip,),
    )
    _, config = enroll(engine, record, "virtio", interval=interval, host_path=spec.channel_path)
    qemu = qemu_user(*inventory.qemu_label(info.uuid))  # whom this libvirtd runs QEMU as: it reads the file
    write_agent_config(agent_config_file(plan, vm), json.dumps(config, separators=(",", ":")), qemu)
    if start:
        inventory.start(info.uuid)
        info = inventory.domain(info.uuid)
    return info


@dataclass(frozen=True)
class GuestStatus:
    """A QEMU lab VM as `lab status` shows it. `state` is libvirt's (running, paused, shutoff, ...), or
    ``no domain`` when the lab has none for it, or ``unknown`` when no libvirtd answers."""

    vm: str
    domain: str
    state: str
    port_present: bool
    port_up: bool

    @property
    def is_active(self) -> bool:
        return self.state in ("running", "paused", "blocked", "shutting-down", "pmsuspended")


def is_qemu_lab(plan: LabPlan) -> bool:
    """Whether the lab was brought up with QEMU guests (`lab up --qemu` made its QEMU directory)."""
    return qemu_dir(plan).is_dir()


def guest_status(plan: LabPlan) -> list[GuestStatus]:
    """Every planned VM of a QEMU lab: its domain's state in libvirt and its tap in the host namespace."""
    states: dict[str, str] = {}
    known = running_libvirtd() is not None
    if known:
        inventory = LibvirtInventory(URI)
        try:
            states = {d.name: d.state for d in lab_domains(inventory, plan)}
        except HyperfenceError:  # libvirtd went away, or does not answer yet
            known = False
        finally:
            inventory.close()
    ports = read_ports(plan)
    out = []
    for vm in plan.vms:
        name = domain_name(plan, vm.name)
        port = ports.get(vm.port)
        out.append(
            GuestStatus(
                vm=vm.name,
                domain=name,
                state=states.get(name, "no domain") if known else "unknown",
                port_present=port is not None,
                port_up=port is not None and port[0],
            )
        )
    return out


def _lab_domain(inventory: LibvirtInventory, plan: LabPlan, vm: str) -> DomainInfo | None:
    """The domain this lab made for `vm`, if there is one."""
    name = domain_name(plan, vm)
    return next((d for d in lab_domains(inventory, plan) if d.name == name), None)


def is_guest_up(plan: LabPlan, engine: Engine, info: DomainInfo | None) -> bool:
    """Whether lab guest `info` needs nothing: it runs, and the agent it booted with is still the enrolled
    one (an enrolment in the store, and the config file QEMU handed over, which only a new enrolment
    replaces)."""
    if info is None or not info.is_active:
        return False
    vm = info.labels.get("vm", "")
    return info.uuid in engine.store.agents() and agent_config_file(plan, vm).exists()


def up_qemu(plan: LabPlan, engine: Engine, *, interval: float = 1.0) -> list[DomainInfo]:
    """Every VM of the plan as a running guest (see `ensure_guests`); their domains."""
    return [info for info, _ in ensure_guests(plan, engine, interval=interval)]


def ensure_guests(plan: LabPlan, engine: Engine, *, interval: float = 1.0) -> list[tuple[DomainInfo, bool]]:
    """Every VM of the plan as a running guest (the lab's namespaces must exist, with 0 VMs): those that run
    with their agent enrolled are kept, the others are (re)defined, enrolled and started (module doc).
    Per VM: its domain, and whether it was kept as it was."""
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    inventory = LibvirtInventory(URI)
    try:
        out = []
        for lab_vm in plan.vms:
            info = _lab_domain(inventory, plan, lab_vm.name)
            kept = info is not None and is_guest_up(plan, engine, info)
            if info is None or not kept:
                info = define_lab_guest(inventory, plan, engine, lab_vm.name, image, interval=interval)
            out.append((info, kept))
        return out
    finally:
        inventory.close()


def down_qemu(plan: LabPlan) -> list[str]:
    """Destroy and undefine the lab's domains and stop the libvirtd the lab started; their names."""
    if running_libvirtd() is None:
        return []
    inventory = LibvirtInventory(URI)
    try:
        names = undefine_lab_domains(inventory, plan)
    finally:
        inventory.close()
    stop_libvirtd(plan)
    return names
