"""Reject rules (`action: reject`). Pure.

The bridge family cannot reject on this kernel, so a reject is answered where the sender's packet first
meets a hook that can:

* **A VM on this host sends** (`netdev hyperfence`): a netdev ingress chain on the *sender's* port sees every
  frame the VM sends before the bridge does, and `reject` there answers the sender. It repeats the sender's
  egress rules in order (allow/deny only pass the frame on to the bridge, which decides as usual), and after
  an allow asks the receiver's ingress rules the same question through a map from destination address to
  that VM's reject chain (`reject_dst`).
* **Anyone else sends** (`inet hyperfence`, only while some VM has an ingress reject): a routed sender
  (`outside`) passes the `forward` hook, the host's own packets the `output` hook. Two base chains dispatch
  by destination VM address (`ireject_dst`) to per-receiver chains that repeat the receiver's ingress rules.
  With br_netfilter, bridged IPv4 passes the inet `forward` hook too, with the bridge as input interface:
  those packets (between VMs, and from VMs to the outside) are the netdev chains' business, so the forward
  chain lets them go with one compare before anything else. Packets of established connections pass (the
  conntrack mark bit, as in the bridge chains), so a reject added later never cuts a flow the bridge keeps
  passing. Packets for the host's own addresses are not VM traffic and find no entry in the map.

Both answer like this: TCP reset for a new TCP connection (SYN without ACK), ICMP port unreachable for UDP,
ICMP administratively prohibited otherwise. Rules that are not rejects never change a verdict here: allow and
deny only `return`, so the bridge chains stay the only place that allows.
"""

from __future__ import annotations

import hashlib

from hyperfence.model.policy import L4, Action, Direction, NamedService, PortService, Service, SpecialService
from hyperfence.policy.resolve import ANY, Entry, Resolved, VmPolicy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.build import (
    INET,
    NETDEV,
    REJECT_DST_MAP,
    Builder,
    dump,
    own_ips,
    selector_set_name,
    service_matches,
    vm_sid,
)
from hyperfence.ruleset.ir import JSON, NftSet, TableId

INET_REJECT_MAP = "ireject_dst"
"""The inet table's map from a receiver VM's address to its reject chain (set names are unique per compile,
whatever their table, hence the prefix)."""
FORWARD_CHAIN, OUTPUT_CHAIN = "reject_fwd", "reject_out"
_SET_PREFIX = {NETDEV: "n", INET: "i"}


def _reject_verdict(service: Service) -> list[JSON]:
    match service:
        case PortService(L4.TCP, _):
            syn_only = x.match(
                {"&": [x.payload("tcp", "flags"), [2, 16]]}, 2
            )  # SYN without ACK: a new connection
            return [syn_only, x.COUNTER, {"reject": {"type": "tcp reset"}}]
        case PortService(L4.UDP, _):
            return [x.COUNTER, {"reject": {"type": "icmp", "expr": 3}}]  # port unreachable
    return [x.COUNTER, {"reject": {"type": "icmp", "expr": 13}}]  # administratively prohibited


def _peer_match(b: Builder, table: TableId, entry: Entry) -> JSON | None:
    """`ip daddr|saddr @<set>` for the entry's peers (the set in `table`), None when they are any."""
    if entry.peers == ANY:
        return None
    name = _SET_PREFIX[table] + selector_set_name(entry.peer_selectors)
    b.address_set(name, entry.peers, table)
    field = "daddr" if entry.direction is Direction.OUT else "saddr"
    return x.match(x.payload("ip", field), f"@{name}")


def _reject_entries(
    b: Builder, table: TableId, *, vp: VmPolicy, chain: str, entries: tuple[Entry, ...], on_allow: JSON
) -> None:
    """Repeat `entries` in order in `chain`: rejects reject, allows do `on_allow`, denies return."""
    for entry in entries:
        if entry.paired:
            continue
        peer = _peer_match(b, table, entry)
        for service in entry.services:
            if isinstance(service, NamedService) and service.kind is not SpecialService.ANY:
                continue  # ARP and DHCP are never rejected
            n = entry.rule.services.index(service) + 1
            matches = service_matches(service, entry.direction, peer, None, vp)
            comment = f"rule:{entry.rule.id}#{n}"
            if entry.action is Action.REJECT:
                b.rule(table, chain, comment, [*matches, *_reject_verdict(service)])
                b.rule(table, chain, comment + ":rest", [*matches, x.RETURN])
            elif entry.action is Action.ALLOW:
                b.rule(table, chain, comment, [*matches, on_allow])
            else:
                b.rule(table, chain, comment, [*matches, x.RETURN])


