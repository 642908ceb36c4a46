"""What every part of the compiler shares: hyperfence's tables and names, the `Builder` that collects
chains, sets and rules, and the matches of one policy service. Pure."""

from __future__ import annotations

import functools
import hashlib
import json

from hyperfence.errors import BugError
from hyperfence.model.kernel import Flavour
from hyperfence.model.policy import (
    AddressRange,
    Direction,
    IcmpService,
    NamedService,
    PortService,
    ProtocolService,
    Selector,
    Service,
    Settings,
    SpecialService,
)
from hyperfence.policy.resolve import VmPolicy, dhcp_ports
from hyperfence.policy.syntax import format_selector
from hyperfence.ruleset import expr as x
from hyperfence.ruleset.ir import JSON, Chain, NftSet, Rule, TableId, canonical

BRIDGE = TableId("bridge", "hyperfence")
INET = TableId("inet", "hyperfence")
NETDEV = TableId("netdev", "hyperfence")
# The netdev table holds nothing now (reject moved after conntrack, ruleset/reject.py); it stays one of ours
# so that a converge removes the netdev reject chains earlier versions left on VM ports.
TABLES = (BRIDGE, INET, NETDEV)
REJECT_ARP_SET = "reject_arp"  # bridge: port . gateway . address of VMs the host may answer with ICMP
REJECT_ARP_TYPE = "ifname . ipv4_addr . ipv4_addr"

GUARD_MAP, OUT_MAP, IN_MAP = "guard_ports", "out_ports", "in_ports"
CAP_MAP = "cap_vms"  # VM address -> jump <vm>_cap (the VM's connection cap; inet, or bridge when native)
CAP_PORTS = "cap_ports"  # bridge_native: VM port -> jump <vm>_cap (what the VM sends)
LOG_PREFIX = "hf"
# The kernel keeps a log prefix of at most 127 bytes (NF_LOG_PREFIXLEN, 128, less its NUL): nft 1.0.6 gets
# ERANGE for 128 and crashes on much longer ones. nft's own parser reads comments of at most 128 characters,
# so a longer one would not read back from `nft list ruleset`. Policy ids are at most `MAX_ID_LENGTH` (32)
# characters, which keeps both well inside: `hf:<sid>:out:reject:rule:<id>#<n>:pair` is 69 characters plus the
# digits of n, `rule:<id>#<n>:pair:log` 47 plus those (see tests/unit/ruleset/test_build.py).
LOG_PREFIX_MAX = 127
COMMENT_MAX = 128
# No symbolic `ether type` matches: nft 1.0.6 lists them byte-swapped in numeric mode (0x0806 as 1544), which
# would break the exact readback. `ip version 4` and `arp hlen 6` select the same frames and list as written;
# where only the ethertype tells (a VLAN tag), `expr.ETHER_TYPE` is the raw form that reads back exactly.


@functools.lru_cache(maxsize=65536)
def vm_sid(vm_id: str) -> str:
    """Short, stable nft name for a VM (its chains are `<sid>_guard`, `<sid>_out`, `<sid>_in`)."""
    return "v" + hashlib.sha256(vm_id.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=65536)
def selector_set_name(selectors: tuple[Selector, ...]) -> str:
    text = "\n".join(sorted(format_selector(s) for s in selectors))
    return "s_" + hashlib.sha256(text.encode()).hexdigest()[:12]


def log_prefix(sid: str, direction: str, verdict: str, comment: str) -> str:
    prefix = f"{LOG_PREFIX}:{sid}:{direction}:{verdict}:{comment}"
    if len(prefix.encode()) > LOG_PREFIX_MAX:  # the parser bounds ids so that this cannot happen
        raise BugError(f"log prefix {prefix!r} is longer than the kernel keeps ({LOG_PREFIX_MAX} bytes)")
    return prefix


def established(b: Builder) -> JSON:
    """The packet belongs to a flow conntrack knows (established or related): in the bridge family itself
    (bridge_native), or the mark bit the inet marker chains set (br_netfilter)."""
    if b.flavour is Flavour.BRIDGE_NATIVE:
        return x.match({"ct": {"key": "state"}}, [2, 4], op="in")
    return x.mark_is_set(b.settings.conntrack_mark)


