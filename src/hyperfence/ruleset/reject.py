"""Reject rules (`action: reject`). Pure.

A reject answers the first packet of a new flow it matches, and nothing else: never a reply, never a packet
of a flow that was established before the rule came (deny and reject treat open connections alike: the
bridge's established shortcut passes them, and no reject chain ever looks at them). So every reject chain
runs *after* conntrack, in `inet hyperfence`, and answers only `ct state new`. The bridge family cannot
reject on this kernel, and a netdev chain on the sender's port (what earlier versions used) runs before
conntrack, so it cannot tell a reply or an open flow from a new one.

* **A VM on this host sends** (`reject_pre`, prerouting, priority 0: after conntrack (-200) and the
  established mark (-150); br_netfilter runs it for bridged IPv4 before the bridge's +10 chains decide).
  A new flow from a managed bridge is dispatched by source address (`ireject_src`; the bridge guard at -300
  has already checked that address against the port and MAC) to `<vm>_rej_out`, which repeats the sender's
  egress rules in order; after an allow it asks the receiver's ingress rules the same question
  (`reject_to` -> `ireject_dst` -> `<vm>_rej_in`).
* **Anyone else sends** (only while some VM has an ingress reject): a routed sender (`outside`) passes the
  `forward` hook (`reject_fwd`), the host's own packets the `output` hook (`reject_out`), both dispatched by
  destination address to the receiver's `<vm>_rej_in`. Bridged IPv4 also passes `forward` (with the bridge
  as input interface); those packets were `reject_pre`'s business, so the forward chain lets them go with
  one compare before anything else. Packets for the host's own addresses find no entry in the map.

Answers: a TCP reset for a new TCP connection (a SYN without ACK; a reject of `any` protocol or of
protocol 6 too), ICMP port unreachable for UDP, ICMP administratively prohibited for everything else.

* The kernel sends the reset for a bridged packet straight out of the sender's bridge port (the br_netfilter
  branch of `nf_send_reset`), from the destination's address and MAC: no routing, no ARP.
* ICMP errors come from the host's IP stack: from the host's address on the network (the gateway), routed
  to the sender, and rate-limited like every ICMP error the host sends (`net.ipv4.icmp_ratelimit`). Conntrack
  relates them to the rejected packet, so the sender's ingress chain passes them as established; the host
  must resolve the sender's MAC, so a VM that may get one and its gateway may ARP each other (`reject_arp`,
  looked up by the bridge's base chains). A network without a gateway has no host address to answer from:
  its VMs are never dispatched to `reject_pre`, and their rejected packets are dropped like a deny.

**bridge_native** (model/kernel.py: the kernel has bridge conntrack and `nft_reject_bridge`): the same chains,
in `bridge hyperfence`. Debian's 6.1 kernel takes a bridge `reject` only in prerouting and input chains, so
the decision is made where the sender's frame enters: `reject_pre` (bridge prerouting, priority 0: after the
guard (-300) and bridge conntrack (-200), before `egress` (+10)) dispatches a new flow by its input port
(`reject_src`) to `<vm>_rej_out`; after an allow, `reject_to` asks the receiver's `<vm>_rej_in` through
`reject_dst`. The bridge answers the frame itself (addresses and MACs swapped, out of the sender's port):
no gateway, no ARP, so VMs of a network without a gateway are answered too. Routed senders and the host
reach a VM through the host's IP stack, not a bridge port: their answers stay in the inet chains above.

Rules that are not rejects never change a verdict here: allow and deny only `return` (or go on to the
receiver's rules), so the bridge chains stay the only place that allows.
"""

from __future__ import annotations

from hyperfence.model.kernel import Flavour
from hyperfence.model.policy import (
    L4,
    Action,
    Direction,
    NamedService,
    PortService,
    ProtocolService,
    Service,
    SpecialService,
)
from hyperfence.policy.resolve import ANY, Entry, Resolved, VmPolicy, reject_arp_vms
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.build import (
    BRIDGE,
    INET,
    REJECT_ARP_SET,
    REJECT_ARP_TYPE,
    Builder,
    dump,
    selector_set_name,
    service_matches,
    vm_sid,
)
from hyperfence.ruleset.ir import JSON, NftSet, TableId