def _receiver_chains(b: Builder, table: TableId, *, map_name: str, receivers: list[VmPolicy]) -> None:
    """Per receiver VM, `<sid>_rej_in` repeating its ingress entries; `map_name`: its addresses -> goto."""
    elems: list[str] = []
    for vp in receivers:
        chain = f"{vm_sid(vp.vm.id)}_rej_in"
        b.chain(table, chain)
        _reject_entries(b, table, vp=vp, chain=chain, entries=vp.ingress, on_allow=x.RETURN)
        elems.extend(dump([str(ip), {"goto": {"target": chain}}]) for ip in vp.vm.ips)
    b.sets[map_name] = NftSet(table, map_name, "ipv4_addr", (), "verdict", frozenset(elems))


def _dispatch(map_name: str) -> JSON:
    return {"vmap": {"key": x.payload("ip", "daddr"), "data": f"@{map_name}"}}


def _netdev_chains(b: Builder, resolved: Resolved, receivers: list[VmPolicy]) -> None:
    """VM senders: an ingress chain on each sender's port (every VM's, when some VM rejects at ingress)."""
    senders = list(resolved.vms) if receivers else [vp for vp in resolved.vms if vp.rejects_out]
    if not senders:
        return
    on_allow: JSON = x.RETURN
    if receivers:
        b.chain(NETDEV, REJECT_DST_MAP)
        b.rule(NETDEV, REJECT_DST_MAP, "sys:dispatch", [_dispatch(REJECT_DST_MAP)])
        on_allow = {"goto": {"target": REJECT_DST_MAP}}
        _receiver_chains(b, NETDEV, map_name=REJECT_DST_MAP, receivers=receivers)
    for vp in sorted(senders, key=lambda v: vm_sid(v.vm.id)):
        sid = vm_sid(vp.vm.id)
        port_tag = hashlib.sha256(vp.vm.port.encode()).hexdigest()[:6]
        base, out = f"{sid}_rej_{port_tag}", f"{sid}_rej_out"
        b.chain(NETDEV, base, hook="ingress", priority=-500, policy="accept", device=vp.vm.port)
        b.chain(NETDEV, out)
        # Only frames that pass anti-spoofing are answered: never send a reset to a forged source.
        b.rule(
            NETDEV,
            base,
            "sys:identity",
            [
                x.match(x.payload("ether", "saddr"), vp.vm.mac),
                x.match(x.payload("ip", "saddr"), own_ips(vp)),
                {"goto": {"target": out}},
            ],
        )
        _reject_entries(b, NETDEV, vp=vp, chain=out, entries=vp.egress, on_allow=on_allow)


def _inet_chains(b: Builder, resolved: Resolved, receivers: list[VmPolicy]) -> None:
    """Senders that are not VMs: routed ones at `forward`, the host's own packets at `output`."""
    bridges = sorted({n.bridge for n in resolved.policy.networks})
    established = [x.mark_is_set(resolved.policy.settings.conntrack_mark), x.RETURN]
    b.chain(INET, FORWARD_CHAIN, hook="forward", priority=0, policy="accept")
    # Bridged IPv4 (br_netfilter) and what VMs route out: answered by the netdev chains. One compare.
    b.rule(INET, FORWARD_CHAIN, "sys:bridged", [x.match(x.meta("iifname"), x.anon_set(bridges)), x.RETURN])
    b.rule(INET, FORWARD_CHAIN, "sys:est", established)
    b.rule(INET, FORWARD_CHAIN, "sys:dispatch", [_dispatch(INET_REJECT_MAP)])
    b.chain(INET, OUTPUT_CHAIN, hook="output", priority=0, policy="accept")
    b.rule(INET, OUTPUT_CHAIN, "sys:est", established)
    b.rule(INET, OUTPUT_CHAIN, "sys:dispatch", [_dispatch(INET_REJECT_MAP)])
    _receiver_chains(b, INET, map_name=INET_REJECT_MAP, receivers=receivers)


def reject_chains(b: Builder, resolved: Resolved) -> None:
    """Everything reject rules need; nothing at all (no chain, no hook) when no rule rejects."""
    receivers = sorted((vp for vp in resolved.vms if vp.rejects_in), key=lambda v: vm_sid(v.vm.id))
    _netdev_chains(b, resolved, receivers)
    if receivers:
        _inet_chains(b, resolved, receivers)
