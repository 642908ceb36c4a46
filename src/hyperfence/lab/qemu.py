"""`hyperfence lab up --qemu`: the lab's VMs as real QEMU (TCG) guests under libvirt, on the lab bridge.

Each VM: the tiny guest (`lab image`), a libvirt domain `hf-<lab>-vmN` with the plan's tap, MAC and address,
a virtio-serial agent channel, and an agent enrolled for the domain's UUID whose config rides on the kernel
command line. The policy declares no VMs: the daemon takes them from libvirt (`daemon --libvirt`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.adapters.libvirt_xml import DomainInfo
from hyperfence.lab.domains import (
    define_lab_domain,
    lab_domain_spec,
    prepare_qemu_dir,
    undefine_lab_domains,
)
from hyperfence.lab.image import build_image
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


def up_qemu(plan: LabPlan, engine: Engine, *, interval: float = 1.0) -> list[DomainInfo]:
    """Define and start every VM of the plan as a guest (the lab's namespaces must exist, with 0 VMs)."""
    image = build_image()
    ensure_libvirtd(plan, qemu_as_root=True)
    prepare_qemu_dir(plan)
    inventory = LibvirtInventory(URI)
    try:
        started = []
        for lab_vm in plan.vms:
            spec = lab_domain_spec(
                plan, lab_vm.name, kernel=str(image.kernel), initrd=str(image.initrd), agent_config="{}"
            )
            info = define_lab_domain(inventory, spec, start=False)  # its UUID is the VM's id
            vm = Vm(
                id=info.uuid,
                name=info.name,
                network=plan.name,
                port=lab_vm.port,
                mac=lab_vm.mac,
                ips=(lab_vm.ip,),
            )
            _, config = enroll(engine, vm, "virtio", interval=interval, host_path=spec.channel_path)
            final = lab_domain_spec(
                plan,
                lab_vm.name,
                kernel=str(image.kernel),
                initrd=str(image.initrd),
                agent_config=json.dumps(config, separators=(",", ":")),
            )
            started.append(define_lab_domain(inventory, dataclasses.replace(final, uuid=info.uuid)))
        return started
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