SENDER_MAP, RECEIVER_MAP = "ireject_src", "ireject_dst"
BRIDGE_SENDER_MAP, BRIDGE_RECEIVER_MAP = "reject_src", "reject_dst"  # bridge_native: port / address -> chain
"""The inet table's maps from a VM's address to its sender (`<vm>_rej_out`) or receiver (`<vm>_rej_in`)
chain (set names are unique per compile, whatever their table, hence the prefix)."""
TO_CHAIN = "reject_to"
PRE_CHAIN, FORWARD_CHAIN, OUTPUT_CHAIN = "reject_pre", "reject_fwd", "reject_out"
TCP, UDP = 6, 17
ANY_SERVICE = NamedService(SpecialService.ANY)

CT_NEW = x.match(
    {"ct": {"key": "state"}}, 8, op="in"
)  # the first packet(s) of a flow conntrack does not know
SYN_ONLY = x.match({"&": [x.payload("tcp", "flags"), [2, 16]]}, 2)  # SYN without ACK: a new connection
RESET: JSON = {"reject": {"type": "tcp reset"}}
PORT_UNREACHABLE: JSON = {"reject": {"type": "icmp", "expr": 3}}
PROHIBITED: JSON = {"reject": {"type": "icmp", "expr": 13}}


def _protocol(number: int) -> JSON:
    return x.match(x.payload("ip", "protocol"), number)


def _answers(service: Service) -> list[tuple[str, list[JSON], list[JSON]]]:
    """How a reject of `service` answers: (comment suffix, extra matches, verdict statements), in order. A TCP
    packet that is not a SYN is never answered (`:rest` returns; the bridge drops it as for a deny)."""
    tcp = [("", [SYN_ONLY], [x.COUNTER, RESET]), (":rest", [], [x.RETURN])]
    match service:
        case PortService(L4.TCP, _) | ProtocolService(6):
            return tcp
        case PortService(L4.UDP, _) | ProtocolService(17):
            return [("", [], [x.COUNTER, PORT_UNREACHABLE])]
        case NamedService(SpecialService.ANY):
            return [
                (":tcp", [_protocol(TCP), SYN_ONLY], [x.COUNTER, RESET]),
                (":rest", [_protocol(TCP)], [x.RETURN]),
                (":udp", [_protocol(UDP)], [x.COUNTER, PORT_UNREACHABLE]),
                ("", [], [x.COUNTER, PROHIBITED]),
            ]
    return [("", [], [x.COUNTER, PROHIBITED])]


def _peer_match(b: Builder, entry: Entry, table: TableId) -> JSON | None:
    """`ip daddr|saddr @<set>` for the entry's peers (the set in `table`: the bridge's is the one its VM
    chains use), None when they are any."""
    if entry.peers == ANY:
        return None
    name = ("i" if table == INET else "") + selector_set_name(entry.peer_selectors)
    b.address_set(name, entry.peers, table)
    field = "daddr" if entry.direction is Direction.OUT else "saddr"
    return x.match(x.payload("ip", field), f"@{name}")


def _reject_entries(
    b: Builder, *, vp: VmPolicy, table: TableId, chain: str, entries: tuple[Entry, ...], on_allow: JSON
) -> None:
    """Repeat `entries` in order in `chain`: rejects answer, allows do `on_allow`, denies return. Paired
    entries too: a DHCP server's answer is a new flow (no conntrack reply of a request to the broadcast
    address), so the rule's other half must let it pass before a later reject."""
    for entry in entries:
        peer = _peer_match(b, entry, table)
        # bridge: `ip version 4` first gives nft the network protocol a reject's ICMP answer needs
        ipv4 = [x.match(x.payload("ip", "version"), 4)] if table == BRIDGE else []
        for service in entry.services:
            # ARP is not IP: never here. DHCP is never rejected (the parser refuses it), but an allowed or
            # denied DHCP exchange must not fall through to a later reject.
            if service == NamedService(SpecialService.ARP) or (
                entry.action is Action.REJECT and isinstance(service, NamedService) and service != ANY_SERVICE
            ):
                continue
            n = entry.rule.services.index(service) + 1
            matches = service_matches(service, entry.direction, peer, None, vp, paired=entry.paired)
            comment = f"rule:{entry.rule.id}#{n}" + (":pair" if entry.paired else "")
            if entry.action is Action.REJECT:
                for suffix, extra, verdict in _answers(service):
                    b.rule(table, chain, comment + suffix, [*ipv4, *extra, *matches, *verdict])
            elif entry.action is Action.ALLOW:
                b.rule(table, chain, comment, [*matches, on_allow])
            else:
                b.rule(table, chain, comment, [*matches, x.RETURN])


