"""`hyperfence can SRC DST --port 443/tcp`: would the compiled policy let this flow start? Pure.

Walks exactly the entries the compiler renders (`resolve_policy`), in the same order, so the answer names
the rule that the kernel would apply: the sender's egress chain first, then the receiver's ingress chain.
Replies to an allowed flow always pass (stateful), so only the first packet of a flow is asked about; a
reject, like the kernel's, answers only that first packet (`_answer` says how), and a rule change never cuts
a flow that is already established.
An address that is no declared VM's but can only sit on a bridge port no declared VM holds is denied as
the kernel denies it (`sys:unknown-port`), and the answer says whose an address is when that decides it
(the host's, never routed, maybe behind an uplink).

Overlays (policy/overlays.py) decide before the rules: a VM some producer isolates sends and receives
nothing (`sys:quarantine`, established flows too); a shielded VM receives no new flow (`sys:shield`). A rate
limit decides no single flow (it counts them), so it only adds a note.

The answer is for one data plane flavour (model/kernel.py; the CLI asks the one the daemon runs). They decide
the same, but answer a VM's rejected packet differently: br_netfilter answers from the host's IP stack (ICMP
from the gateway, so the host and the VM may ARP each other: `sys:reject-arp`; a network without a gateway
gets no answer), bridge_native from the bridge itself (addresses swapped, no gateway, no ARP, so no
`sys:reject-arp` either).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from hyperfence.model.kernel import Flavour
from hyperfence.model.policy import (
    Action,
    Direction,
    IcmpService,
    NamedService,
    Network,
    PortService,
    ProtocolService,
    Service,
    SpecialService,
)
from hyperfence.policy.resolve import (
    OVERLAY_LIMIT_ID,
    Entry,
    Resolved,
    VmPolicy,
    contains,
    dhcp_ports,
    reject_arp_vms,
)

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}


@dataclass(frozen=True)
class Flow:
    protocol: str  # tcp, udp, icmp, arp, dhcp (a lease: see `_lease`), or a number as text
    port: int | None = None  # destination port (tcp/udp)
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True)
class Step:
    vm: str
    direction: Direction
    verdict: Action
    rule: str  # policy rule id, or sys:... for built-in rules


@dataclass(frozen=True)
class Answer:
    allowed: bool
    steps: tuple[Step, ...]
    reason: str

    @property
    def deciding(self) -> Step | None:
        for s in self.steps:
            if s.verdict is not Action.ALLOW:
                return s
        return self.steps[-1] if self.steps else None


def _service_matches(svc: Service, flow: Flow, direction: Direction, *, paired: bool = False) -> bool:
    match svc:
        case PortService(proto, ports):
            if flow.protocol != proto.value:
                return False
            return not ports or (flow.port is not None and any(p.first <= flow.port <= p.last for p in ports))
        case IcmpService(typ, code):
            return (
                flow.protocol == "icmp"
                and (typ is None or typ == flow.icmp_type)
                and (code is None or code == flow.icmp_code)
            )
        case ProtocolService(number):
            return str(PROTO_NUMBERS.get(flow.protocol, flow.protocol)) == str(number)
        case NamedService(SpecialService.ANY):
            return flow.protocol != "arp"
        case NamedService(SpecialService.ARP):
            return flow.protocol == "arp"
        case NamedService(SpecialService.DHCP | SpecialService.DHCP_SERVER):
            # The destination port of the VM's role; `can` has no source port (the kernel also matches the
            # client's 68 or the server's 67).
            return flow.protocol == "udp" and flow.port == dhcp_ports(svc, direction, paired=paired)[1]
    return False


def _walk(
    vp: VmPolicy,
    entries: tuple[Entry, ...],
    peer: IPv4Address,
    flow: Flow,
    direction: Direction,
    *,
    reject_arp: frozenset[str] = frozenset(),
) -> Step:
    if flow.protocol == "arp" and peer == vp.gateway and vp.vm.id in reject_arp:
        # in the bridge's base chains, before the VM's own rules: the host must reach it with ICMP answers
        return Step(vp.vm.name, direction, Action.ALLOW, "sys:reject-arp")
    for e in entries:
        if not contains(e.peers, peer):  # (paired entries too: ARP and DHCP are asked both ways)
            continue
        if any(_service_matches(s, flow, direction, paired=e.paired) for s in e.services):
            return Step(vp.vm.name, direction, e.action, e.rule.id)
    if flow.protocol == "arp" and contains(vp.arp_peers, peer):
        return Step(vp.vm.name, direction, Action.ALLOW, "sys:arp")
    return Step(vp.vm.name, direction, Action.DENY, "sys:default-deny")


ARP = Flow("arp")


def _neighbour_step(
    resolved: Resolved,
    src_vm: VmPolicy | None,
    src_ip: IPv4Address,
    dst_vm: VmPolicy | None,
    dst_ip: IPv4Address,
    *,
    sender_only: bool = False,
    flavour: Flavour = Flavour.BR_NETFILTER,
) -> Step | None:
    """The first packet of an IP flow also needs its sender to resolve the next hop: an ARP request and its
    reply, each through the rules of the VMs on that link (implied ARP, or an explicit `arp` rule that may
    deny it). The first of those four legs that does not pass, or None. The receiver learns the sender from
    the request itself, so the flow's replies need no more ARP. Broadcast and multicast need none.
    `sender_only`: only a VM sender's own next hop (a rejected packet is answered by the host before it is
    routed or bridged on, so nobody else needs to resolve its receiver)."""
    if dst_ip.is_multicast or dst_ip == IPv4Address("255.255.255.255") or dst_ip.is_unspecified:
        return None
    answered = _reject_arp(resolved, flavour)
    # (the VM that asks or None, the address that asks, the VM that answers or None, the address asked for)
    pairs: list[tuple[VmPolicy | None, IPv4Address, VmPolicy | None, IPv4Address]] = []
    if src_vm is not None:
        # The sender resolves the receiver on its own subnet, else its gateway.
        hop = dst_ip if dst_ip in src_vm.subnet else src_vm.gateway
        if hop is not None:
            pairs.append((src_vm, src_ip, find_vm(resolved, str(hop))[0], hop))
    if dst_vm is not None and not sender_only and not (src_vm is not None and dst_ip in src_vm.subnet):
        # Someone else resolves the receiver: a sender on its link itself, else the receiver's gateway.
        asker = src_ip if src_ip in dst_vm.subnet else dst_vm.gateway
        if asker is not None:
            pairs.append((None, asker, dst_vm, dst_ip))
    for asking_vm, asking_ip, answering_vm, answering_ip in pairs:
        legs = (
            (asking_vm, Direction.OUT, answering_ip),  # the request leaves the asker
            (answering_vm, Direction.IN, asking_ip),  # and reaches the one it asks
            (answering_vm, Direction.OUT, asking_ip),  # the reply leaves it
            (asking_vm, Direction.IN, answering_ip),  # and reaches the asker
        )
        for vp, direction, peer in legs:
            if vp is None:
                continue
            entries = vp.egress if direction is Direction.OUT else vp.ingress
            step = _walk(vp, entries, peer, ARP, direction, reject_arp=answered)
            if step.verdict is not Action.ALLOW:
                return step
    return None


def _unresolved(arp: Step, tail: str) -> str:
    side = "egress" if arp.direction is Direction.OUT else "ingress"
    return (
        f"{arp.vm} {side}: ARP {arp.verdict.value} by {arp.rule}: the sender cannot resolve its next hop, so "
        f"the packet never leaves{tail}"
    )


def _reject_arp(resolved: Resolved, flavour: Flavour) -> frozenset[str]:
    """The VMs that may ARP with their gateway for the host's reject answers (`sys:reject-arp`): none under
    bridge_native, where the bridge answers a VM's frame itself."""
    return frozenset() if flavour is Flavour.BRIDGE_NATIVE else reject_arp_vms(resolved)


