"""Reject rules (`action: reject`). Pure.

The bridge family cannot reject on this kernel. A netdev ingress chain on the *sender's* port can: it sees
every frame the VM sends before the bridge does, and `reject` there answers the sender (TCP reset for a new
TCP connection, ICMP unreachable otherwise). It repeats the sender's egress rules in order (allow/deny
only pass the frame on to the bridge, which decides as usual), and after an allow asks the receiver's
ingress rules the same question through a map from destination address to that VM's reject chain. Rules
that are not rejects never change a verdict here: the bridge chains stay the only place that allows.
"""

from __future__ import annotations

import hashlib

from hyperfence.model.policy import L4, Action, Direction, NamedService, PortService, Service, SpecialService
from hyperfence.policy.resolve import ANY, Entry, Resolved, VmPolicy
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.build import (
    NETDEV,
    REJECT_DST_MAP,
    Builder,
    dump,
    own_ips,
    selector_set_name,
    service_matches,
    vm_sid,
)
from hyperfence.ruleset.ir import JSON, NftSet


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


def _reject_entries(b: Builder, vp: VmPolicy, chain: str, entries: tuple[Entry, ...], on_allow: JSON) -> None:
    for entry in entries:
        if entry.paired:
            continue
        peer: JSON | None = None
        if entry.peers != ANY:
            name = "n" + selector_set_name(entry.peer_selectors)
            b.address_set(name, entry.peers, NETDEV)
            peer = x.match(
                x.payload("ip", "daddr" if entry.direction is Direction.OUT else "saddr"), f"@{name}"
            )
        for service in entry.services:
            if isinstance(service, NamedService) and service.kind is not SpecialService.ANY:
                continue  # ARP and DHCP are never rejected
            n = entry.rule.services.index(service) + 1
            matches = service_matches(service, entry.direction, peer, None, vp)
            comment = f"rule:{entry.rule.id}#{n}"
            if entry.action is Action.REJECT:
                b.rule(NETDEV, chain, comment, [*matches, *_reject_verdict(service)])
                b.rule(NETDEV, chain, comment + ":rest", [*matches, x.RETURN])
            elif entry.action is Action.ALLOW:
                b.rule(NETDEV, chain, comment, [*matches, on_allow])
            else:
                b.rule(NETDEV, chain, comment, [*matches, x.RETURN])


def reject_chains(b: Builder, resolved: Resolved) -> None:
    receivers = [vp for vp in resolved.vms if vp.rejects_in]
    senders = list(resolved.vms) if receivers else [vp for vp in resolved.vms if vp.rejects_out]
    if not senders:
        return
    on_allow: JSON = x.RETURN
    if receivers:
        b.chain(NETDEV, "reject_dst")
        b.rule(
            NETDEV,
            "reject_dst",
            "sys:dispatch",
            [{"vmap": {"key": x.payload("ip", "daddr"), "data": f"@{REJECT_DST_MAP}"}}],
        )
        on_allow = {"goto": {"target": "reject_dst"}}
        elems: list[str] = []
        for vp in sorted(receivers, key=lambda v: vm_sid(v.vm.id)):
            chain = f"{vm_sid(vp.vm.id)}_rej_in"
            b.chain(NETDEV, chain)
            _reject_entries(b, vp, chain, vp.ingress, x.RETURN)
            elems.extend(dump([str(ip), {"goto": {"target": chain}}]) for ip in vp.vm.ips)
        b.sets[REJECT_DST_MAP] = NftSet(NETDEV, REJECT_DST_MAP, "ipv4_addr", (), "verdict", frozenset(elems))
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
        _reject_entries(b, vp, out, vp.egress, on_allow)
