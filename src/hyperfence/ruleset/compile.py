"""Resolved policy -> the nftables state hyperfence owns (`Ruleset`). Pure and deterministic.

Layout (see docs/design.md for the reasons and the hook evidence):

    table inet hyperfence
      chain pre   prerouting -150   conntrack says established/related -> set our mark bit, else clear it
      chain out   output     -150   the same for packets the host itself sends
    table bridge hyperfence
      chain guard   prerouting -300  iifname vmap @guard_ports -> <vm>_guard: anti-spoofing, before
                                     conntrack and before the bridge learns a MAC; unknown port -> drop.
                                     First a DHCP request (udp 68 -> 67): iifname vmap @dhcp_ports ->
                                     <vm>_dhcp, its BOOTP chaddr must be the VM's MAC (else logged drop)
      chain egress  prerouting +10   established -> accept; iifname vmap @out_ports -> <vm>_out
      chain ingress postrouting +10  established -> accept; oifname vmap @in_ports  -> <vm>_in
      set  <selector-hash>           addresses of a rule side (ipv4_addr, interval), shared by all rules
                                     with the same selectors; membership changes are element updates
    table inet hyperfence (continued): every VM's share of connection tracking
      chain pre   (after the mark)   a new connection from a VM (on a managed bridge) or towards one ->
                                     ip saddr / ip daddr vmap @cap_vms -> <vm>_cap
      chain <vm>_cap                 ct count over <cap> -> goto <vm>_cap_drop (log within the log rate, drop)

Every VM chain ends in a (rate-limited, logged) default deny. Every rule carries a counter and a comment
that is its id: `rule:<policy-rule-id>#<n>` for rules from the policy, `sys:<name>` for built-in ones.
Log prefixes are `hf:<vm-sid>:<direction>:<verdict>:<comment>`.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import NamedTuple

from hyperfence.model.kernel import Flavour
from hyperfence.model.policy import Action, Direction, FloodLimit, Network, Settings, Vm
from hyperfence.policy.resolve import (
    ANY,
    ARP_SERVICE,
    DHCP_SERVICES,
    ArpSource,
    Entry,
    Resolved,
    VmPolicy,
    is_dhcp_client,
)
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.build import (
    BRIDGE,
    CAP_MAP,
    CAP_PORTS,
    GUARD_MAP,
    IN_MAP,
    INET,
    LOG_PREFIX,
    NETDEV,
    OUT_MAP,
    REJECT_ARP_SET,
    REJECT_ARP_TYPE,
    TABLES,
    Builder,
    BuildMemo,
    dump,
    established,
    log_prefix,
    own_ips,
    selector_set_name,
    service_matches,
    vm_sid,
)
from hyperfence.ruleset.ir import JSON, Chain, ChainedRules, Delta, NftSet, Rule, Ruleset, TableId
from hyperfence.ruleset.reject import reject_chains

__all__ = [
    "BRIDGE",
    "INET",
    "LOG_PREFIX",
    "NETDEV",
    "TABLES",
    "CompileCache",
    "Flavour",
    "compile_ruleset",
    "vm_sid",
]


@dataclass(frozen=True)
class _VmFragment:
    """What one VM compiles to: its chains and their rules (shared lists: never changed)."""

    chains: list[Chain]
    rules: dict[tuple[TableId, str], list[Rule]]


class CompileCache(BuildMemo):
    """Per-VM results of earlier compiles, so a one-rule change recompiles only the VMs it touches.

    Keys hold everything a VM's chains depend on (its identity, the rules that apply to it and their
    selectors, its ARP peers, the settings) but not the contents of shared address sets, which are
    element updates. Entries not used by the latest compile are dropped, so the cache never outgrows
    one policy. Using a cache never changes the result: `compile_ruleset(r) == compile_ruleset(r, cache)`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.vms: dict[_Key, _VmFragment] = {}
        self.last: dict[str, tuple[VmPolicy, Settings, _Key, list[NftSet]]] = {}
        # The base chains, maps and identity sets, valid while the VMs, networks and settings are the same.
        self.base: tuple[_BaseKey, list[Chain], list[Rule], dict[str, NftSet]] | None = None
        # The last result, how many VMs use each VM address set, and how many VMs have reject rules: what
        # a compile that rebuilds only the changed VMs starts from.
        self.prev: Ruleset | None = None
        self.set_users: dict[str, int] = {}
        self.reject_vms = 0
        self.flavour: Flavour | None = None  # what all of the above was built for
        self.compiled_vms: tuple[VmPolicy, ...] | None = None  # the VMs of the last compile

    def for_flavour(self, flavour: Flavour) -> None:
        """Forget everything when the flavour changes: nothing built for one data plane serves the other."""
        if self.flavour is not flavour:
            self.__init__()  # type: ignore[misc]
            self.flavour = flavour


class _Key:
    """A cache key that hashes once: the inputs of a VM's chains are a deep tuple, and re-hashing 1,000 of
    them per compile would cost more than the compile saves."""

    __slots__ = ("hash", "value")

    def __init__(self, value: object) -> None:
        self.value = value
        self.hash = hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and self.hash == other.hash and self.value == other.value


def _vm_key(vp: VmPolicy, settings: Settings) -> _Key:
    def entries(es: tuple[Entry, ...]) -> tuple[object, ...]:
        return tuple(
            (e.rule, e.direction, e.peer_selectors, e.peers == ANY, e.services, e.paired) for e in es
        )

    return _Key(
        (
            vp.vm,
            vp.subnet,
            vp.gateway,
            entries(vp.egress),
            entries(vp.ingress),
            tuple((a.selectors, a.is_any, a.trimmed) for a in vp.arp_sources),
            vp.arp_gateway,
            vp.dhcp_client,
            vp.dhcp_server,
            vp.limits_out,
            vp.limits_in,
            vp.connection_cap,
            vp.shielded,
            settings,
        )
    )


def compile_ruleset(
    resolved: Resolved, cache: CompileCache | None = None, *, flavour: Flavour = Flavour.BR_NETFILTER
) -> Ruleset:
    """The whole desired state for the data plane `flavour` (model/kernel.py). Same input, same output, byte
    for byte (with or without a cache)."""
    if cache is not None:
        cache.for_flavour(flavour)
        changed = _compile_changed_vms(resolved, cache)
        if changed is not None:
            return changed
    rs = _compile_all(resolved, cache, flavour)
    if cache is not None:
        cache.prev = rs
        cache.compiled_vms = resolved.vms
        cache.set_users = {}
        for _, _, _, vm_sets in cache.last.values():
            for name in {n.name for n in vm_sets}:
                cache.set_users[name] = cache.set_users.get(name, 0) + 1
        cache.reject_vms = sum(1 for vp in resolved.vms if vp.rejects_in or vp.rejects_out)
    return rs