def _answer(flow: Flow, sender: VmPolicy | None, flavour: Flavour) -> str:
    """What the sender of a rejected first packet gets (ruleset/reject.py): a VM sender under bridge_native is
    answered by the bridge, with or without a gateway; under br_netfilter (and any sender that is no VM,
    answered by the host's IP stack) it needs the host's address on its network."""
    if sender is not None and sender.gateway is None and flavour is not Flavour.BRIDGE_NATIVE:
        return "no answer: the host has no address on the sender's network"
    protocol = {"6": "tcp", "17": "udp"}.get(flow.protocol, flow.protocol)
    if protocol == "tcp":
        return "the sender gets a TCP reset"
    if protocol == "udp":
        return "the sender gets ICMP port unreachable"
    return "the sender gets ICMP administratively prohibited"


def find_vm(resolved: Resolved, name_or_ip: str) -> tuple[VmPolicy | None, IPv4Address]:
    """A VM by name or by one of its addresses; else (None, the address)."""
    for vp in resolved.vms:
        if name_or_ip in (vp.vm.name, vp.vm.id):
            return vp, vp.vm.ips[0]
    addr = IPv4Address(name_or_ip)
    for vp in resolved.vms:
        if addr in vp.vm.ips:
            return vp, addr
    return None, addr