def _address_map(b: Builder, name: str, chains: dict[str, VmPolicy], table: TableId = INET) -> None:
    """`name`: every address of each VM -> goto its chain."""
    elems = frozenset(dump([str(ip), x.goto(chain)]) for chain, vp in chains.items() for ip in vp.vm.ips)
    b.sets[name] = NftSet(table, name, "ipv4_addr", (), "verdict", elems)


def _port_map(b: Builder, name: str, chains: dict[str, VmPolicy]) -> None:
    """`name` (bridge): each VM's port -> goto its chain."""
    elems = frozenset(dump([vp.vm.port, x.goto(chain)]) for chain, vp in chains.items())
    b.sets[name] = NftSet(BRIDGE, name, "ifname", (), "verdict", elems)


def _dispatch(map_name: str, field: str) -> JSON:
    return {"vmap": {"key": x.payload("ip", field), "data": f"@{map_name}"}}


def _receiver_chains(b: Builder, receivers: list[VmPolicy], table: TableId = INET) -> None:
    """Per receiver VM, `<sid>_rej_in` repeating its ingress entries; `ireject_dst` (`reject_dst` in the
    bridge) maps its addresses."""
    chains: dict[str, VmPolicy] = {}
    for vp in receivers:
        chain = f"{vm_sid(vp.vm.id)}_rej_in"
        b.chain(table, chain)
        _reject_entries(b, vp=vp, table=table, chain=chain, entries=vp.ingress, on_allow=x.RETURN)
        chains[chain] = vp
    _address_map(b, RECEIVER_MAP if table == INET else BRIDGE_RECEIVER_MAP, chains, table)


def _rej_out_chains(
    b: Builder, resolved: Resolved, senders: list[VmPolicy], *, table: TableId, receiver_map: str | None
) -> dict[str, VmPolicy]:
    """Per sender VM, `<sid>_rej_out` in `table` repeating its egress entries (after the agent's channel,
    which passes whatever the policy says); with `receiver_map`, an allow goes on to `reject_to`, which
    dispatches to the receiver's `<sid>_rej_in` by destination address. Returns chain -> VM."""
    on_allow: JSON = x.RETURN
    if receiver_map is not None:
        b.chain(table, TO_CHAIN)
        b.rule(table, TO_CHAIN, "sys:dispatch", [_dispatch(receiver_map, "daddr")])
        on_allow = x.goto(TO_CHAIN)
    endpoint = resolved.policy.settings.agent_endpoint
    chains: dict[str, VmPolicy] = {}
    for vp in senders:
        chain = f"{vm_sid(vp.vm.id)}_rej_out"
        b.chain(table, chain)
        if endpoint is not None:
            agent = [
                x.match(x.payload("ip", "daddr"), str(endpoint[0])),
                x.match(x.payload("tcp", "dport"), endpoint[1]),
            ]
            b.rule(table, chain, "sys:agent", [*agent, x.RETURN])
        _reject_entries(b, vp=vp, table=table, chain=chain, entries=vp.egress, on_allow=on_allow)
        chains[chain] = vp
    return chains


def _sender_chains(b: Builder, resolved: Resolved, senders: list[VmPolicy], *, receivers: bool) -> None:
    """VM senders, after conntrack: `reject_pre` -> `ireject_src` -> `<sid>_rej_out`."""
    bridges = sorted({n.bridge for n in resolved.policy.networks if n.gateway is not None})
    chains = _rej_out_chains(
        b, resolved, senders, table=INET, receiver_map=RECEIVER_MAP if receivers else None
    )
    _address_map(b, SENDER_MAP, chains)
    b.chain(INET, PRE_CHAIN, hook="prerouting", priority=0, policy="accept")
    b.rule(
        INET,
        PRE_CHAIN,
        "sys:dispatch",
        [CT_NEW, x.match(x.meta("iifname"), x.anon_set(bridges)), _dispatch(SENDER_MAP, "saddr")],
    )