def _compile_all(resolved: Resolved, cache: CompileCache | None, flavour: Flavour) -> Ruleset:
    settings = resolved.policy.settings
    b = Builder(settings, cache, flavour)
    if flavour is Flavour.BR_NETFILTER:
        _conntrack_marker(b, settings.conntrack_mark)
    _cached_base_chains(b, resolved, settings, cache)
    by_chain: dict[tuple[TableId, str], list[Rule]] = {(c.table, c.name): [] for c in b.chains}
    for r in b.rules:
        by_chain[(r.table, r.chain)].append(r)
    _vm_fragments(b, resolved, settings, cache, by_chain)
    first_chain, first_rule = len(b.chains), len(b.rules)
    reject_chains(b, resolved)
    for c in b.chains[first_chain:]:
        by_chain[(c.table, c.name)] = []
    for r in b.rules[first_rule:]:
        by_chain[(r.table, r.chain)].append(r)
    if cache is not None:
        live = {s.elements for s in b.sets.values()}
        cache.elements = {k: v for k, v in cache.elements.items() if v in live}
    rs = Ruleset(
        tables=TABLES,
        chains=tuple(b.chains),
        sets=tuple(b.sets[k] for k in sorted(b.sets)),
        rules=tuple(itertools.chain.from_iterable(by_chain.values())),
    )
    rs.preset_chain_rules(by_chain)
    return rs


MAX_CHANGED_VMS = 64


def _compile_changed_vms(resolved: Resolved, cache: CompileCache) -> Ruleset | None:
    """The previous result with only the VMs whose inputs changed rebuilt, and a `Delta` saying which
    chains and sets that touched. None when the change is of another kind (VMs, networks, settings, DHCP
    clients, reject rules, a VM's chain names, many VMs): the caller compiles everything."""
    prev, settings = cache.prev, resolved.policy.settings
    if prev is None or cache.base is None or cache.reject_vms or len(resolved.vms) != len(cache.last):
        return None
    changed = _changed_vms(resolved, cache)
    if changed is None:
        return None
    if not changed:
        cache.compiled_vms = resolved.vms
        return prev
    flavour = cache.flavour or Flavour.BR_NETFILTER
    b = Builder(settings, cache, flavour)
    rebuilt: list[tuple[VmPolicy, _Key, _VmFragment, list[NftSet]]] = []
    for vp in changed:
        key = _vm_key(vp, settings)
        frag = cache.vms.get(key) or _fragment(vp, settings, cache, flavour)
        before = cache.vms[cache.last[vp.vm.id][2]]
        if [c.name for c in frag.chains] != [c.name for c in before.chains]:
            return None
        rebuilt.append((vp, key, frag, _vm_sets(b, vp)))
    # Nothing below can fail: the cache is updated as it goes.
    by_chain = dict(prev.chain_rules())
    set_map = dict(prev.set_by_key())
    users = cache.set_users
    chains: set[tuple[TableId, str]] = set()
    sets: set[tuple[TableId, str]] = set()
    touched: set[str] = set()
    grown = 0
    for vp, key, frag, vm_sets in rebuilt:
        _, _, old_key, old_sets = cache.last[vp.vm.id]
        for ck, rules in frag.rules.items():
            if by_chain[ck] is not rules and by_chain[ck] != rules:
                grown += len(rules) - len(by_chain[ck])
                by_chain[ck] = rules
                chains.add(ck)
        for name in {n.name for n in old_sets}:
            users[name] -= 1
            touched.add(name)
        for name in {n.name for n in vm_sets}:
            users[name] = users.get(name, 0) + 1
        del cache.vms[old_key]
        cache.vms[key] = frag
        cache.last[vp.vm.id] = (vp, settings, key, vm_sets)
    for name, nset in b.sets.items():
        sk = (nset.table, name)
        have = set_map.get(sk)
        if have is None or have.elements != nset.elements:
            set_map[sk] = nset
            sets.add(sk)
    for name in sorted(n for n in touched if users[n] == 0):
        del users[name]
        del set_map[(BRIDGE, name)]
        sets.add((BRIDGE, name))
    rs = Ruleset(
        tables=prev.tables,
        chains=prev.chains,
        sets=tuple(sorted(set_map.values(), key=lambda s: s.name)) if sets else prev.sets,
        rules=ChainedRules(by_chain, len(prev.rules) + grown) if chains else prev.rules,
        delta=Delta(weakref.ref(prev), frozenset(chains), frozenset(sets)),
    )
    rs.preset_chain_rules(by_chain)
    rs.preset_lookups(prev.chain_by_key(), set_map)
    cache.prev = rs
    cache.compiled_vms = resolved.vms
    return rs


def _changed_vms(resolved: Resolved, cache: CompileCache) -> list[VmPolicy] | None:
    """The VMs whose `VmPolicy` is not the one compiled last; None when a change is not for
    `_compile_changed_vms` (see there)."""
    candidates = _hinted(resolved, cache)
    if (
        candidates is None
        and cache.base is not None
        and cache.base[0] != _base_key(resolved, resolved.policy.settings)
    ):
        return None
    changed: list[VmPolicy] = []
    for vp in resolved.vms if candidates is None else candidates:
        seen = cache.last.get(vp.vm.id)
        if seen is None:
            return None
        if seen[0] is not vp:
            changed.append(vp)
            if len(changed) > MAX_CHANGED_VMS or vp.rejects_in or vp.rejects_out:
                return None
    return changed