def unknown_port_network(resolved: Resolved, addr: IPv4Address) -> Network | None:
    """The network `addr` can only be on behind a bridge port that no declared VM holds (a removed VM's, a
    tap that appeared before its VM): on a managed subnet, neither a declared VM's address nor the host's,
    and the network has no uplinks it could be behind. Such a port gets nothing (`sys:unknown-port`)."""
    if contains(resolved.host, addr) or any(addr in vp.vm.ips for vp in resolved.vms):
        return None
    return next((n for n in resolved.policy.networks if addr in n.subnet and not n.uplinks), None)


def _address_note(resolved: Resolved, addr: IPv4Address) -> str | None:
    """Why an address that is no VM's is covered or not by `host` / `outside`, when that is not obvious."""
    if any(addr in vp.vm.ips for vp in resolved.vms):
        return None
    if contains(resolved.host, addr):
        return f"{addr} is the host's (`host` covers it, `outside` does not)"
    net = next((n for n in resolved.policy.networks if addr in n.subnet), None)
    if net is not None and net.uplinks:
        return (
            f"{addr} is no declared VM's: on network {net.name} it may be behind an uplink "
            f"({', '.join(net.uplinks)}); on a bridge port no declared VM holds it would get nothing "
            "(sys:unknown-port)"
        )
    if net is None and not contains(resolved.outside, addr):
        return f"{addr} is never routed (this network, loopback, multicast, broadcast): it is not `outside`"
    return None


def _unknown_port(addr: IPv4Address, net: Network) -> str:
    return (
        f"{addr} is on network {net.name} ({net.subnet}) but is neither a declared VM's address nor the "
        f"host's, and {net.name} has no uplinks: it can only be on a bridge port that no declared VM holds, "
        "and such a port gets nothing"
    )


BROADCAST, UNSPECIFIED = IPv4Address("255.255.255.255"), IPv4Address(0)


def _lease(
    resolved: Resolved,
    client: VmPolicy | None,
    client_ip: IPv4Address,
    server: VmPolicy | None,
    server_ip: IPv4Address,
) -> Answer:
    """`can CLIENT SERVER --protocol dhcp`: may CLIENT get a lease from SERVER? The exchange's four legs: the
    client's request from 0.0.0.0 to the broadcast address (which only a VM with a client role may send:
    anti-spoofing), taken by the server from 0.0.0.0, and the server's answer to the client's address (which
    only a VM with a server role may send), taken by the client. The answer is no conntrack reply (the
    request went to the broadcast address), so every leg is asked."""
    if client is None and server is None:
        return Answer(
            True, (), f"neither {client_ip} nor {server_ip} is a protected VM: hyperfence does not filter it"
        )
    for vp, addr, direction in ((client, client_ip, Direction.OUT), (server, server_ip, Direction.IN)):
        net = unknown_port_network(resolved, addr) if vp is None else None
        if net is not None:
            step = Step(str(addr), direction, Action.DENY, "sys:unknown-port")
            return Answer(False, (step,), f"{_unknown_port(addr, net)}: deny by sys:unknown-port")
    if client is not None and not client.dhcp_client:
        step = Step(client.vm.name, Direction.OUT, Action.DENY, "sys:spoof")
        return Answer(
            False,
            (step,),
            f"{client.vm.name} egress: deny by sys:spoof (no dhcp rule makes it a "
            "client, so it may not send from 0.0.0.0)",
        )
    legs = (
        (client, Direction.OUT, BROADCAST, 67),  # DHCPDISCOVER / REQUEST, from 0.0.0.0
        (server, Direction.IN, UNSPECIFIED, 67),
        (server, Direction.OUT, client_ip, 68),  # OFFER / ACK
        (client, Direction.IN, server_ip, 68),
    )
    steps: list[Step] = []
    for vp, direction, peer, port in legs:
        if vp is None:
            continue
        if vp is server and direction is Direction.OUT and not vp.dhcp_server:
            steps.append(Step(vp.vm.name, direction, Action.DENY, "sys:no-dhcp-server"))
            return Answer(
                False,
                tuple(steps),
                f"{vp.vm.name} egress: deny by sys:no-dhcp-server (no dhcp-server rule lets it answer)",
            )
        entries = vp.egress if direction is Direction.OUT else vp.ingress
        step = _walk(vp, entries, peer, Flow("udp", port), direction)
        steps.append(step)
        if step.verdict is not Action.ALLOW:
            side = "egress" if direction is Direction.OUT else "ingress"
            return Answer(False, tuple(steps), f"{vp.vm.name} {side}: {step.verdict.value} by {step.rule}")
    return Answer(True, tuple(steps), _allowed_by(steps))


