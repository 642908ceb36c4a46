"""Learned addresses: which DHCP messages teach or take back an address, and the policy with the learned
addresses in place. Pure.

What is trusted, and why (docs/policy.md, "VMs that learn their addresses"): an address is learned only
from a DHCPACK that reached the VM through its own ingress rules from a server its `dhcp` rules name (the
kernel checks that before the frame is logged: `ruleset/compile.py`), for the VM's own MAC (`chaddr`), inside
its network, not the gateway, the network's or broadcast address, nor an address another VM declares
(declared addresses always win). A DHCPRELEASE from the VM, or a DHCPNAK to it, gives addresses back: that only
takes rights away, so the VM's word is enough. A lease lasts at most `MAX_LEASE_SECONDS` and a VM holds at
most `MAX_LEASES_PER_VM` addresses (the newest), so a broken or hostile server cannot grow the state.
libvirt's lease lists are the second source (`from_libvirt`): believed as the host's own server's word,
under the same checks; a snooped lease wins while it lasts. A DHCP request naming another MAC never reaches
a server: the guard drops it (`ruleset/compile.py`, the chaddr guard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from hyperfence.model.lease import DhcpMessage, DhcpType, Lease, LeaseSource, NetworkLease
from hyperfence.model.policy import Network, Policy, Vm

GRACE_SECONDS = 30.0  # a lease's address is released this long after the lease ends (a late renewal)
MAX_LEASE_SECONDS = 7 * 86400  # longer (or infinite) leases count as this long
MAX_LEASES_PER_VM = 4


@dataclass(frozen=True)
class Learned:
    """The server acknowledged `lease` for the VM."""

    lease: Lease


@dataclass(frozen=True)
class Released:
    """The VM gives up `ip` (None: every address it learned), for `reason`."""

    vm: str
    ip: IPv4Address | None
    reason: str


@dataclass(frozen=True)
class Ignored:
    """The message teaches nothing, for `reason` (e.g. an ACK for another MAC)."""

    reason: str


Outcome = Learned | Released | Ignored


def read_message(vm: Vm, msg: DhcpMessage, *, inbound: bool, now: float) -> Outcome:
    """What one DHCP message on `vm`'s port means for its learned addresses. `inbound`: a server's message
    to the VM (the kernel logged it only if the VM's rules accept it from a server its `dhcp` rules name);
    else a message the VM sent to a server's port."""
    if msg.chaddr != vm.mac:
        return Ignored(f"DHCP {msg.type.name} for MAC {msg.chaddr}, not the VM's {vm.mac}")
    if inbound:
        if msg.op != 2:
            return Ignored(f"a client's DHCP {msg.type.name} sent to the VM")
        server = msg.server_id or msg.src
        if msg.type is DhcpType.NAK:
            return Released(vm.id, None, f"DHCPNAK from {server}")
        if msg.type is not DhcpType.ACK:
            return Ignored(f"DHCP {msg.type.name}")
        if msg.yiaddr == IPv4Address(0):
            return Ignored("DHCPACK without an address (the answer to an INFORM)")
        if msg.lease_time is None:
            return Ignored(f"DHCPACK for {msg.yiaddr} without a lease time")
        seconds = min(msg.lease_time, MAX_LEASE_SECONDS)
        return Learned(Lease(vm.id, vm.mac, msg.yiaddr, now + seconds, now, server))
    if msg.op == 1 and msg.type is DhcpType.RELEASE:
        return Released(vm.id, msg.ciaddr, "DHCPRELEASE from the VM")
    return Ignored(f"DHCP {msg.type.name} from the VM")


def lease_problem(policy: Policy, lease: Lease) -> str | None:
    """Why `lease` cannot give its VM its address in `policy` (None: it can)."""
    vm = next((v for v in policy.vms if v.id == lease.vm), None)
    if vm is None:
        return f"VM {lease.vm} is not in the policy"
    if not vm.learns:
        return f"VM {vm.name} declares its addresses"
    if vm.mac != lease.mac:
        return f"the lease is for MAC {lease.mac}, VM {vm.name} has {vm.mac}"
    net = next(n for n in policy.networks if n.name == vm.network)
    problem = _address_problem(net, lease.ip)
    if problem is not None:
        return problem
    owner = next((v for v in policy.vms if not v.learns and lease.ip in v.ips), None)
    if owner is not None:
        return f"{lease.ip} is declared by VM {owner.name}"
    return None


def _address_problem(net: Network, ip: IPv4Address) -> str | None:
    if ip not in net.subnet:
        return f"{ip} is not in network {net.name!r} ({net.subnet})"
    if ip == net.gateway:
        return f"{ip} is the gateway of network {net.name!r}"
    if net.subnet.prefixlen < 31 and ip in (net.subnet.network_address, net.subnet.broadcast_address):
        return f"{ip} is the network or broadcast address of {net.subnet}"
    return None


def apply_leases(policy: Policy, leases: tuple[Lease, ...]) -> tuple[Policy, tuple[tuple[Lease, str], ...]]:
    """`policy` with every learning VM's `ips` set to the addresses of its usable leases, and the leases left
    out with the reason. Two learning VMs holding the same address: the lease learned last wins (the server
    gave the address to that VM most recently). Expiry is not looked at here (the caller drops expired leases:
    `expire`), so the result depends only on its arguments."""
    if not leases:
        return policy, ()
    ignored: list[tuple[Lease, str]] = []
    usable: dict[IPv4Address, Lease] = {}
    for lease in sorted(leases, key=lambda le: (le.learned, le.vm, le.ip)):
        problem = lease_problem(policy, lease)
        if problem is not None:
            ignored.append((lease, problem))
            continue
        earlier = usable.get(lease.ip)
        if earlier is not None and earlier.vm != lease.vm:
            ignored.append((earlier, f"{lease.ip} was leased to VM {lease.vm} later"))
        usable[lease.ip] = lease
    by_vm: dict[str, list[IPv4Address]] = {}
    for lease in usable.values():
        by_vm.setdefault(lease.vm, []).append(lease.ip)
    if not by_vm:
        return policy, tuple(ignored)
    vms = tuple(
        dataclasses.replace(vm, ips=tuple(sorted(by_vm[vm.id]))) if vm.id in by_vm and vm.learns else vm
        for vm in policy.vms
    )
    return dataclasses.replace(policy, vms=vms), tuple(ignored)


def with_lease(leases: tuple[Lease, ...], lease: Lease) -> tuple[Lease, ...]:
    """`leases` with `lease` added (replacing the VM's lease of that address); the VM keeps its newest
    `MAX_LEASES_PER_VM`."""
    others = [le for le in leases if le.vm != lease.vm]
    own = [le for le in leases if le.vm == lease.vm and le.ip != lease.ip]
    own = sorted([*own, lease], key=lambda le: le.learned)[-MAX_LEASES_PER_VM:]
    return _sorted([*others, *own])


def without(leases: tuple[Lease, ...], vm: str, ip: IPv4Address | None = None) -> tuple[Lease, ...]:
    """`leases` less the VM's lease of `ip` (None: all of the VM's)."""
    return _sorted(le for le in leases if not (le.vm == vm and (ip is None or le.ip == ip)))


def expire(leases: tuple[Lease, ...], now: float) -> tuple[tuple[Lease, ...], tuple[Lease, ...]]:
    """(the leases still held, those that ended more than `GRACE_SECONDS` before `now`)."""
    gone = tuple(le for le in leases if now > le.expires + GRACE_SECONDS)
    return (tuple(le for le in leases if le not in gone), gone) if gone else (leases, ())


def next_expiry(leases: tuple[Lease, ...]) -> float | None:
    """When the next address is due to be released (None: no lease)."""
    return min((le.expires + GRACE_SECONDS for le in leases), default=None)


@dataclass(frozen=True)
class LeaseSync:
    """What one read of libvirt's lease lists changes: the `leases` now held, those `learned` (with
    `renewed`: the VM held that address already), those `released` and those `ignored`, with the reason."""

    leases: tuple[Lease, ...]
    learned: tuple[tuple[Lease, bool], ...] = ()
    released: tuple[tuple[Lease, str], ...] = ()
    ignored: tuple[tuple[Lease, str], ...] = ()


def from_libvirt(
    policy: Policy, held: tuple[Lease, ...], found: tuple[NetworkLease, ...], *, complete: bool, now: float
) -> LeaseSync:
    """`held` brought in step with libvirt's lease lists (`found`, every active network's): the same input as
    the DHCP learner's, with the same checks (`lease_problem`), bounds and expiry.

    * A listed lease teaches its address to the learning VM with that MAC, if the lease is on the VM's own
      network (libvirt's bridge = the bridge of the VM's policy network). It lasts until libvirt's expiry
      time (at most `MAX_LEASE_SECONDS`; libvirt's "no end" counts as that, from when it was first read).
      A VM takes at most `MAX_LEASES_PER_VM` of them (those that end last).
    * Which source wins: a lease learned from the VM's own DHCP exchange (`LeaseSource.DHCP`) is kept as it
      is while it lasts: it is first-hand, and its renewals are seen as they happen. libvirt's list only
      adds what snooping did not see. The two should agree (the same server granted both).
    * A lease learned from libvirt that libvirt no longer lists is released (`complete` reads only: a read
      cut short by a bound releases nothing but the leases of VMs that no longer learn).
    """
    learners = {vm.mac: vm for vm in policy.vms if vm.learns}
    by_id = {vm.id: vm for vm in policy.vms if vm.learns}
    bridges = {n.name: n.bridge for n in policy.networks}
    cap = now + MAX_LEASE_SECONDS
    per_vm: dict[str, list[NetworkLease]] = {}
    ignored: list[tuple[Lease, str]] = []
    for nl in found:
        vm = learners.get(nl.mac)
        if vm is None or (nl.expires is not None and nl.expires + GRACE_SECONDS < now):
            continue
        if nl.bridge != bridges.get(vm.network):
            lease = Lease(vm.id, vm.mac, nl.ip, min(nl.expires or cap, cap), now, None, LeaseSource.LIBVIRT)
            why = f"libvirt lists it on network {nl.network} (bridge {nl.bridge}), not on the VM's network"
            ignored.append((lease, why))
            continue
        per_vm.setdefault(vm.id, []).append(nl)
    leases = held
    learned: list[tuple[Lease, bool]] = []
    listed: set[tuple[str, IPv4Address]] = set()
    for vm_id in sorted(per_vm):
        vm = by_id[vm_id]
        newest = sorted(per_vm[vm_id], key=lambda nl: (-(nl.expires or cap), nl.ip))[:MAX_LEASES_PER_VM]
        for nl in sorted(newest, key=lambda nl: nl.ip):
            listed.add((vm.id, nl.ip))
            current = next((le for le in leases if le.vm == vm.id and le.ip == nl.ip), None)
            end = min(nl.expires or cap, cap)
            if current is not None and current.mac == vm.mac:
                if current.source is LeaseSource.DHCP:  # snooped: first-hand, kept while it lasts
                    continue
                if current.expires == end or (nl.expires is None or nl.expires > cap):
                    continue  # nothing new (an endless lease keeps the end it was first given)
            lease = Lease(vm.id, vm.mac, nl.ip, end, now, None, LeaseSource.LIBVIRT)
            problem = lease_problem(policy, lease)
            if problem is not None:
                ignored.append((lease, problem))
                continue
            leases = with_lease(leases, lease)
            learned.append((lease, current is not None))
    released: list[tuple[Lease, str]] = []
    for le in leases:
        if le.source is not LeaseSource.LIBVIRT or (le.vm, le.ip) in listed:
            continue
        vm = by_id.get(le.vm)
        if vm is None or vm.mac != le.mac:
            released.append((le, _gone_reason(policy, le)))
        elif complete:
            released.append((le, "libvirt no longer lists it"))
    gone = {(le.vm, le.ip) for le, _ in released}
    leases = _sorted(le for le in leases if (le.vm, le.ip) not in gone)
    return LeaseSync(leases, tuple(learned), tuple(released), tuple(ignored))


def _gone_reason(policy: Policy, lease: Lease) -> str:
    vm = next((v for v in policy.vms if v.id == lease.vm), None)
    if vm is None:
        return "the VM was removed"
    return "the VM declares its addresses" if not vm.learns else "the VM changed"


def _sorted(leases: Iterable[Lease]) -> tuple[Lease, ...]:
    return tuple(sorted(leases, key=lambda le: (le.vm, le.ip)))
