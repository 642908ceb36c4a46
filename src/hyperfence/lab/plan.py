"""The lab's plan: every name, MAC and address of a lab of "VMs" as network namespaces. Pure.

A lab called `<lab>` (``[a-z0-9]{1,8}``, default ``lab``) with ``N`` VMs (1..1000) looks like this::

    hf-<lab>-vm<i>  eth0 10.77.x.y/22 ──veth── vp<i> ┐
                                                    ├─ br0 10.77.0.1/22 ─ (routed, ip_forward=1) ─ up0 10.78.0.1/24
    hf-<lab>-host   ────────────────────────────────┘  + dnsmasq (DHCP)     masquerade 10.77.0.0/22 out of up0
                                                                                 │ veth
    hf-<lab>-out    eth0 10.78.0.2/24, route 10.77.0.0/22 via 10.78.0.1 ──────────┘

Addressing (deterministic, valid for up to 1000 VMs):

- VM subnet ``10.77.0.0/22``; the bridge ``br0`` is the gateway ``10.77.0.1``.
- VM ``i`` gets the address ``10.77.0.0 + 10 + i`` (vm1 = 10.77.0.11, vm245 = 10.77.0.255, vm246 = 10.77.1.0,
  vm1000 = 10.77.3.242). Offsets 2..10 stay free for the host side.
- Every MAC on the VM subnet mirrors its address: ``02:77:00:00:HH:LL`` where ``HHLL`` is the address's offset
  in the subnet as 16 bits. So ``br0`` (offset 1) is ``02:77:00:00:00:01`` and vm1 (offset 11) is
  ``02:77:00:00:00:0b``; a MAC never collides with another one of the same lab.
- Outside subnet ``10.78.0.0/24``: the host's uplink ``up0`` is ``10.78.0.1`` (MAC ``02:78:00:00:00:01``), the
  outside namespace's ``eth0`` is ``10.78.0.2`` (MAC ``02:78:00:00:00:02``).

Several labs can use the same addresses at once: each lives in its own namespaces.

This module also renders, as pure text, the two things the lab runs in the host namespace: the dnsmasq command
line (`dnsmasq_command`) and the NAT ruleset (`nat_ruleset`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import PurePath

from hyperfence.errors import InvalidInputError, NotFoundError, Problem

MAX_VMS = 1000
"""The most VMs a plan may declare (the /22 holds 1,021 hosts; offsets up to 10 are reserved)."""

NETNS_PREFIX = "hf-"
BRIDGE = "br0"
UPLINK = "up0"
VM_IFNAME = "eth0"
OUTSIDE_IFNAME = "eth0"
NAT_TABLE = "hflab_nat"
"""The nft table (family ``ip``, host namespace) the lab owns; nothing else writes it."""

SUBNET = IPv4Network("10.77.0.0/22")
GATEWAY_OFFSET = 1
VM_OFFSET = 10
OUTSIDE_SUBNET = IPv4Network("10.78.0.0/24")
DHCP_LEASE_TIME = "1h"

_LAB_NAME = re.compile(r"[a-z0-9]{1,8}")
_VM_NAME = re.compile(r"vm([1-9][0-9]{0,3})")
STATE_VERSION = 1


@dataclass(frozen=True)
class LabVm:
    """One VM of a lab: namespace `netns`, bridge port `port` (its "tap"), `ifname`/`mac`/`ip` inside it."""

    index: int
    name: str
    netns: str
    port: str
    ifname: str
    mac: str
    ip: IPv4Address


@dataclass(frozen=True)
class LabPlan:
    """Every name and address of one lab. Build it with `plan_lab`; `create_lab` refuses any other plan."""

    name: str
    host_netns: str
    outside_netns: str
    bridge: str
    bridge_mac: str
    subnet: IPv4Network
    gateway: IPv4Address
    uplink: str
    uplink_mac: str
    uplink_ip: IPv4Address
    outside_ifname: str
    outside_mac: str
    outside_subnet: IPv4Network
    outside_ip: IPv4Address
    nat_table: str
    vms: tuple[LabVm, ...]

    def vm(self, name: str) -> LabVm:
        """The VM called `name` ("vm1"...); `NotFoundError` if the plan has no such VM."""
        match = _VM_NAME.fullmatch(name)
        if match is not None:
            index = int(match.group(1))
            if index <= len(self.vms):
                return self.vms[index - 1]
        raise NotFoundError(f"lab {self.name!r}: no VM called {name!r} (expected vm1..vm{len(self.vms)})")

    @property
    def netns_names(self) -> tuple[str, ...]:
        """Every namespace the plan declares: host, outside, then each VM's in order."""
        return (self.host_netns, self.outside_netns, *(vm.netns for vm in self.vms))


