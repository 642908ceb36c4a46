"""Resolve a policy against its VMs: which rules apply to which VM, in which direction, against which
addresses. Pure.

The result (`VmPolicy` per VM) is what the compiler renders into nftables and what `hyperfence can` walks
to answer what-if questions, so both always agree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from hyperfence.model.policy import (
    L4,
    Action,
    AddressRange,
    AddressSelector,
    AllVmsSelector,
    ConnectionCap,
    Direction,
    FloodLimit,
    IpSetSelector,
    LabelSelector,
    NamedService,
    Network,
    Policy,
    PortService,
    ProtocolService,
    Rule,
    Selector,
    Service,
    Settings,
    SpecialPeer,
    SpecialSelector,
    SpecialService,
    Vm,
    VmSelector,
)
from hyperfence.policy import edits

DHCP_SERVICES = (NamedService(SpecialService.DHCP), NamedService(SpecialService.DHCP_SERVER))
# DHCP's addresses that are nobody's: a client without an address yet sends from 0.0.0.0, and requests (and
# replies to a client without an address) go to the limited broadcast address.
DHCP_NO_ADDRESS = AddressSelector(AddressRange.single(IPv4Address(0)), str(IPv4Address(0)))
DHCP_BROADCAST = AddressSelector(AddressRange.single(IPv4Address("255.255.255.255")), "255.255.255.255")
# ARP is an exchange both ways: a rule with it also gets its other half in the opposite chain of each VM it
# selects (the peers' requests and replies, and the VM's answers).
ARP_SERVICE = NamedService(SpecialService.ARP)
_DHCP_EXTRAS = (DHCP_NO_ADDRESS, DHCP_BROADCAST)
_NOBODY = (DHCP_NO_ADDRESS.range, DHCP_BROADCAST.range)  # no ARP with these, ever
DEFAULT_CAP = Settings().default_cap
MAX_ADDR = int(IPv4Address("255.255.255.255"))
ANY: tuple[AddressRange, ...] = (AddressRange(IPv4Address(0), IPv4Address(MAX_ADDR)),)
# Destinations that never leave through the host's routing, so never `outside`: "this network", loopback,
# multicast and the limited broadcast (the host itself and everyone on the link receive those).
NOT_ROUTED = tuple(
    AddressRange.of_network(IPv4Network(n))
    for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")
)


def merge_ranges(ranges: Iterable[AddressRange]) -> tuple[AddressRange, ...]:
    """Sorted, non-overlapping, non-adjacent ranges covering exactly the union of `ranges`."""
    out: list[list[int]] = []
    for r in sorted(ranges):
        a, b = int(r.first), int(r.last)
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple(AddressRange(IPv4Address(a), IPv4Address(b)) for a, b in out)


def complement(ranges: tuple[AddressRange, ...]) -> tuple[AddressRange, ...]:
    """Every IPv4 address not in `ranges` (which must be merged)."""
    out: list[AddressRange] = []
    nxt = 0
    for r in ranges:
        if int(r.first) > nxt:
            out.append(AddressRange(IPv4Address(nxt), IPv4Address(int(r.first) - 1)))
        nxt = int(r.last) + 1
    if nxt <= MAX_ADDR:
        out.append(AddressRange(IPv4Address(nxt), IPv4Address(MAX_ADDR)))
    return tuple(out)


def intersect(a: tuple[AddressRange, ...], b: tuple[AddressRange, ...]) -> tuple[AddressRange, ...]:
    """The addresses in both (each argument merged and sorted). Linear: one sweep over both lists."""
    out: list[AddressRange] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i].first, b[j].first), min(a[i].last, b[j].last)
        if lo <= hi:
            out.append(AddressRange(lo, hi))
        if a[i].last < b[j].last:
            i += 1
        else:
            j += 1
    return tuple(out)


def contains(ranges: tuple[AddressRange, ...], addr: IPv4Address) -> bool:
    return any(r.first <= addr <= r.last for r in ranges)


@dataclass(frozen=True)
class Entry:
    """One policy rule as it applies to one VM in one direction. `peers` are the addresses on the other
    end (destination for `out`, source for `in`); ANY means no address match at all."""

    rule: Rule
    direction: Direction
    peer_selectors: tuple[Selector, ...]
    peers: tuple[AddressRange, ...]
    services: tuple[Service, ...]
    paired: bool = False  # the other half of a DHCP or ARP exchange, added to the opposite chain

    @property
    def action(self) -> Action:
        return self.rule.action


@dataclass(frozen=True)
class ArpSource:
    """The peers of some ARP-implying rules, as the compiler renders them: one shared address set named by
    `selectors` and holding `peers` (ANY: the VM's whole subnet). A DHCP rule's broadcast and unspecified
    addresses are left out of both (`trimmed`): that set is not the rule's own, and also never holds those
    two addresses."""

    selectors: tuple[Selector, ...]
    peers: tuple[AddressRange, ...]
    trimmed: bool = False

    @property
    def is_any(self) -> bool:
        return self.peers == ANY


# The id of an overlay's rate limit among a VM's flood limits (policy/overlays.py), so its rules are
# `sys:flood:overlay:rate`: a ':' no policy id may hold, so it never meets a policy limit's rules.
OVERLAY_LIMIT_ID = "overlay:rate"


@dataclass(frozen=True)
class VmPolicy:
    vm: Vm
    subnet: IPv4Network
    gateway: IPv4Address | None
    egress: tuple[Entry, ...]
    ingress: tuple[Entry, ...]
    arp_peers: tuple[AddressRange, ...]  # implied by allow and reject rules: whom the VM may ARP with
    # The same, as the compiler renders it: the peer selector lists of those rules (True: "any"), and
    # whether a routed peer makes the gateway an ARP peer. Rules share their address sets, so ARP costs no
    # per-VM copy of a peer list.
    arp_sources: tuple[ArpSource, ...]
    arp_gateway: bool
    dhcp_client: bool  # some allow rule lets it get a DHCP lease
    dhcp_server: bool  # some allow rule lets it answer DHCP
    rejects_out: bool = False  # some egress entry rejects
    rejects_in: bool = False  # some ingress entry rejects
    limits_out: tuple[FloodLimit, ...] = ()  # flood limits on what it sends, in policy order
    limits_in: tuple[FloodLimit, ...] = ()  # and on what it receives
    # Its share of the host's connection tracking: the first `limits` entry with `connections` that selects
    # it, else the settings' default.
    connection_cap: ConnectionCap = DEFAULT_CAP
    # An overlay shields it (policy/overlays.py): no new inbound IPv4 flow reaches it.
    shielded: bool = False


@dataclass(frozen=True)
class Resolved:
    policy: Policy
    vms: tuple[VmPolicy, ...]
    outside: tuple[AddressRange, ...]
    host: tuple[AddressRange, ...]
    # The lookups this resolve used: valid for the next one while VMs, networks and IP sets are the same.
    index: _Index | None = field(default=None, compare=False, repr=False)
    # VMs in quarantine (isolated by an overlay of some producer, not by the policy: policy/overlays.py):
    # every packet to and from them is dropped, established flows included.
    quarantine: frozenset[str] = frozenset()
    # Set by `resolve_update`: the VMs (ids) whose `VmPolicy` may differ from `base`'s (the `vms` it was made
    # from); every other VM's is the very object it was in `base`. What lets the compiler look at the
    # changed VMs only.
    base: tuple[VmPolicy, ...] | None = field(default=None, compare=False, repr=False)
    changed: frozenset[str] | None = field(default=None, compare=False, repr=False)


class _Index:
    """Lookups a resolve needs many times: VMs by name and label, addresses by selector list."""

    def __init__(
        self, policy: Policy, outside: tuple[AddressRange, ...], host: tuple[AddressRange, ...]
    ) -> None:
        self.policy = policy
        self.outside = outside
        self.host = host
        self.by_name = {vm.name: vm for vm in policy.vms}
        self.order = {vm.id: i for i, vm in enumerate(policy.vms)}
        self.by_label: dict[tuple[str, str], list[Vm]] = {}
        for vm in policy.vms:
            for label in vm.labels:
                self.by_label.setdefault(label, []).append(vm)
        self._addresses: dict[tuple[Selector, ...], tuple[AddressRange, ...]] = {}
        self._workloads: dict[tuple[Selector, ...], tuple[list[Vm], frozenset[str]]] = {}
        # The rules that select each VM (by VM id, then rule id), of one version of the rules: made by the
        # first `with_rules`, then carried from version to version.
        self._rules_of: dict[str, dict[str, Rule]] | None = None

    def rules_of(self, vm_id: str) -> Iterable[Rule]:
        """The rules that select VM `vm_id` on either side (only after `with_rules`)."""
        if self._rules_of is None:
            raise RuntimeError("_Index.rules_of is known only on an index made by with_rules")
        return self._rules_of.get(vm_id, {}).values()

    def with_rules(
        self, rules: tuple[Rule, ...], changed: list[tuple[Rule | None, Rule | None]]
    ) -> tuple[_Index, set[str]]:
        """A copy of this index (sharing its lookups: they do not depend on the rules) for `rules` with the
        `changed` (old, new) rules made, and the VMs they select before or after."""
        rules_of = self._rules_of
        if rules_of is None:
            rules_of = {}
            for each in rules:
                for vid in self._selected_by(each):
                    rules_of.setdefault(vid, {})[each.id] = each
        rules_of = dict(rules_of)
        affected: set[str] = set()
        copied: set[str] = set()
        for old, new in changed:
            for version, keep in ((old, False), (new, True)):
                if version is None:
                    continue
                for vid in self._selected_by(version):
                    affected.add(vid)
                    if vid not in copied:
                        rules_of[vid] = dict(rules_of.get(vid, {}))
                        copied.add(vid)
                    if keep:
                        rules_of[vid][version.id] = version
                    else:
                        rules_of[vid].pop(version.id, None)
        index = copy.copy(self)
        index._rules_of = rules_of
        return index, affected

    def _selected_by(self, rule: Rule) -> frozenset[str]:
        return self.workload_ids(rule.from_) | self.workload_ids(rule.to)

    def workloads(self, selectors: tuple[Selector, ...]) -> list[Vm]:
        """The VMs `selectors` select, in policy order (a shared list: do not change it)."""
        return self._selected(selectors)[0]

    def workload_ids(self, selectors: tuple[Selector, ...]) -> frozenset[str]:
        return self._selected(selectors)[1]

    def _selected(self, selectors: tuple[Selector, ...]) -> tuple[list[Vm], frozenset[str]]:
        hit = self._workloads.get(selectors)
        if hit is None:
            vms = self._select(selectors)
            hit = self._workloads[selectors] = (vms, frozenset(v.id for v in vms))
        return hit

    def _select(self, selectors: tuple[Selector, ...]) -> list[Vm]:
        out: dict[str, Vm] = {}
        for sel in selectors:
            match sel:
                case AllVmsSelector():
                    return list(self.policy.vms)
                case VmSelector(name) if name in self.by_name:
                    vm = self.by_name[name]
                    out[vm.id] = vm
                case LabelSelector(key, value):
                    out.update((vm.id, vm) for vm in self.by_label.get((key, value), ()))
        return sorted(out.values(), key=lambda v: self.order[v.id]) if len(out) > 1 else list(out.values())

    def addresses(self, selectors: tuple[Selector, ...]) -> tuple[AddressRange, ...]:
        cached = self._addresses.get(selectors)
        if cached is None:
            cached = self._addresses[selectors] = self._compute(selectors)
        return cached

    def _compute(self, selectors: tuple[Selector, ...]) -> tuple[AddressRange, ...]:
        ranges: list[AddressRange] = []
        for sel in selectors:
            match sel:
                case AddressSelector(rng, _):
                    ranges.append(rng)
                case IpSetSelector(name):
                    ranges.extend(self.policy.ipset(name) or ())
                case SpecialSelector(SpecialPeer.ANY):
                    return ANY
                case SpecialSelector(SpecialPeer.OUTSIDE):
                    ranges.extend(self.outside)
                case SpecialSelector(SpecialPeer.HOST):
                    ranges.extend(self.host)
                case _:
                    ranges.extend(AddressRange.single(a) for vm in self.workloads((sel,)) for a in vm.ips)
        return merge_ranges(ranges)


def _rule_entries(
    rule: Rule,
    index: _Index,
    egress: dict[str, list[Entry]],
    ingress: dict[str, list[Entry]],
    only: set[str] | None = None,
) -> None:
    """Append the entries of one rule to the VMs it selects (all of them, or those in `only`)."""
    if (
        only is not None
        and index.workload_ids(rule.from_).isdisjoint(only)
        and index.workload_ids(rule.to).isdisjoint(only)
    ):
        return
    from_vms = [v for v in index.workloads(rule.from_) if only is None or v.id in only]
    to_vms = [v for v in index.workloads(rule.to) if only is None or v.id in only]
    if not from_vms and not to_vms:
        return
    to_addrs = index.addresses(rule.to)
    from_addrs = index.addresses(rule.from_)
    dhcp = tuple(s for s in rule.services if s in DHCP_SERVICES)
    others = tuple(s for s in rule.services if s not in DHCP_SERVICES) if dhcp else rule.services
    arp = (ARP_SERVICE,) if ARP_SERVICE in others else ()
    # The `from` VMs get the rule in their egress (the other side's addresses as peers), the `to` VMs in
    # their ingress; ARP and DHCP also get their other half in the opposite chain (`paired`).
    sides = (
        (from_vms, Direction.OUT, Direction.IN, egress, ingress, rule.to, to_addrs),
        (to_vms, Direction.IN, Direction.OUT, ingress, egress, rule.from_, from_addrs),
    )
    for vms, direction, other, own, opposite, selectors, peers in sides:
        for vm in vms:
            if others:
                own[vm.id].append(Entry(rule, direction, selectors, peers, others))
                if arp:
                    opposite[vm.id].append(Entry(rule, other, selectors, peers, arp, paired=True))
            for svc in dhcp:
                own[vm.id].append(_dhcp_entry(rule, svc, direction, selectors, peers))
                opposite[vm.id].append(_dhcp_entry(rule, svc, other, selectors, peers, paired=True))


def is_dhcp_client(service: Service, direction: Direction, *, paired: bool) -> bool:
    """Is the VM a DHCP client in an entry of `service` (`dhcp` or `dhcp-server`)? A rule's `from` side sends
    first: with `dhcp` the `from` VMs are clients of the `to` side (and `to` VMs its servers), with
    `dhcp-server` the `from` VMs serve the `to` side. A VM is on the `from` side in its unpaired egress entry
    and its paired ingress entry."""
    from_side = (direction is Direction.OUT) != paired
    return (service == DHCP_SERVICES[0]) == from_side


def dhcp_ports(service: Service, direction: Direction, *, paired: bool) -> tuple[int, int]:
    """(source port, destination port) of the UDP packets a DHCP entry passes: a client sends 68 -> 67 and
    receives 67 -> 68, a server the reverse."""
    sends = direction is Direction.OUT
    return (68, 67) if is_dhcp_client(service, direction, paired=paired) == sends else (67, 68)


def _dhcp_entry(
    rule: Rule,
    service: Service,
    direction: Direction,
    selectors: tuple[Selector, ...],
    addrs: tuple[AddressRange, ...],
    *,
    paired: bool = False,
) -> Entry:
    """One half of a DHCP exchange with the rule's peers, and only with them: a VM sends to the peers or to
    the broadcast address, and takes from the peers (a server also from 0.0.0.0: a client without an
    address yet, which only a VM with a `dhcp` rule may send from, with its own MAC)."""
    extra = None
    if direction is Direction.OUT:
        extra = DHCP_BROADCAST
    elif not is_dhcp_client(service, direction, paired=paired):
        extra = DHCP_NO_ADDRESS
    if extra is not None and addrs != ANY:
        selectors = (*selectors, extra)
        addrs = merge_ranges((*addrs, extra.range))
    return Entry(rule, direction, selectors, addrs, (service,), paired=paired)


def _limits(
    index: _Index, limits: tuple[FloodLimit, ...], vm: Vm, direction: Direction
) -> tuple[FloodLimit, ...]:
    return tuple(
        lim for lim in limits if direction in lim.directions and vm.id in index.workload_ids(lim.vms)
    )


def _connection_cap(index: _Index, policy: Policy, vm: Vm) -> ConnectionCap:
    for cap in policy.connection_caps:
        if vm.id in index.workload_ids(cap.vms):
            return cap
    return policy.settings.default_cap


def _vm_policy(
    vm: Vm,
    net: Network,
    egress: list[Entry],
    ingress: list[Entry],
    arp_cache: dict[tuple[object, ...], tuple[AddressRange, ...]],
    *,
    index: _Index,
    policy: Policy,
) -> VmPolicy:
    allows = [e for e in (*egress, *ingress) if e.action is Action.ALLOW]
    # IP rules that allow or reject imply ARP with their peers: a rejected sender must resolve the peer for
    # its packet to leave and be answered (the receiver answers the ARP); deny implies nothing. DHCP is IP
    # too: a lease is renewed by unicast to the server, so `dhcp`/`dhcp-server` imply ARP with the rule's
    # peers (not with the broadcast or the unspecified address of its exchange).
    arp_rules = [
        e
        for e in (*egress, *ingress)
        if e.action is not Action.DENY and not _only_arp(e.services) and not e.paired
    ]
    # VMs with the same peers share one computation (1,000 VMs x a 10k-address IP set otherwise)
    key = (net.name, frozenset(e.peer_selectors for e in arp_rules))
    reachable = arp_cache.get(key)
    if reachable is None:
        reachable = arp_cache[key] = _arp_reachable(net.subnet, net.gateway, [e.peers for e in arp_rules])
    sources: dict[tuple[Selector, ...], ArpSource] = {}
    for e in arp_rules:
        selectors = tuple(sel for sel in e.peer_selectors if sel not in _DHCP_EXTRAS)
        if selectors == e.peer_selectors:
            sources.setdefault(selectors, ArpSource(selectors, e.peers))
        elif selectors and (peers := _subtract(e.peers, _NOBODY)):
            sources.setdefault(selectors, ArpSource(selectors, peers, trimmed=True))
    return VmPolicy(
        vm=vm,
        subnet=net.subnet,
        gateway=net.gateway,
        egress=tuple(egress),
        ingress=tuple(ingress),
        arp_peers=_without(reachable, vm.ips),
        arp_sources=tuple(sources.values()),
        arp_gateway=net.gateway is not None and contains(reachable, net.gateway),
        dhcp_client=any(_dhcp_role(e, client=True) for e in allows),
        dhcp_server=any(_dhcp_role(e, client=False) for e in allows),
        rejects_out=any(e.action is Action.REJECT for e in egress),
        rejects_in=any(e.action is Action.REJECT for e in ingress),
        limits_out=_limits(index, policy.limits, vm, Direction.OUT),
        limits_in=_limits(index, policy.limits, vm, Direction.IN),
        connection_cap=_connection_cap(index, policy, vm),
    )


def host_ranges(policy: Policy, host_addresses: Iterable[AddressRange] = ()) -> tuple[AddressRange, ...]:
    """`host`: every address of the hypervisor itself. The networks' gateways and `settings.host_addresses`
    come from the policy; the rest (e.g. its uplink's address) only the kernel knows: `host_addresses`, which
    the caller reads from the bridges' namespace (`adapters/host_addresses.py`)."""
    gateways = (AddressRange.single(n.gateway) for n in policy.networks if n.gateway is not None)
    return merge_ranges((*gateways, *policy.settings.host_addresses, *host_addresses))


def outside_ranges(policy: Policy, host: tuple[AddressRange, ...]) -> tuple[AddressRange, ...]:
    """`outside`: the addresses that are neither on a managed network nor the host's, nor `NOT_ROUTED`."""
    managed = (AddressRange.of_network(n.subnet) for n in policy.networks)
    return complement(merge_ranges((*managed, *host, *NOT_ROUTED)))


def resolve_policy(policy: Policy, *, host_addresses: Iterable[AddressRange] = ()) -> Resolved:
    """For every VM: its egress and ingress entries in evaluation order, and what ARP/DHCP it may do.
    `host_addresses`: the host's own addresses as the kernel has them (see `host_ranges`)."""
    host = host_ranges(policy, host_addresses)
    outside = outside_ranges(policy, host)
    nets = {n.name: n for n in policy.networks}
    egress: dict[str, list[Entry]] = {vm.id: [] for vm in policy.vms}
    ingress: dict[str, list[Entry]] = {vm.id: [] for vm in policy.vms}
    index = _Index(policy, outside, host)
    for rule in sorted(policy.rules, key=lambda r: r.order):
        _rule_entries(rule, index, egress, ingress)
    arp_cache: dict[tuple[object, ...], tuple[AddressRange, ...]] = {}
    vms = tuple(
        _vm_policy(vm, nets[vm.network], egress[vm.id], ingress[vm.id], arp_cache, index=index, policy=policy)
        for vm in policy.vms
    )
    return Resolved(policy=policy, vms=vms, outside=outside, host=host, index=index)


MAX_INCREMENTAL_RULES = 32


def resolve_update(
    prev: Resolved, policy: Policy, *, host_addresses: Iterable[AddressRange] = ()
) -> Resolved | None:
    """`resolve_policy(policy, host_addresses=...)`, computed from `prev` when only a few rules changed: the
    VMs those rules select (before or after the change) are resolved again, every other VM keeps its
    `VmPolicy` object. None when the change is not of that kind (networks, VMs, IP sets, settings, limits or
    the host's addresses changed; many rules changed): the caller resolves from scratch. The result equals
    `resolve_policy(policy, host_addresses=...)`."""
    old = prev.policy
    if (
        host_ranges(policy, host_addresses) != prev.host
        or old.networks != policy.networks
        or old.vms != policy.vms
        or old.ipsets != policy.ipsets
        or old.settings != policy.settings
        or old.limits != policy.limits
        or old.connection_caps != policy.connection_caps
    ):
        return None
    changed = _changed_rules(old.rules, policy.rules)
    if changed is None:
        return None
    # Same VMs, networks and IP sets (checked above): the previous lookups still hold.
    index = prev.index if prev.index is not None else _Index(policy, prev.outside, prev.host)
    if not changed:
        return Resolved(policy=policy, vms=prev.vms, outside=prev.outside, host=prev.host, index=index)
    index, affected = index.with_rules(old.rules, changed)
    if not affected:
        return Resolved(policy=policy, vms=prev.vms, outside=prev.outside, host=prev.host, index=index)
    egress: dict[str, list[Entry]] = {vid: [] for vid in affected}
    ingress: dict[str, list[Entry]] = {vid: [] for vid in affected}
    selecting = {rule.id: rule for vid in affected for rule in index.rules_of(vid)}
    for rule in sorted(selecting.values(), key=lambda r: r.order):
        _rule_entries(rule, index, egress, ingress, only=affected)
    nets = {n.name: n for n in policy.networks}
    arp_cache: dict[tuple[object, ...], tuple[AddressRange, ...]] = {}
    vms = list(prev.vms)
    for vid in affected:
        at = index.order[vid]
        vm = vms[at].vm
        vms[at] = _vm_policy(
            vm, nets[vm.network], egress[vid], ingress[vid], arp_cache, index=index, policy=policy
        )
    return Resolved(
        policy=policy,
        vms=tuple(vms),
        outside=prev.outside,
        host=prev.host,
        index=index,
        base=prev.vms,
        changed=frozenset(affected),
    )


def _changed_rules(
    old: tuple[Rule, ...], new: tuple[Rule, ...]
) -> list[tuple[Rule | None, Rule | None]] | None:
    """The rules that differ, as (old, new) by id (None: not there), unchanged rules being the same objects
    (what the parser keeps: a one-rule change costs a pass of identity checks); None when more than
    `MAX_INCREMENTAL_RULES` differ."""
    known = edits.edited(old, new)
    if known is not None:  # what the parser edited: the size of the change
        out: list[tuple[Rule | None, Rule | None]] = []
        for i in known:
            o, n = (old[i] if i < len(old) else None), new[i]
            if o is not None and o.id != n.id:
                break  # (an id that changed: by id, below)
            if o != n:
                out.append((o, n))
        else:
            return out if len(out) <= MAX_INCREMENTAL_RULES else None
    if len(old) == len(new):
        pairs = [(o, n) for o, n in zip(old, new, strict=True) if o is not n]
        if all(o.id == n.id for o, n in pairs):
            changed: list[tuple[Rule | None, Rule | None]] = [(o, n) for o, n in pairs if o != n]
            return changed if len(changed) <= MAX_INCREMENTAL_RULES else None
    old_rules = {r.id: r for r in old}
    new_rules = {r.id: r for r in new}
    changed = [
        (old_rules.get(i), new_rules.get(i))
        for i in old_rules.keys() | new_rules.keys()
        if old_rules.get(i) is not new_rules.get(i) and old_rules.get(i) != new_rules.get(i)
    ]
    return changed if len(changed) <= MAX_INCREMENTAL_RULES else None


def _arp_reachable(
    subnet_net: IPv4Network, gateway: IPv4Address | None, peer_lists: list[tuple[AddressRange, ...]]
) -> tuple[AddressRange, ...]:
    """Whom a VM may ARP with: its allowed peers on its own subnet, and the gateway for routed peers."""
    subnet = (AddressRange.of_network(subnet_net),)
    wanted = _subtract(merge_ranges(r for peers in peer_lists for r in peers), _NOBODY)
    arp = list(intersect(wanted, subnet))
    if gateway is not None and intersect(wanted, complement(subnet)):
        arp.append(AddressRange.single(gateway))  # routed peers are reached through the gateway
    return merge_ranges(arp)


def _without(ranges: tuple[AddressRange, ...], addrs: tuple[IPv4Address, ...]) -> tuple[AddressRange, ...]:
    """`ranges` minus a few single addresses (a VM's own), without rebuilding untouched ranges."""
    if not any(r.first <= a <= r.last for r in ranges for a in addrs):
        return ranges
    return _subtract(ranges, merge_ranges(AddressRange.single(a) for a in addrs))


def _dhcp_role(entry: Entry, *, client: bool) -> bool:
    """Does `entry` make its VM a DHCP client (or, `client=False`, a server)?"""
    return any(
        is_dhcp_client(s, entry.direction, paired=entry.paired) == client
        for s in entry.services
        if s in DHCP_SERVICES
    )


def _only_arp(services: tuple[Service, ...]) -> bool:
    """A rule that names only `arp` implies nothing more (it is the ARP rule itself). Every other service is
    IP traffic: `any` (or no protocol), tcp/udp/icmp, protocol numbers, and DHCP."""
    return bool(services) and all(s == ARP_SERVICE for s in services)


def _subtract(a: tuple[AddressRange, ...], b: tuple[AddressRange, ...]) -> tuple[AddressRange, ...]:
    return intersect(a, complement(b))


def is_answered_by_icmp(service: Service) -> bool:
    """Whether a reject of `service` can answer with an ICMP error: all but TCP alone (and ARP and DHCP,
    which are never rejected)."""
    match service:
        case PortService(L4.TCP, _) | ProtocolService(6):
            return False
        case NamedService(kind):
            return kind is SpecialService.ANY
    return True


def reject_arp_vms(resolved: Resolved) -> frozenset[str]:
    """The VMs the host may have to answer with an ICMP error for a reject (ruleset/reject.py): it sends what
    one of its egress rejects answers by ICMP, or its address is a peer of such a reject in another VM's
    ingress. The host must resolve their MAC for the answer to reach them, so they and their gateway may
    ARP each other (`sys:reject-arp`, in the bridge's base chains: before any rule of the VM's own). Not a
    quarantined VM (neither answered nor answered for), nor one on a network without a gateway."""
    live = [vp for vp in resolved.vms if vp.vm.id not in resolved.quarantine]
    receivers = any(vp.rejects_in for vp in live)
    senders = [vp for vp in live if vp.gateway is not None and (receivers or vp.rejects_out)]
    icmp_in = merge_ranges(
        r
        for vp in live
        for e in vp.ingress
        if e.action is Action.REJECT and any(is_answered_by_icmp(s) for s in e.services)
        for r in e.peers
    )
    out: set[str] = set()
    for vp in senders:
        icmp_out = any(
            e.action is Action.REJECT and any(is_answered_by_icmp(s) for s in e.services) for e in vp.egress
        )
        if icmp_out or any(contains(icmp_in, ip) for ip in vp.vm.ips):
            out.add(vp.vm.id)
    return frozenset(out)