def dump(obj: JSON) -> str:
    """`canonical()` for what the compiler builds: its counters are already zero, so no walk is needed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class BuildMemo:
    """Elements of address sets and verdict maps built before, by value (kept across compiles)."""

    def __init__(self) -> None:
        self.elements: dict[tuple[AddressRange, ...], frozenset[str]] = {}
        self.maps: dict[tuple[str, str], frozenset[str]] = {}


class Builder:
    def __init__(
        self, settings: Settings, cache: BuildMemo | None = None, flavour: Flavour = Flavour.BR_NETFILTER
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.flavour = flavour  # the data plane built (model/kernel.py)
        self.chains: list[Chain] = []
        self.sets: dict[str, NftSet] = {}
        self.rules: list[Rule] = []

    def chain(
        self,
        table: TableId,
        name: str,
        *,
        hook: str | None = None,
        priority: int | None = None,
        policy: str | None = None,
        device: str | None = None,
    ) -> None:
        self.chains.append(
            Chain(
                table,
                name,
                type="filter" if hook else None,
                hook=hook,
                priority=priority,
                policy=policy,
                device=device,
            )
        )

    def rule(self, table: TableId, chain: str, comment: str, statements: list[JSON]) -> None:
        if len(comment) > COMMENT_MAX:  # the parser bounds ids so that this cannot happen
            raise BugError(f"rule comment {comment!r} is longer than nft reads back ({COMMENT_MAX})")
        # The compiler only ever writes zeroed counters, so the canonical text is a plain sorted dump.
        self.rules.append(
            Rule(table, chain, comment, json.dumps(statements, sort_keys=True, separators=(",", ":")))
        )

    def address_set(self, name: str, ranges: tuple[AddressRange, ...], table: TableId | None = None) -> str:
        elems = self.cache.elements.get(ranges) if self.cache is not None else None
        if elems is None:
            elems = frozenset(canonical(x.range_element(r)) for r in ranges)
            if self.cache is not None:
                self.cache.elements[ranges] = elems
        self.sets[name] = NftSet(table or BRIDGE, name, "ipv4_addr", ("interval",), None, elems)
        return name

    def verdict_map(
        self, name: str, entries: dict[str, JSON], *, table: TableId = BRIDGE, key_type: str = "ifname"
    ) -> None:
        key = (name, dump(entries))
        elems = self.cache.maps.get(key) if self.cache is not None else None
        if elems is None:
            elems = frozenset(dump([port, verdict]) for port, verdict in entries.items())
            if self.cache is not None:
                self.cache.maps = {key: elems, **{k: v for k, v in self.cache.maps.items() if k[0] != name}}
        self.sets[name] = NftSet(table, name, key_type, (), "verdict", elems)

    def logged_drop(
        self, table: TableId, chain: str, comment: str, prefix: str, matches: list[JSON] | None = None
    ) -> None:
        s = self.settings
        if s.log_denied:
            self.rule(
                table,
                chain,
                comment + ":log",
                [*(matches or []), x.limit(s.log_rate_per_second, s.log_burst), x.log(prefix, s.nflog_group)],
            )
        self.rule(table, chain, comment, [*(matches or []), x.COUNTER, x.DROP])


def own_ips(vp: VmPolicy) -> JSON:
    return x.anon_set([str(a) for a in vp.vm.ips])


def service_matches(
    service: Service,
    direction: Direction,
    peer: JSON | None,
    arp_peer: JSON | None,
    vp: VmPolicy,
    *,
    paired: bool = False,
) -> list[JSON]:
    out = direction is Direction.OUT
    # The cheap exact compares (protocol, port) come before the address-set lookup (a tree walk in an
    # interval set): a packet for another service is rejected without touching the set. The bench measured
    # this at +10 points of new-flow packet rate with a 10,000-address set.
    peer_m = [peer] if peer is not None else []
    match service:
        case PortService(proto, ports) if ports:
            values = [x.port_value(p.first, p.last) for p in ports]
            return [x.match(x.payload(proto.value, "dport"), x.anon_set(values)), *peer_m]
        case PortService(proto, _):
            return [x.match(x.payload("ip", "protocol"), 6 if proto.value == "tcp" else 17), *peer_m]
        case IcmpService(None, _):
            return [x.match(x.payload("ip", "protocol"), 1), *peer_m]
        case IcmpService(typ, code):
            code_m = [] if code is None else [x.match(x.payload("icmp", "code"), code)]
            return [x.match(x.payload("icmp", "type"), typ), *code_m, *peer_m]
        case ProtocolService(number):
            return [x.match(x.payload("ip", "protocol"), number), *peer_m]
        case NamedService(SpecialService.ANY):
            return peer_m or [x.match(x.payload("ip", "version"), 4)]
        case NamedService(SpecialService.ARP):
            if out:
                return (
                    [x.match(x.payload("arp", "daddr ip"), arp_peer)]
                    if arp_peer is not None
                    else [x.match(x.payload("arp", "hlen"), 6)]
                )
            own = x.match(x.payload("arp", "daddr ip"), own_ips(vp))
            return [x.match(x.payload("arp", "saddr ip"), arp_peer), own] if arp_peer is not None else [own]
        case NamedService(SpecialService.DHCP | SpecialService.DHCP_SERVER):
            # The client's or the server's half, with the peers (which `resolve` widened by the broadcast
            # address for what the VM sends, and by 0.0.0.0 for requests a server takes).
            sport, dport = dhcp_ports(service, direction, paired=paired)
            return [
                x.match(x.payload("udp", "sport"), sport),
                x.match(x.payload("udp", "dport"), dport),
                *peer_m,
            ]
    raise AssertionError(f"unhandled service {service!r}")