def _mac(prefix: int, offset: int) -> str:
    return f"02:{prefix:02x}:00:00:{offset >> 8:02x}:{offset & 0xFF:02x}"


def _name_problem(name: object) -> Problem | None:
    if isinstance(name, str) and _LAB_NAME.fullmatch(name) is not None:
        return None
    return Problem("name", f"{name!r} is not a lab name (expected 1 to 8 characters from [a-z0-9])")


def validate_lab_name(name: object) -> str:
    """`name` itself if it is a valid lab name (``[a-z0-9]{1,8}``), else `InvalidInputError`."""
    problem = _name_problem(name)
    if problem is not None or not isinstance(name, str):
        raise InvalidInputError("invalid lab name", [problem] if problem else [])
    return name


def lab_netns(name: str, role: str) -> str:
    """The namespace of `role` ("host", "out" or "vm<i>") in lab `name`: ``hf-<name>-<role>``."""
    return f"{NETNS_PREFIX}{name}-{role}"


def is_lab_netns(name: str, netns: str) -> bool:
    """Whether `netns` is exactly one a lab called `name` could have created (host, out or vm<i>).

    Used to sweep a lab without its state file; ``hf-<name>-anything-else`` is *not* a lab namespace.
    """
    prefix = f"{NETNS_PREFIX}{name}-"
    if not netns.startswith(prefix):
        return False
    role = netns[len(prefix) :]
    if role in {"host", "out"}:
        return True
    match = _VM_NAME.fullmatch(role)
    return match is not None and int(match.group(1)) <= MAX_VMS


def plan_lab(name: str = "lab", vms: int = 3) -> LabPlan:
    """The plan of lab `name` with `vms` VMs (vm1..vm<vms>); the same inputs always give the same plan.

    Raises `InvalidInputError` listing every bad input (name: ``[a-z0-9]{1,8}``; vms: 1..1000).
    """
    problems: list[Problem] = []
    name_problem = _name_problem(name)
    if name_problem is not None:
        problems.append(name_problem)
    if isinstance(vms, bool) or not isinstance(vms, int):
        problems.append(Problem("vms", f"{vms!r} is not an integer (expected 1..{MAX_VMS})"))
    elif not 1 <= vms <= MAX_VMS:
        problems.append(Problem("vms", f"{vms} is out of range (expected 1..{MAX_VMS})"))
    if problems:
        raise InvalidInputError("invalid lab plan", problems)

    base = int(SUBNET.network_address)
    out_base = int(OUTSIDE_SUBNET.network_address)
    return LabPlan(
        name=name,
        host_netns=lab_netns(name, "host"),
        outside_netns=lab_netns(name, "out"),
        bridge=BRIDGE,
        bridge_mac=_mac(0x77, GATEWAY_OFFSET),
        subnet=SUBNET,
        gateway=IPv4Address(base + GATEWAY_OFFSET),
        uplink=UPLINK,
        uplink_mac=_mac(0x78, 1),
        uplink_ip=IPv4Address(out_base + 1),
        outside_ifname=OUTSIDE_IFNAME,
        outside_mac=_mac(0x78, 2),
        outside_subnet=OUTSIDE_SUBNET,
        outside_ip=IPv4Address(out_base + 2),
        nat_table=NAT_TABLE,
        vms=tuple(
            LabVm(
                index=i,
                name=f"vm{i}",
                netns=lab_netns(name, f"vm{i}"),
                port=f"vp{i}",
                ifname=VM_IFNAME,
                mac=_mac(0x77, VM_OFFSET + i),
                ip=IPv4Address(base + VM_OFFSET + i),
            )
            for i in range(1, vms + 1)
        ),
    )


