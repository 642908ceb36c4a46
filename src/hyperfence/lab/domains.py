"""The lab's VMs as libvirt domains: ``hf-<lab>-vm<N>`` on the lab bridge, with an agent channel.

Each domain (`domain_xml`, pure) is a TCG guest (``<domain type='qemu'>``: no usable KVM here) that boots a
kernel + initrd given by the caller (the lab's guest image) or, without them, sits in firmware (enough to
start, pause, resume, destroy it and see its tap). It has:

* one virtio NIC, ``<interface type='bridge'>`` on the lab's ``br0``, tap = the plan's port for that VM
  (``vp<N>``), MAC = the plan's MAC, so the firewall sees the same port names as with namespace VMs;
* the agent channel: virtio-serial port `AGENT_CHANNEL` whose host end is a unix socket QEMU listens on
  (``<lab run dir>/qemu/vm<N>.agent.sock``; in the daemon's channel specs ``{"type": "virtio", "path": …}``);
* the lab shell: virtio-serial port ``org.hyperfence.lab.shell`` on ``<lab run dir>/qemu/vm<N>.shell.sock``,
  through which `hyperfence.lab.guest_shell.run_in_guest` runs commands in the guest (tests, demo);
* the serial console written to ``<lab run dir>/qemu/vm<N>.console.log``;
* kernel command line ``console=ttyS0 panic=-1 quiet hf.ip=<ip>/<prefix> hf.gw=<gateway>``;
* the agent's JSON config (its key included) as the firmware-config file ``opt/org.hyperfence/agent``, from
  ``<lab run dir>/qemu/vm<N>.agent.json`` (0600, owned by QEMU's user, written by `write_agent_config`): QEMU's command line names
  the path only, so ``ps`` does not show the key, and in the guest only root can read it;
* labels ``lab=<lab>`` and ``vm=vm<N>`` in hyperfence metadata: `undefine_lab_domains` removes only domains
  that carry both *and* have the lab's name pattern, so nothing it did not create is touched.

`on_poweroff`/`on_reboot`/`on_crash` are ``destroy``: a guest that panics (``panic=-1``) stops instead of
looping.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.adapters.qemu_files import QemuUser, write_for_qemu
from hyperfence.codec.libvirt_xml import AGENT_CHANNEL, AGENT_FW_CFG, QEMU_USER, DomainInfo, labels_xml
from hyperfence.errors import HyperfenceError, InvalidInputError, NotFoundError, Problem
from hyperfence.lab import guest_init, records
from hyperfence.lab.plan import LabPlan

EMULATOR = "/usr/bin/qemu-system-x86_64"
MEMORY_MIB = 256


@dataclass(frozen=True)
class DomainSpec:
    """Everything `domain_xml` needs for one VM."""

    name: str
    mac: str
    bridge: str
    tap: str
    channel_path: str
    console_path: str
    shell_path: str | None = None  # the lab shell's socket (None: no lab shell)
    agent_config_path: str | None = None  # the agent config handed over by fw_cfg (None: none)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    memory_mib: int = MEMORY_MIB
    vcpus: int = 1
    uuid: str | None = None  # None: libvirt picks one (and keeps it when the same name is redefined)
    ips: tuple[str, ...] = ()  # written into the hyperfence metadata (what the inventory reports)


def domain_name(plan: LabPlan, vm: str) -> str:
    """``hf-<lab>-vm<N>``: the libvirt name of lab VM `vm` (`NotFoundError` if the plan has none)."""
    return f"hf-{plan.name}-{plan.vm(vm).name}"


def qemu_dir(plan: LabPlan) -> Path:
    """Where the lab's agent sockets and console logs are (``<lab run dir>/qemu``)."""
    return records.state_dir(plan.name) / "qemu"


def lab_file(plan: LabPlan, vm: str, kind: str) -> Path:
    """``<lab run dir>/qemu/vm<N>.<kind>``: lab VM `vm`'s sockets, console log and agent config."""
    return qemu_dir(plan) / f"{plan.vm(vm).name}.{kind}"