def _hinted(resolved: Resolved, cache: CompileCache) -> list[VmPolicy] | None:
    """The VMs that may have changed since the last compile, when the resolve says (`Resolved.changed`,
    relative to the very VMs compiled last) and nothing that `_base_key` holds changed: the other VMs are
    the same objects, so only these need a look. None: look at every VM."""
    base, index, ids = resolved.base, resolved.index, resolved.changed
    if base is None or index is None or ids is None or base is not cache.compiled_vms or cache.base is None:
        return None
    key, policy = cache.base[0], resolved.policy
    if (
        key.vms != policy.vms  # (equal tuples of the very same VMs: a pass of identity checks)
        or key.networks != policy.networks
        or key.settings != policy.settings
        or key.quarantine != resolved.quarantine
    ):
        return None
    out = [resolved.vms[index.order[vid]] for vid in ids]
    for vp in out:
        seen = cache.last.get(vp.vm.id)
        if seen is None or seen[0].dhcp_client != vp.dhcp_client:
            return None
    return out


class _BaseKey(NamedTuple):
    """What the base chains, maps and identity sets depend on."""

    vms: tuple[Vm, ...]
    networks: tuple[Network, ...]
    settings: Settings
    dhcp_clients: tuple[bool, ...]
    quarantine: frozenset[str]


def _base_key(resolved: Resolved, settings: Settings) -> _BaseKey:
    return _BaseKey(
        resolved.policy.vms,
        resolved.policy.networks,
        settings,
        tuple(vp.dhcp_client for vp in resolved.vms),
        resolved.quarantine,
    )


def _vm_sets(b: Builder, vp: VmPolicy) -> list[NftSet]:
    """A VM's address sets (shared by name: always built from the current contents)."""
    out = []
    wanted = [(selector_set_name(e.peer_selectors), e.peers) for e in (*vp.egress, *vp.ingress)]
    wanted += [(_arp_set_name(a), a.peers) for a in vp.arp_sources]
    for name, peers in wanted:
        if peers != ANY:
            if name not in b.sets:
                b.address_set(name, peers)
            out.append(b.sets[name])
    return out


def _arp_set_name(source: ArpSource) -> str:
    """A source's address set: the rule's own, or a set of its own when DHCP's addresses were trimmed."""
    return ("a" if source.trimmed else "") + selector_set_name(source.selectors)


def _fragment(vp: VmPolicy, settings: Settings, cache: CompileCache | None, flavour: Flavour) -> _VmFragment:
    one = Builder(settings, cache, flavour)
    _vm_chains(one, vp)
    rules: dict[tuple[TableId, str], list[Rule]] = {(c.table, c.name): [] for c in one.chains}
    for r in one.rules:
        rules[(r.table, r.chain)].append(r)
    return _VmFragment(one.chains, rules)


def _cached_base_chains(
    b: Builder, resolved: Resolved, settings: Settings, cache: CompileCache | None
) -> None:
    key = _base_key(resolved, settings)
    if cache is not None and cache.base is not None and cache.base[0] == key:
        _, chains, rules, sets = cache.base
        b.chains.extend(chains)
        b.rules.extend(rules)
        b.sets.update(sets)
        return
    n_chains, n_rules, n_sets = len(b.chains), len(b.rules), set(b.sets)
    _base_chains(b, resolved, settings)
    if cache is not None:
        new_sets = {k: v for k, v in b.sets.items() if k not in n_sets}
        cache.base = (key, b.chains[n_chains:], b.rules[n_rules:], new_sets)


def _vm_fragments(
    b: Builder,
    resolved: Resolved,
    settings: Settings,
    cache: CompileCache | None,
    by_chain: dict[tuple[TableId, str], list[Rule]],
) -> None:
    """Every VM's chains and address sets, from the cache when the VM's inputs did not change."""
    used: dict[_Key, _VmFragment] = {}
    last: dict[str, tuple[VmPolicy, Settings, _Key, list[NftSet]]] = {}
    for vp in sorted(resolved.vms, key=lambda v: vm_sid(v.vm.id)):
        seen = cache.last.get(vp.vm.id) if cache is not None else None
        if seen is not None and seen[0] is vp and seen[1] == settings:
            # The very same VmPolicy object as last time (an incremental resolve): its key and its address
            # sets are those of last time, no hashing and no set building.
            key, vm_sets = seen[2], seen[3]
            for nset in vm_sets:
                b.sets.setdefault(nset.name, nset)
        else:
            key = _vm_key(vp, settings)
            vm_sets = _vm_sets(b, vp)
        hit = cache.vms.get(key) if cache is not None else None
        if hit is None:
            hit = _fragment(vp, settings, cache, b.flavour)
        used[key] = hit
        last[vp.vm.id] = (vp, settings, key, vm_sets)
        b.chains.extend(hit.chains)
        by_chain.update(hit.rules)
    if cache is not None:
        cache.vms = used
        cache.last = last


def _conntrack_marker(b: Builder, mark: int) -> None:
    """The bridge family has no conntrack here: br_netfilter runs the inet hooks for bridged IPv4, so the
    inet table asks conntrack and leaves the answer in one bit of the packet mark for the bridge chains."""
    keep = 0xFFFFFFFF & ~mark
    for name, hook in (("pre", "prerouting"), ("out", "output")):
        b.chain(INET, name, hook=hook, priority=-150, policy="accept")
        b.rule(
            INET,
            name,
            "sys:ct-mark",
            [
                x.match({"ct": {"key": "state"}}, [2, 4], op="in"),  # established, related,
                {"mangle": {"key": x.meta("mark"), "value": {"|": [x.meta("mark"), mark]}}},
                x.ACCEPT,
            ],
        )
        b.rule(
            INET,
            name,
            "sys:ct-clear",
            [
                {"mangle": {"key": x.meta("mark"), "value": {"&": [x.meta("mark"), keep]}}},
            ],
        )