def plan_to_dict(plan: LabPlan) -> dict[str, object]:
    """A JSON-ready dict of `plan` (addresses as strings), as the lab's state file records it."""
    return {
        "name": plan.name,
        "host_netns": plan.host_netns,
        "outside_netns": plan.outside_netns,
        "bridge": plan.bridge,
        "bridge_mac": plan.bridge_mac,
        "subnet": str(plan.subnet),
        "gateway": str(plan.gateway),
        "uplink": plan.uplink,
        "uplink_mac": plan.uplink_mac,
        "uplink_ip": str(plan.uplink_ip),
        "outside_ifname": plan.outside_ifname,
        "outside_mac": plan.outside_mac,
        "outside_subnet": str(plan.outside_subnet),
        "outside_ip": str(plan.outside_ip),
        "nat_table": plan.nat_table,
        "vms": [
            {
                "index": vm.index,
                "name": vm.name,
                "netns": vm.netns,
                "port": vm.port,
                "ifname": vm.ifname,
                "mac": vm.mac,
                "ip": str(vm.ip),
            }
            for vm in plan.vms
        ],
    }


def plan_from_dict(data: Mapping[str, object]) -> LabPlan:
    """The plan `plan_to_dict` recorded in `data`.

    The plan is rebuilt with `plan_lab` from the recorded name and VM count, and must match the record
    exactly; a record written by another addressing scheme (or edited by hand) raises `InvalidInputError`.
    """
    name = validate_lab_name(data.get("name"))
    vms = data.get("vms")
    if not isinstance(vms, list) or not vms:
        raise InvalidInputError(
            f"invalid lab record {name!r}", [Problem("vms", f"{vms!r} is not a non-empty list of VMs")]
        )
    plan = plan_lab(name, len(vms))
    expected = plan_to_dict(plan)
    problems = [
        Problem(key, f"recorded {data.get(key)!r}, but plan_lab gives {value!r}")
        for key, value in expected.items()
        if data.get(key) != value
    ]
    problems += [Problem(key, "is not part of a lab record") for key in data if key not in expected]
    if problems:
        raise InvalidInputError(f"lab record {name!r} does not match this version's plan", problems)
    return plan


def dnsmasq_command(plan: LabPlan, *, state_dir: PurePath) -> tuple[str, ...]:
    """The dnsmasq argv (to run inside the host namespace) serving DHCP on the lab's bridge.

    The range is ``static``: dnsmasq answers only the MACs the plan declares (every VM of the plan, created or
    not), each with its own fixed address, so a VM's DHCP lease equals its static address and anti-spoofing
    stays exact. DNS is off (``--port=0``). dnsmasq stays in the foreground (``-k``) so that whoever starts it
    can stop it by PID and reap it; files go to `state_dir`.
    """
    netmask = plan.subnet.netmask
    return (
        "dnsmasq",
        "-k",
        "--conf-file=/dev/null",
        "--port=0",
        f"--interface={plan.bridge}",
        "--bind-interfaces",
        "--user=root",
        "--group=root",
        f"--dhcp-range={plan.subnet.network_address},static,{netmask},{DHCP_LEASE_TIME}",
        *(f"--dhcp-host={vm.mac},{vm.ip}" for vm in plan.vms),
        "--no-ping",
        "--dhcp-authoritative",
        f"--dhcp-leasefile={state_dir / 'leases'}",
        f"--log-facility={state_dir / 'dnsmasq.log'}",
        "--log-dhcp",
        f"--pid-file={state_dir / 'dnsmasq.pid'}",
    )


def nat_ruleset(plan: LabPlan) -> str:
    """An `nft -f` batch that (re)creates the lab's NAT table atomically, like libvirt's default network.

    Traffic from the VM subnet leaving through the uplink is masqueraded to the uplink's address; the
    ``add; delete; add`` idiom replaces the table whether or not it existed, in one transaction.
    """
    table = f"ip {plan.nat_table}"
    return (
        f"add table {table}\n"
        f"delete table {table}\n"
        f"table {table} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {plan.subnet} oifname "{plan.uplink}" masquerade comment "hflab-masq"\n'
        "  }\n"
        "}\n"
    )