def _other_senders(b: Builder, resolved: Resolved) -> None:
    """Senders that are not VMs: routed ones at `forward`, the host's own packets at `output`."""
    bridges = sorted({n.bridge for n in resolved.policy.networks})
    b.chain(INET, FORWARD_CHAIN, hook="forward", priority=0, policy="accept")
    # Bridged IPv4 (br_netfilter) and what VMs route out: `reject_pre`'s business. One compare.
    b.rule(INET, FORWARD_CHAIN, "sys:bridged", [x.match(x.meta("iifname"), x.anon_set(bridges)), x.RETURN])
    b.rule(INET, FORWARD_CHAIN, "sys:dispatch", [CT_NEW, _dispatch(RECEIVER_MAP, "daddr")])
    b.chain(INET, OUTPUT_CHAIN, hook="output", priority=0, policy="accept")
    b.rule(INET, OUTPUT_CHAIN, "sys:dispatch", [CT_NEW, _dispatch(RECEIVER_MAP, "daddr")])


def _arp_with_gateway(b: Builder, resolved: Resolved) -> None:
    """`reject_arp` (bridge): port . gateway . address of every VM the host may answer with an ICMP error
    (`reject_arp_vms`), so that the host can resolve its MAC and the answer reaches it."""
    elems: set[str] = set()
    answered = reject_arp_vms(resolved)
    for vp in resolved.vms:
        if vp.gateway is not None and vp.vm.id in answered:
            elems.update(dump({"concat": [vp.vm.port, str(vp.gateway), str(ip)]}) for ip in vp.vm.ips)
    b.sets[REJECT_ARP_SET] = NftSet(BRIDGE, REJECT_ARP_SET, REJECT_ARP_TYPE, (), None, frozenset(elems))


def _bridge_sender_chains(
    b: Builder, resolved: Resolved, senders: list[VmPolicy], *, receivers: bool
) -> None:
    """bridge_native VM senders: `reject_pre` (bridge prerouting 0) -> `reject_src` (by port) ->
    `<sid>_rej_out`; an allow goes on to `reject_to` -> `reject_dst` -> the receiver's `<sid>_rej_in`."""
    receiver_map = BRIDGE_RECEIVER_MAP if receivers else None
    chains = _rej_out_chains(b, resolved, senders, table=BRIDGE, receiver_map=receiver_map)
    _port_map(b, BRIDGE_SENDER_MAP, chains)
    b.chain(BRIDGE, PRE_CHAIN, hook="prerouting", priority=0, policy="accept")
    b.rule(BRIDGE, PRE_CHAIN, "sys:dispatch", [CT_NEW, x.vmap("iifname", BRIDGE_SENDER_MAP)])


def _bridge_reject_chains(b: Builder, resolved: Resolved, by_sid: list[VmPolicy]) -> None:
    """bridge_native: any VM with a reject may send (no gateway needed: the bridge answers)."""
    receivers = [vp for vp in by_sid if vp.rejects_in]
    senders = [vp for vp in by_sid if receivers or vp.rejects_out]
    if receivers:
        _receiver_chains(b, receivers, BRIDGE)
    if senders:
        _bridge_sender_chains(b, resolved, senders, receivers=bool(receivers))
    if receivers:  # routed senders and the host: through the IP stack, answered in inet as ever
        _receiver_chains(b, receivers, INET)
        _other_senders(b, resolved)


def reject_chains(b: Builder, resolved: Resolved) -> None:
    """Everything reject rules need; nothing at all (no chain, no hook) when no rule rejects."""
    # A quarantined VM is neither answered nor answered for: quarantine drops all its traffic, silently.
    by_sid = sorted(
        (vp for vp in resolved.vms if vp.vm.id not in resolved.quarantine), key=lambda v: vm_sid(v.vm.id)
    )
    if b.flavour is Flavour.BRIDGE_NATIVE:
        _bridge_reject_chains(b, resolved, by_sid)
        return
    receivers = [vp for vp in by_sid if vp.rejects_in]
    # With an ingress reject anywhere, any VM may send what it answers; else only VMs with egress rejects.
    # VMs of a network without a gateway are not: the host has no address there to answer from.
    senders = [vp for vp in by_sid if vp.gateway is not None and (receivers or vp.rejects_out)]
    if receivers:
        _receiver_chains(b, receivers)
    if senders:
        _sender_chains(b, resolved, senders, receivers=bool(receivers))
        _arp_with_gateway(b, resolved)
    if receivers:
        _other_senders(b, resolved)