def _base_chains(b: Builder, resolved: Resolved, settings: Settings) -> None:
    uplinks = sorted({u for n in resolved.policy.networks for u in n.uplinks})
    for map_name, suffix in ((GUARD_MAP, "guard"), (OUT_MAP, "out"), (IN_MAP, "in")):
        entries: dict[str, JSON] = dict.fromkeys(uplinks, x.ACCEPT)
        entries.update({vp.vm.port: x.jump(f"{vm_sid(vp.vm.id)}_{suffix}") for vp in resolved.vms})
        b.verdict_map(map_name, entries)
    mark = settings.conntrack_mark
    _guard(b, resolved, uplinks)
    b.chain(BRIDGE, "egress", hook="prerouting", priority=10, policy="drop")
    _quarantine(b, resolved)
    learners = [vp for vp in resolved.vms if is_learning(vp)]
    if learners:
        _learn_dispatch(b, learners, mark)
    # The established shortcut runs for nearly every packet: no counter here (the bench measured ~2-3 % of
    # small-packet rate for the counters on this path); per-rule counters are on the decisions.
    b.rule(BRIDGE, "egress", "sys:est", [established(b), x.ACCEPT])
    if b.flavour is Flavour.BRIDGE_NATIVE:
        _bridge_cap_dispatch(b, resolved.vms)
        _routed_cap_dispatch(b, resolved.policy.networks, resolved.vms)
    b.rule(BRIDGE, "egress", "sys:reject-arp", _reject_arp(outbound=True))
    b.rule(BRIDGE, "egress", "sys:dispatch", [x.vmap("iifname", OUT_MAP)])
    b.logged_drop(BRIDGE, "egress", "sys:unknown-port", log_prefix("-", "out", "deny", "sys:unknown-port"))
    b.chain(BRIDGE, "ingress", hook="postrouting", priority=10, policy="drop")
    if uplinks:  # a tagged frame from a trunk never reaches a VM (VMs' own tagged frames died at the guard)
        _vlan_drop(b, "ingress", "in", uplinks)
    if learners:
        b.rule(
            BRIDGE,
            "ingress",
            "sys:dhcp-learn",
            [
                established(b),
                *_dhcp_udp(sport=67, dport=68),
                x.vmap("oifname", LEARN_IN_MAP),
            ],
        )
    b.rule(BRIDGE, "ingress", "sys:est", [established(b), x.ACCEPT])
    if b.flavour is Flavour.BRIDGE_NATIVE:
        _reject_answers(b, mark)
    b.rule(BRIDGE, "ingress", "sys:reject-arp", _reject_arp(outbound=False))
    b.rule(BRIDGE, "ingress", "sys:dispatch", [x.vmap("oifname", IN_MAP)])
    b.logged_drop(BRIDGE, "ingress", "sys:unknown-port", log_prefix("-", "in", "deny", "sys:unknown-port"))
    if b.flavour is Flavour.BR_NETFILTER:
        _cap_dispatch(b, resolved.policy.networks, resolved.vms)


def _guard(b: Builder, resolved: Resolved, uplinks: list[str]) -> None:
    """The guard (bridge prerouting -300): what a port may send at all, before any rule or conntrack: no
    VLAN tags from VM ports, each VM port's identity (anti-spoofing), the chaddr of its DHCP requests."""
    # Identity of every VM port: (port, MAC, address) for IPv4, (port, MAC, ARP sender MAC, ARP sender
    # address) for ARP, (port, MAC) for VMs allowed to ask for a DHCP lease from 0.0.0.0.
    ident_ip: list[str] = []
    ident_arp: list[str] = []
    dhcp: list[str] = []
    for vp in resolved.vms:
        v = vp.vm
        ident_ip.extend(dump({"concat": [v.port, v.mac, str(ip)]}) for ip in v.ips)
        ident_arp.extend(dump({"concat": [v.port, v.mac, v.mac, str(ip)]}) for ip in v.ips)
        if vp.dhcp_client:
            dhcp.append(dump({"concat": [v.port, v.mac]}))
    b.sets["ident_ip"] = NftSet(
        BRIDGE, "ident_ip", "ifname . ether_addr . ipv4_addr", (), None, frozenset(ident_ip)
    )
    b.sets["ident_arp"] = NftSet(
        BRIDGE, "ident_arp", "ifname . ether_addr . ether_addr . ipv4_addr", (), None, frozenset(ident_arp)
    )
    b.sets["dhcp_clients"] = NftSet(BRIDGE, "dhcp_clients", "ifname . ether_addr", (), None, frozenset(dhcp))
    b.sets[REJECT_ARP_SET] = NftSet(BRIDGE, REJECT_ARP_SET, REJECT_ARP_TYPE, (), None, frozenset())
    port_mac = [x.meta("iifname"), x.payload("ether", "saddr")]
    b.chain(BRIDGE, "guard", hook="prerouting", priority=-300, policy="drop")
    _vlan_drop(b, "guard", "out", uplinks)
    _chaddr_dispatch(b, resolved)
    b.rule(
        BRIDGE,
        "guard",
        "sys:ident-ip",
        [x.match({"concat": [*port_mac, x.payload("ip", "saddr")]}, "@ident_ip"), x.ACCEPT],
    )
    b.rule(
        BRIDGE,
        "guard",
        "sys:ident-arp",
        [
            x.match(
                {"concat": [*port_mac, x.payload("arp", "saddr ether"), x.payload("arp", "saddr ip")]},
                "@ident_arp",
            ),
            x.ACCEPT,
        ],
    )
    b.rule(
        BRIDGE,
        "guard",
        "sys:dhcp-discover",
        [
            x.match({"concat": port_mac}, "@dhcp_clients"),
            x.match(x.payload("ip", "saddr"), "0.0.0.0"),  # noqa: S104 - DHCPDISCOVER source
            x.match(x.payload("ip", "daddr"), "255.255.255.255"),
            x.match(x.payload("udp", "sport"), 68),
            x.match(x.payload("udp", "dport"), 67),
            x.ACCEPT,
        ],
    )
    b.rule(BRIDGE, "guard", "sys:dispatch", [x.vmap("iifname", GUARD_MAP)])
    b.logged_drop(BRIDGE, "guard", "sys:unknown-port", log_prefix("-", "out", "deny", "sys:unknown-port"))


LEARN_IN_MAP, LEARN_OUT_MAP = "learn_in", "learn_out"
DHCP_MAP = "dhcp_ports"  # VM port -> its `<vm>_dhcp` chain (the chaddr guard)
# Offsets (bits) from the transport header: the UDP header is 8 bytes, then the BOOTP message.
BOOTP_HTYPE_HLEN = {"payload": {"base": "th", "offset": (8 + 1) * 8, "len": 16}}  # htype, hlen
BOOTP_CHADDR = {"payload": {"base": "th", "offset": (8 + 28) * 8, "len": 48}}  # chaddr's first 6 bytes
ETHERNET_HTYPE_HLEN = 0x0106  # htype 1 (Ethernet), hlen 6


def is_learning(vp: VmPolicy) -> bool:
    """Does the VM learn its addresses from DHCP (no `ips` in the policy) and may it ask for a lease?"""
    return vp.vm.learns and vp.dhcp_client


