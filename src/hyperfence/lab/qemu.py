"""`hyperfence lab up --qemu`: the lab's VMs as real QEMU (TCG) guests under libvirt, on the lab bridge.

Each VM: the tiny guest (`lab image`), a libvirt domain `hf-<lab>-vmN` with the plan's tap, MAC and address,
a virtio-serial agent channel, an agent enrolled for the domain's UUID whose config QEMU hands over as a
firmware-config file, and the lab shell (`hyperfence.lab.guest_shell`). The policy declares no VMs: the daemon takes them from libvirt (`daemon --libvirt`).
"""

from __future__ import annotations

import json
from typing import Any

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.adapters.libvirt_xml import DomainInfo
from hyperfence.adapters.qemu_files import qemu_user
from hyperfence.lab.domains import (
    agent_config_file,
    define_lab_domain,
    lab_domain_spec,
    prepare_qemu_dir,
    undefine_lab_domains,
    write_agent_config,
)
from hyperfence.lab.image import GuestImage, build_image
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.policy import lab_policy
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
    """Lab VM `vm` as a guest: define the domain, enrol an agent for its UUID (virtio channel), write the
    agent's config where the domain's fw_cfg entry reads it, then start it (unless `start` is False)."""
    lab_vm = plan.vm(vm)
    spec = lab_domain_spec(plan, vm, kernel=str(image.kernel), initrd=str(image.initrd))
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


def up_qemu(plan: LabPlan, engine: Engine, *, interval: float = 1.0) -> list[DomainInfo]:
    """Define and start every VM of the plan as a guest (the lab's namespaces must exist, with 0 VMs)."""
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    inventory = LibvirtInventory(URI)
    try:
        return [
            define_lab_guest(inventory, plan, engine, lab_vm.name, image, interval=interval)
            for lab_vm in plan.vms
        ]
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