def shell_socket(plan: LabPlan, vm: str) -> Path:
    """The host end of lab VM `vm`'s lab shell (`hyperfence.lab.guest_shell.run_in_guest`)."""
    return lab_file(plan, vm, "shell.sock")


def agent_config_file(plan: LabPlan, vm: str) -> Path:
    """Where the lab keeps lab VM `vm`'s agent config for QEMU to hand over (fw_cfg)."""
    return lab_file(plan, vm, "agent.json")


def lab_domain_spec(
    plan: LabPlan,
    vm: str,
    *,
    kernel: str | None = None,
    initrd: str | None = None,
    memory_mib: int = MEMORY_MIB,
    labels: Mapping[str, str] | None = None,
) -> DomainSpec:
    """The domain of lab VM `vm` ("vm1"...): plan's port, MAC and address; kernel + initrd if given, then also
    the lab shell and the agent config file (`agent_config_file`; the guest starts no agent while it is
    missing or empty)."""
    lab_vm = plan.vm(vm)
    if (kernel is None) != (initrd is None):
        raise InvalidInputError("lab domain", [Problem("kernel/initrd", "give both or neither")])
    cmdline = ""
    if kernel is not None:
        cmdline = guest_init.kernel_cmdline(ip=f"{lab_vm.ip}/{plan.subnet.prefixlen}", gw=str(plan.gateway))
    return DomainSpec(
        name=domain_name(plan, vm),
        mac=lab_vm.mac,
        bridge=plan.bridge,
        tap=lab_vm.port,
        channel_path=str(lab_file(plan, vm, "agent.sock")),
        console_path=str(lab_file(plan, vm, "console.log")),
        shell_path=str(shell_socket(plan, vm)) if kernel is not None else None,
        agent_config_path=str(agent_config_file(plan, vm)) if kernel is not None else None,
        labels={**(labels or {}), "lab": plan.name, "vm": lab_vm.name},
        ips=(str(lab_vm.ip),),
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        memory_mib=memory_mib,
        vcpus=1,
    )


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _unsafe_names(*fields: tuple[str, str]) -> list[Problem]:
    """A problem for each (field, value) with characters that have no place in a libvirt name or path."""
    return [
        Problem(field, f"{value!r} has characters outside [A-Za-z0-9_.:-]")
        for field, value in fields
        if not _SAFE_NAME.fullmatch(value)
    ]


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML of `spec`. Pure; `InvalidInputError` listing every bad field."""
    problems = _unsafe_names(
        ("name", spec.name), ("tap", spec.tap), ("bridge", spec.bridge), ("mac", spec.mac)
    )
    problems += [
        Problem(field, f"{value!r} is not an absolute path")
        for field, value in (
            ("channel_path", spec.channel_path),
            ("console_path", spec.console_path),
            ("shell_path", spec.shell_path),
            ("agent_config_path", spec.agent_config_path),
            ("kernel", spec.kernel),
            ("initrd", spec.initrd),
        )
        if value is not None and not value.startswith("/")
    ]
    if spec.uuid is not None and not _UUID.fullmatch(spec.uuid):
        problems.append(Problem("uuid", f"{spec.uuid!r} is not a UUID"))
    if not 16 <= spec.memory_mib <= 65536:
        problems.append(Problem("memory_mib", f"{spec.memory_mib} is out of range (16..65536)"))
    if problems:
        raise InvalidInputError(f"domain {spec.name!r}", problems)

    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    if spec.uuid is not None:
        ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    metadata = ET.SubElement(dom, "metadata")
    metadata.append(ET.fromstring(labels_xml(spec.labels, ips=spec.ips)))  # noqa: S314 - our own text
    if spec.agent_config_path is not None:
        sysinfo = ET.SubElement(dom, "sysinfo", type="fwcfg")
        ET.SubElement(sysinfo, "entry", name=AGENT_FW_CFG, file=spec.agent_config_path)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel is not None:
        ET.SubElement(os_el, "kernel").text = spec.kernel
        ET.SubElement(os_el, "initrd").text = spec.initrd
        ET.SubElement(os_el, "cmdline").text = spec.cmdline
    # ACPI: without it libvirt runs QEMU with -no-acpi, and the guest kernel finds no fw_cfg device
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = EMULATOR
    devices.append(_interface(bridge=spec.bridge, tap=spec.tap, mac=spec.mac))
    ports = [(spec.channel_path, AGENT_CHANNEL)]
    if spec.shell_path is not None:
        ports.append((spec.shell_path, guest_init.SHELL_PORT_NAME))
    for path, port_name in ports:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=path)
        ET.SubElement(channel, "target", type="virtio", name=port_name)
    for tag, target in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        el = ET.SubElement(devices, tag, type="file")
        ET.SubElement(el, "source", path=spec.console_path)
        ET.SubElement(el, "target", target)
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def interface_xml(*, bridge: str, tap: str, mac: str) -> str:
    """A virtio ``<interface type='bridge'>`` on `bridge` with tap `tap` and `mac`: for a domain, or to hot-plug
    (`LibvirtInventory.attach_device`). Pure; `InvalidInputError` for names outside [A-Za-z0-9_.:-]."""
    problems = _unsafe_names(("bridge", bridge), ("tap", tap), ("mac", mac))
    if problems:
        raise InvalidInputError("interface", problems)
    return ET.tostring(_interface(bridge=bridge, tap=tap, mac=mac), encoding="unicode")


def _interface(*, bridge: str, tap: str, mac: str) -> ET.Element:
    iface = ET.Element("interface", type="bridge")
    ET.SubElement(iface, "source", bridge=bridge)
    ET.SubElement(iface, "target", dev=tap)
    ET.SubElement(iface, "mac", address=mac)
    ET.SubElement(iface, "model", type="virtio")
    ET.SubElement(iface, "rom", enabled="no")
    return iface


# -------------------------------------------------------------------------------------------------- I/O


def prepare_qemu_dir(plan: LabPlan) -> Path:
    """Create the lab's socket/console directory, writable by QEMU's default user if it exists."""
    qdir = qemu_dir(plan)
    qdir.mkdir(parents=True, exist_ok=True)
    qdir.chmod(0o750)  # whatever the umask, or an earlier run, made it: the agent configs (keys) are in it
    try:
        qemu = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return qdir
    os.chown(qdir, qemu.pw_uid, qemu.pw_gid)
    return qdir


def write_agent_config(path: str | Path, config: str, qemu: QemuUser) -> None:
    """Write an agent's JSON config where its domain's fw_cfg entry points, for QEMU running as `qemu` (from
    libvirt: `LibvirtInventory.qemu_label`) to read: owned by that user, 0600 whatever the umask, replaced
    atomically (never through a link: the directory is QEMU's user's). `InvalidInputError` when a directory
    on the way would stop that user (`adapters/qemu_files.py`)."""
    write_for_qemu(Path(path), config, qemu)


def define_lab_domain(inventory: LibvirtInventory, spec: DomainSpec, *, start: bool = True) -> DomainInfo:
    """Define (or redefine) the domain of `spec` and start it unless it runs; its `DomainInfo` after."""
    info = inventory.define(domain_xml(spec))
    if start:
        inventory.start(info.uuid)
        info = inventory.domain(info.uuid)
    return info


def lab_domains(inventory: LibvirtInventory, plan: LabPlan) -> list[DomainInfo]:
    """The domains this lab created: name ``hf-<lab>-vm<N>`` *and* labels ``lab=<lab>``, ``vm=vm<N>``."""
    found = []
    for info in inventory.domains():
        vm = info.labels.get("vm", "")
        if info.labels.get("lab") == plan.name and info.name == f"hf-{plan.name}-{vm}":
            found.append(info)
    return found


def undefine_lab_domains(inventory: LibvirtInventory, plan: LabPlan) -> list[str]:
    """Destroy and undefine every domain of this lab (see `lab_domains`); their names.

    Every domain is tried even if one fails; then the first error is raised.
    """
    done: list[str] = []
    errors: list[HyperfenceError] = []
    for info in lab_domains(inventory, plan):
        try:
            inventory.destroy(info.uuid)
            inventory.undefine(info.uuid)
            done.append(info.name)
        except NotFoundError:
            continue
        except HyperfenceError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    return done