def _dhcp_udp(*, sport: int, dport: int) -> list[JSON]:
    return [x.match(x.payload("udp", "sport"), sport), x.match(x.payload("udp", "dport"), dport)]


def _learn_dispatch(b: Builder, learners: list[VmPolicy], mark: int) -> None:
    """Where the DHCP messages of VMs that learn their addresses are logged for the lease learner
    (`settings.learn_group`), before the established shortcut would accept them unseen. What such a VM
    sends to a server's port goes to `<vm>_lrn_out` (a release: the VM gives an address up, which only
    takes a right away, so every one counts). What a server sends it as part of a known flow (a renewal's
    answer: conntrack saw the request) goes to `<vm>_lrn_in`, which logs it only from the servers the VM's
    `dhcp` rules name; the first packet of a new flow is logged in `<vm>_in` itself, right before the rule
    that accepts it (`_entry_rules`), so an answer that the VM's rules do not accept teaches nothing."""
    b.verdict_map(LEARN_OUT_MAP, {vp.vm.port: x.jump(f"{vm_sid(vp.vm.id)}_lrn_out") for vp in learners})
    b.verdict_map(LEARN_IN_MAP, {vp.vm.port: x.jump(f"{vm_sid(vp.vm.id)}_lrn_in") for vp in learners})
    b.rule(
        BRIDGE,
        "egress",
        "sys:dhcp-learn",
        [*_dhcp_udp(sport=68, dport=67), x.vmap("iifname", LEARN_OUT_MAP)],
    )


def _learn_chains(b: Builder, vp: VmPolicy, sid: str) -> None:
    """The VM's `_lrn_out` (all it sends to a server's port) and `_lrn_in` (a known flow's answers from the
    servers of its `dhcp` rules) chains: log to the learn group, within the log rate; they decide nothing."""
    s = b.settings
    out, inn = f"{sid}_lrn_out", f"{sid}_lrn_in"
    b.chain(BRIDGE, out)
    b.chain(BRIDGE, inn)
    rate = x.limit(s.log_rate_per_second, s.log_burst)
    b.rule(
        BRIDGE,
        out,
        "sys:dhcp-learn",
        [rate, x.log(log_prefix(sid, "out", "learn", "sys:dhcp-learn"), s.learn_group)],
    )
    for entry in vp.ingress:
        for _, comment, matches in _learn_matches(vp, entry):
            b.rule(
                BRIDGE,
                inn,
                comment,
                [
                    *matches,
                    rate,
                    x.log(log_prefix(sid, "in", "learn", comment.removesuffix(":learn")), s.learn_group),
                ],
            )


def _learn_matches(vp: VmPolicy, entry: Entry) -> list[tuple[object, str, list[JSON]]]:
    """For an ingress entry that accepts a DHCP server's answers into a learning VM: (service, the learn
    rule's comment, its matches) per DHCP service of the entry; nothing for any other entry."""
    if not is_learning(vp) or entry.direction is not Direction.IN or entry.action is not Action.ALLOW:
        return []
    out: list[tuple[object, str, list[JSON]]] = []
    for service in entry.services:
        if service in DHCP_SERVICES and is_dhcp_client(service, entry.direction, paired=entry.paired):
            n = entry.rule.services.index(service) + 1
            comment = f"rule:{entry.rule.id}#{n}" + (":pair" if entry.paired else "") + ":learn"
            peer = (
                []
                if entry.peers == ANY
                else [x.match(x.payload("ip", "saddr"), f"@{selector_set_name(entry.peer_selectors)}")]
            )
            out.append((service, comment, [*_dhcp_udp(sport=67, dport=68), *peer]))
    return out


def _reject_arp(*, outbound: bool) -> list[JSON]:
    """ARP between a VM and its gateway when the host may have to answer the VM's packets with an ICMP error
    (a reject rule; the set's elements come from ruleset/reject.py, port . gateway . VM address)."""
    own, gateway = ("saddr ip", "daddr ip") if outbound else ("daddr ip", "saddr ip")
    key = [x.meta("iifname" if outbound else "oifname"), x.payload("arp", gateway), x.payload("arp", own)]
    return [x.match({"concat": key}, f"@{REJECT_ARP_SET}"), x.COUNTER, x.ACCEPT]


def _vlan_drop(b: Builder, base: str, side: str, uplinks: list[str]) -> None:
    """A VM port is an access port: a frame with an 802.1Q or 802.1ad tag is dropped on its way from a VM
    (`guard`, first: before the identity checks, which would judge it by the IPv4 header inside the tag) or
    to one (`ingress`). Uplinks are trunks: they may send and get tagged frames. One compare for an untagged
    frame; the drop is logged (with the port, like an unknown port's) and counted in `vlan_<side>`. (Not in
    each VM's chains: a rule per VM that matches the two tags costs the kernel a set per rule, +1 s per full
    load at 1,000 VMs.)"""
    chain = f"vlan_{side}"
    key = "iifname" if side == "out" else "oifname"
    not_uplink = [x.match(x.meta(key), x.anon_set(list(uplinks)), op="!=")] if uplinks else []
    b.rule(BRIDGE, base, "sys:vlan-tagged", [x.vlan_tagged(), *not_uplink, x.goto(chain)])
    b.chain(BRIDGE, chain)
    b.logged_drop(BRIDGE, chain, "sys:vlan", log_prefix("-", side, "deny", "sys:vlan"))


def _cap_dispatch(b: Builder, networks: tuple[Network, ...], vms: tuple[VmPolicy, ...]) -> None:
    """Every new connection a VM opens, or that is opened towards it, passes the VM's connection cap (its
    `<vm>_cap` chain); a connection between two VMs passes both. After the conntrack marker in `pre`, so
    packets of established connections never get here. Conntrack exists only in the inet family: bridged
    IPv4 arrives here through br_netfilter with the bridge as input interface, so the sender is known by
    its source address, which the bridge guard (-300, before br_netfilter) has already checked; the
    bridge match keeps routed senders (the outside) from spending a VM's cap with its address. Only a
    connection's first packet is looked at (its conntrack entry not confirmed yet): later packets of a
    tracked connection, answered or not, never meet the cap, and a refused connection never gets an entry.
    The host's own connections (the `out` chain) are not counted."""
    entries: dict[str, JSON] = {str(ip): x.jump(f"{vm_sid(vp.vm.id)}_cap") for vp in vms for ip in vp.vm.ips}
    b.verdict_map(CAP_MAP, entries, table=INET, key_type="ipv4_addr")
    new = x.ct_unconfirmed()
    bridges = x.anon_set(sorted({n.bridge for n in networks}))
    b.rule(
        INET,
        "pre",
        "sys:ct-cap-out",
        [new, x.match(x.meta("iifname"), bridges), x.payload_vmap("ip", "saddr", CAP_MAP)],
    )
    b.rule(INET, "pre", "sys:ct-cap-in", [new, x.payload_vmap("ip", "daddr", CAP_MAP)])