def _allowed_by(steps: list[Step]) -> str:
    return "allowed by " + " and ".join(
        f"{s.rule} ({s.vm} {'egress' if s.direction is Direction.OUT else 'ingress'})" for s in steps
    )


def can(
    resolved: Resolved, src: str, dst: str, flow: Flow, *, flavour: Flavour = Flavour.BR_NETFILTER
) -> Answer:
    """Would `src` get this flow to `dst` started, on the data plane `flavour`? Raises ValueError when src/dst
    is neither a VM nor an IPv4 address."""
    src_vm, src_ip = find_vm(resolved, src)
    dst_vm, dst_ip = find_vm(resolved, dst)
    for vp, direction in ((src_vm, Direction.OUT), (dst_vm, Direction.IN)):
        if vp is not None and vp.vm.id in resolved.quarantine:
            step = Step(vp.vm.name, direction, Action.DENY, "sys:quarantine")
            return Answer(
                False,
                (step,),
                f"{vp.vm.name} is isolated by an overlay (`hyperfence vm list` says who set it): nothing "
                "passes to or from it, established flows neither: deny by sys:quarantine",
            )
    if flow.protocol == "dhcp":
        return _lease(resolved, src_vm, src_ip, dst_vm, dst_ip)
    notes = [n for n in (_address_note(resolved, src_ip), _address_note(resolved, dst_ip)) if n]
    notes += [
        f"{vp.vm.name} sends new flows at most at its overlay's rate limit ({lim.rate} a second)"
        for vp in (src_vm,)
        if vp is not None
        for lim in vp.limits_out
        if lim.id == OVERLAY_LIMIT_ID
    ]
    note = "".join(f"; {n}" for n in notes)
    steps: list[Step] = []
    for vp, side, peer, direction, addr in (
        (src_vm, "egress", dst_ip, Direction.OUT, src_ip),
        (dst_vm, "ingress", src_ip, Direction.IN, dst_ip),
    ):
        if vp is None:
            net = unknown_port_network(resolved, addr)
            if net is not None:  # the sender's port drops what it sends, the receiver's what it is sent
                steps.append(Step(str(addr), direction, Action.DENY, "sys:unknown-port"))
                return Answer(False, tuple(steps), f"{_unknown_port(addr, net)}: deny by sys:unknown-port")
            continue
        if direction is Direction.IN and vp.shielded and flow.protocol != "arp":
            steps.append(Step(vp.vm.name, direction, Action.DENY, "sys:shield"))
            return Answer(
                False,
                tuple(steps),
                f"{vp.vm.name} ingress: shielded by an overlay (no new flow reaches it; its established "
                f"flows and its own go on): deny by sys:shield{note}",
            )
        entries = vp.egress if direction is Direction.OUT else vp.ingress
        answered = _reject_arp(resolved, flavour) if flow.protocol == "arp" else frozenset[str]()
        step = _walk(vp, entries, peer, flow, direction, reject_arp=answered)
        steps.append(step)
        if step.verdict is not Action.ALLOW:
            reason = f"{vp.vm.name} {side}: {step.verdict.value} by {step.rule}"
            if step.verdict is Action.REJECT and flow.protocol != "arp":
                arp = _neighbour_step(
                    resolved, src_vm, src_ip, dst_vm, dst_ip, sender_only=True, flavour=flavour
                )
                if arp is not None:  # the packet never leaves the sender, so nothing can answer it
                    return Answer(
                        False, (*steps[:-1], arp), _unresolved(arp, f"; {reason} never sees it{note}")
                    )
                reason += f" ({_answer(flow, src_vm, flavour)})"
            return Answer(False, tuple(steps), reason + note)
    if not steps:
        return Answer(True, (), f"neither {src} nor {dst} is a protected VM: hyperfence does not filter it")
    if flow.protocol != "arp":
        arp = _neighbour_step(resolved, src_vm, src_ip, dst_vm, dst_ip, flavour=flavour)
        if arp is not None:
            return Answer(False, (*steps, arp), _unresolved(arp, f" (allowed by the rules){note}"))
    return Answer(True, tuple(steps), _allowed_by(steps) + note)