def _reject_answers(b: Builder, mark: int) -> None:
    """bridge_native: a bridge `reject` answers (TCP reset, ICMP error) through the bridge's output and
    postrouting hooks towards the sender's port, as a frame the host made with no conntrack entry; the
    sender's `ingress` rules would drop it as a new flow. The `answers` chain (bridge output) marks such
    frames (IPv4 without a conntrack entry: what the host routes to a VM always has one) with the mark bit
    that br_netfilter's flavour uses for "established"; `ingress` accepts them. A VM cannot set the bit: the
    mark is cleared when its frame crosses into the bridges' namespace, and its frames never pass output."""
    b.chain(BRIDGE, "answers", hook="output", priority=0, policy="accept")
    b.rule(
        BRIDGE,
        "answers",
        "sys:reject-answer",
        [
            x.match({"ct": {"key": "state"}}, 1, op="in"),  # invalid: no conntrack entry
            x.match(x.payload("ip", "version"), 4),
            {"mangle": {"key": x.meta("mark"), "value": {"|": [x.meta("mark"), mark]}}},
        ],
    )
    b.rule(BRIDGE, "ingress", "sys:reject-answer", [x.mark_is_set(mark), x.COUNTER, x.ACCEPT])


def _bridge_cap_dispatch(b: Builder, vms: tuple[VmPolicy, ...]) -> None:
    """bridge_native: the connection caps in the bridge's `egress` chain (prerouting +10: after bridge
    conntrack at -200, before it confirms the connection at postrouting), right after the established
    shortcut, so only a connection's first packet gets here. What a VM sends is known by its port
    (`cap_ports`), what is sent to a VM by the destination address (`cap_vms`): a connection between two
    VMs passes both caps. Routed connections towards a VM (from the host's IP stack) leave the bridge
    already confirmed by inet conntrack and are not counted."""
    b.verdict_map(CAP_PORTS, {vp.vm.port: x.jump(f"{vm_sid(vp.vm.id)}_cap") for vp in vms})
    entries: dict[str, JSON] = {str(ip): x.jump(f"{vm_sid(vp.vm.id)}_cap") for vp in vms for ip in vp.vm.ips}
    b.verdict_map(CAP_MAP, entries, key_type="ipv4_addr")
    new = x.ct_unconfirmed()
    b.rule(BRIDGE, "egress", "sys:ct-cap-out", [new, x.vmap("iifname", CAP_PORTS)])
    b.rule(BRIDGE, "egress", "sys:ct-cap-in", [new, x.payload_vmap("ip", "daddr", CAP_MAP)])


ROUTED_CAP_MAP = (
    "icap_vms"  # bridge_native: VM address -> jump the VM's inet `<vm>_cap` (set names are unique)
)
ROUTED_CAP_CHAIN = "cap_fwd"


def _routed_cap_dispatch(b: Builder, networks: tuple[Network, ...], vms: tuple[VmPolicy, ...]) -> None:
    """bridge_native: connections routed towards a VM (from the outside, through the host's IP stack) get
    their conntrack entry from inet conntrack, which confirms it at inet postrouting, before the packet
    reaches the bridge: the bridge's cap rules (`ct status ! confirmed`) never see them. They are capped
    here, in inet `forward` (priority -10: after conntrack, before `reject_fwd` at 0 and before the
    confirmation), by destination address, in the VM's inet `<vm>_cap` chain: a list of its own, as large
    as the cap (docs/host.md: what counts where). Packets routed from a managed bridge (a VM towards a VM of
    another network) are left alone: the bridge's `egress` counted them for both VMs already."""
    entries: dict[str, JSON] = {str(ip): x.jump(f"{vm_sid(vp.vm.id)}_cap") for vp in vms for ip in vp.vm.ips}
    b.verdict_map(ROUTED_CAP_MAP, entries, table=INET, key_type="ipv4_addr")
    b.chain(INET, ROUTED_CAP_CHAIN, hook="forward", priority=-10, policy="accept")
    bridges = x.anon_set(sorted({n.bridge for n in networks}))
    b.rule(
        INET,
        ROUTED_CAP_CHAIN,
        "sys:ct-cap-in",
        [
            x.ct_unconfirmed(),
            x.match(x.meta("iifname"), bridges, op="!="),
            x.payload_vmap("ip", "daddr", ROUTED_CAP_MAP),
        ],
    )


def _quarantine(b: Builder, resolved: Resolved) -> None:
    """Quarantined VMs (isolated by the agent monitor): their ports are dropped first in both base chains,
    before the established shortcut, so open connections stop too; only the agent's own flow to the host's
    agent endpoint (if the policy names one) still passes. Only present while some VM is quarantined."""
    if not resolved.quarantine:
        return
    ports = frozenset(dump(vp.vm.port) for vp in resolved.vms if vp.vm.id in resolved.quarantine)
    b.sets["quarantine"] = NftSet(BRIDGE, "quarantine", "ifname", (), None, ports)
    endpoint = resolved.policy.settings.agent_endpoint
    for base, side, key in (("egress", "out", "iifname"), ("ingress", "in", "oifname")):
        member = x.match(x.meta(key), "@quarantine")
        if endpoint is None:
            b.rule(BRIDGE, base, "sys:quarantine", [member, x.COUNTER, x.DROP])
            continue
        chain = f"quarantine_{side}"
        b.chain(BRIDGE, chain)
        b.rule(BRIDGE, base, "sys:quarantine", [member, x.jump(chain)])
        b.rule(BRIDGE, chain, "sys:agent", [*_agent_flow(endpoint, outbound=side == "out"), x.RETURN])
        arp_field = "daddr ip" if side == "out" else "saddr ip"  # and ARP with the endpoint's address
        b.rule(
            BRIDGE, chain, "sys:agent-arp", [x.match(x.payload("arp", arp_field), str(endpoint[0])), x.RETURN]
        )
        b.rule(BRIDGE, chain, "sys:quarantine", [x.COUNTER, x.DROP])


def _agent_flow(endpoint: tuple[IPv4Address, int], *, outbound: bool) -> list[JSON]:
    """The agent's TCP+TLS flow to the host's endpoint (outbound) or its replies."""
    addr, port = endpoint
    return [
        x.match(x.payload("ip", "daddr" if outbound else "saddr"), str(addr)),
        x.match(x.payload("tcp", "dport" if outbound else "sport"), port),
    ]


def _vm_chains(b: Builder, vp: VmPolicy) -> None:
    sid = vm_sid(vp.vm.id)
    guard, out, inn = f"{sid}_guard", f"{sid}_out", f"{sid}_in"
    for name in (guard, out, inn):
        b.chain(BRIDGE, name)

    # Anti-spoofing happens in the guard base chain, one set lookup per frame (`ident_ip`, `ident_arp`,
    # `dhcp_clients`); a frame that fails it is dispatched here to be logged and dropped.
    b.logged_drop(BRIDGE, guard, "sys:spoof", log_prefix(sid, "out", "spoof", "sys:spoof"))
    _chaddr_chain(b, vp, sid)

    endpoint = b.settings.agent_endpoint
    if endpoint is not None:  # the agent's channel to the host, whatever the policy says
        b.rule(BRIDGE, out, "sys:agent", [*_agent_flow(endpoint, outbound=True), x.COUNTER, x.ACCEPT])
    if vp.shielded:
        _shield_rules(b, vp, sid, inn)
    _flood_rules(b, sid, out, "out", vp.limits_out)
    _flood_rules(b, sid, inn, "in", vp.limits_in)
    if not vp.dhcp_server:
        b.rule(
            BRIDGE,
            out,
            "sys:no-dhcp-server",
            [
                x.match(x.payload("udp", "sport"), 67),
                x.match(x.payload("udp", "dport"), 68),
                x.COUNTER,
                x.DROP,
            ],
        )
    for chain, entries in ((out, vp.egress), (inn, vp.ingress)):
        for entry in entries:
            _entry_rules(b, vp, sid, chain, entry)
    if is_learning(vp):
        _learn_chains(b, vp, sid)
    # ARP with the peers of the allow rules (their shared address sets) and, for routed peers, the gateway.
    subnet: JSON = {"prefix": {"addr": str(vp.subnet.network_address), "len": vp.subnet.prefixlen}}
    arp_peers: list[tuple[str, JSON]] = [
        (f"sys:arp#{k}", subnet if a.is_any else f"@{_arp_set_name(a)}")
        for k, a in enumerate(vp.arp_sources, start=1)
    ]
    if vp.arp_gateway and vp.gateway is not None:
        arp_peers.append(("sys:arp-gw", str(vp.gateway)))
    if endpoint is not None and endpoint[0] in vp.subnet:  # the agent endpoint is on the VM's own subnet
        arp_peers.append(("sys:arp-agent", str(endpoint[0])))
    for comment, peer in arp_peers:
        b.rule(BRIDGE, out, comment, [x.match(x.payload("arp", "daddr ip"), peer), x.COUNTER, x.ACCEPT])
        if not vp.vm.ips:  # no address (yet): nobody can ARP for it
            continue
        b.rule(
            BRIDGE,
            inn,
            comment,
            [
                x.match(x.payload("arp", "saddr ip"), peer),
                x.match(x.payload("arp", "daddr ip"), own_ips(vp)),
                x.COUNTER,
                x.ACCEPT,
            ],
        )
    b.logged_drop(BRIDGE, out, "sys:default-deny", log_prefix(sid, "out", "deny", "sys:default-deny"))
    b.logged_drop(BRIDGE, inn, "sys:default-deny", log_prefix(sid, "in", "deny", "sys:default-deny"))
    _cap_chains(b, vp, sid)


def _chaddr_dispatch(b: Builder, resolved: Resolved) -> None:
    """A DHCP request's client hardware address (`chaddr`) must be the VM's own MAC: the guard sends every
    UDP 68 -> 67 frame from a VM's port to `<vm>_dhcp` before any identity accept (a renewal from the VM's
    own address would pass `sys:ident-ip`, a DISCOVER `sys:dhcp-discover`). Two compares per frame on the
    guard's path; only DHCP requests go further."""
    b.verdict_map(DHCP_MAP, {vp.vm.port: x.jump(f"{vm_sid(vp.vm.id)}_dhcp") for vp in resolved.vms})
    b.rule(
        BRIDGE, "guard", "sys:dhcp-dispatch", [*_dhcp_udp(sport=68, dport=67), x.vmap("iifname", DHCP_MAP)]
    )


def _chaddr_chain(b: Builder, vp: VmPolicy, sid: str) -> None:
    """`<vm>_dhcp`: every DHCP request the VM sends (UDP 68 -> 67, the guard's `sys:dhcp-chaddr` jumps
    here) must name the VM's own MAC as its client (BOOTP htype 1, hlen 6, `chaddr` = the port's MAC), or
    it is logged and dropped: a VM cannot ask for (and exhaust) leases in other MACs' names, nor have a
    server record a lease for another VM's MAC. Written as "own MAC -> return, anything else -> drop", so a
    message too short to hold a chaddr (the kernel cannot read the field: no match) is dropped too."""
    chain = f"{sid}_dhcp"
    b.chain(BRIDGE, chain)
    b.rule(
        BRIDGE,
        chain,
        "sys:dhcp-chaddr-own",
        [
            x.match(BOOTP_HTYPE_HLEN, ETHERNET_HTYPE_HLEN),
            x.match(BOOTP_CHADDR, int(vp.vm.mac.replace(":", ""), 16)),
            x.COUNTER,
            x.RETURN,
        ],
    )
    b.logged_drop(BRIDGE, chain, "sys:dhcp-chaddr", log_prefix(sid, "out", "spoof", "sys:dhcp-chaddr"))


def _cap_chains(b: Builder, vp: VmPolicy, sid: str) -> None:
    """The VM's connection cap: one `ct count` rule (one list of connections per VM, whichever way they
    were opened); beyond the cap, log within the log rate (direction: the VM sent it, or it was sent to
    the VM) and drop, counted in `sys:ct-cap`. bridge_native has two such pairs of chains per VM, each with
    a list of the cap's size: the bridge's (what the VM opens, what other VMs open to it) and the inet
    table's (what is routed to it from elsewhere: `_routed_cap_dispatch`); a `ct count` list belongs to one
    rule, and no rule sees both kinds of connection before conntrack confirms them."""
    if b.flavour is Flavour.BRIDGE_NATIVE:
        _cap_chain_pair(b, vp, sid, BRIDGE, (("out", "saddr"), ("in", "daddr")))
        _cap_chain_pair(b, vp, sid, INET, (("in", "daddr"),))  # routed towards the VM: `cap_fwd`
    else:
        _cap_chain_pair(b, vp, sid, INET, (("out", "saddr"), ("in", "daddr")))


def _cap_chain_pair(
    b: Builder, vp: VmPolicy, sid: str, table: TableId, directions: tuple[tuple[str, str], ...]
) -> None:
    cap, drop = f"{sid}_cap", f"{sid}_cap_drop"
    b.chain(table, cap)
    b.chain(table, drop)
    b.rule(table, cap, "sys:ct-count", [x.ct_count_over(vp.connection_cap.connections), x.goto(drop)])
    if vp.connection_cap.log and vp.vm.ips:
        s = b.settings
        for direction, field in directions:
            b.rule(
                table,
                drop,
                f"sys:ct-cap:{direction}:log",
                [
                    x.match(x.payload("ip", field), own_ips(vp)),
                    x.limit(s.log_rate_per_second, s.log_burst),
                    x.log(log_prefix(sid, direction, "cap", "sys:ct-cap"), s.nflog_group),
                ],
            )
    b.rule(table, drop, "sys:ct-cap", [x.COUNTER, x.DROP])


def _shield_rules(b: Builder, vp: VmPolicy, sid: str, inn: str) -> None:
    """A shielded VM (an overlay: policy/overlays.py): first in `<vm>_in`, which only sees what is not part
    of an established flow (the base chain's shortcut took those, in both flavours), every IPv4 packet is
    logged (within the log rate) and dropped: no new inbound flow reaches the VM, while its established
    flows and the replies to its own outbound go on. ARP is not dropped (the VM's own flows need its
    neighbours' answers); for a DHCP client, the server's answers (UDP to port 68) go on to its rules."""
    s = b.settings
    ipv4 = x.match(x.payload("ip", "version"), 4)
    keep: list[list[JSON]] = [[]]
    if vp.dhcp_client:  # two rules: not UDP, or UDP not to 68 (a negated port match needs UDP first)
        keep = [
            [x.match(x.meta("l4proto"), 17, op="!=")],
            [x.match(x.payload("udp", "dport"), 68, op="!=")],
        ]
    prefix = log_prefix(sid, "in", "deny", "sys:shield")
    for n, matches in enumerate(keep, start=1):
        comment = "sys:shield" if n == 1 else f"sys:shield#{n}"  # comments are unique in a chain
        b.rule(
            BRIDGE,
            inn,
            comment + ":log",
            [ipv4, *matches, x.limit(s.log_rate_per_second, s.log_burst), x.log(prefix, s.nflog_group)],
        )
        b.rule(BRIDGE, inn, comment, [ipv4, *matches, x.COUNTER, x.DROP])


def _flood_rules(b: Builder, sid: str, chain: str, direction: str, limits: tuple[FloodLimit, ...]) -> None:
    """First in a VM chain, which only sees packets of flows that are not established yet: beyond the
    limit, drop (and log, within the usual log rate). Only IPv4 counts (new flows): ARP never spends the
    limit's tokens (the `ip version` match comes first), so a flood cannot starve the neighbour resolution
    of the VM's established flows."""
    s = b.settings
    ipv4 = x.match(x.payload("ip", "version"), 4)
    for lim in limits:
        comment = f"sys:flood:{lim.id}"
        over = x.limit_over(lim.rate, lim.burst)
        if lim.log:
            prefix = log_prefix(sid, direction, "flood", comment)
            b.rule(
                BRIDGE,
                chain,
                comment + ":log",
                [ipv4, over, x.limit(s.log_rate_per_second, s.log_burst), x.log(prefix, s.nflog_group)],
            )
        b.rule(BRIDGE, chain, comment, [ipv4, over, x.COUNTER, x.DROP])


def _entry_rules(b: Builder, vp: VmPolicy, sid: str, chain: str, entry: Entry) -> None:
    rule = entry.rule
    peer_field = "daddr" if entry.direction is Direction.OUT else "saddr"
    peer: JSON | None = None
    if entry.peers != ANY:  # the set itself is added by compile_ruleset
        peer = x.match(x.payload("ip", peer_field), f"@{selector_set_name(entry.peer_selectors)}")
    arp_peer = None if peer is None else peer["match"]["right"]
    verdict = x.ACCEPT if rule.action is Action.ALLOW else x.DROP
    learn = {service: (comment, matches) for service, comment, matches in _learn_matches(vp, entry)}
    for service in entry.services:
        if service == ARP_SERVICE and entry.direction is Direction.IN and not vp.vm.ips:
            continue  # ARP for the VM's own address, and it has none (yet)
        n = rule.services.index(service) + 1
        if service in learn:  # a learning VM: the server's answer is logged for the lease learner first
            learn_comment, learn_matches = learn[service]
            s = b.settings
            b.rule(
                BRIDGE,
                chain,
                learn_comment,
                [
                    *learn_matches,
                    x.limit(s.log_rate_per_second, s.log_burst),
                    x.log(
                        log_prefix(sid, "in", "learn", learn_comment.removesuffix(":learn")), s.learn_group
                    ),
                ],
            )
        matches = service_matches(service, entry.direction, peer, arp_peer, vp, paired=entry.paired)
        comment = f"rule:{rule.id}#{n}" + (":pair" if entry.paired else "")
        if rule.log:
            s = b.settings
            prefix = log_prefix(sid, entry.direction.value, rule.action.value, comment)
            b.rule(
                BRIDGE,
                chain,
                comment + ":log",
                [*matches, x.limit(s.log_rate_per_second, s.log_burst), x.log(prefix, s.nflog_group)],
            )
        b.rule(BRIDGE, chain, comment, [*matches, x.COUNTER, verdict])
