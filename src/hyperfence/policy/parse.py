"""Policy files (YAML or JSON) -> `Policy`, with every problem located.

`parse_policy` never stops at the first mistake: each section item is validated on its own (pydantic, strict
mode: `false` is not a port, `"80"` is not a priority), then cross-references are checked (a rule naming a
VM that does not exist, two VMs on one port, an IP claimed twice, ...). If anything is wrong it raises one
`InvalidInputError` listing every problem as `path: message`, e.g. `rules[2].ports[0]: range 80-70 is
reversed (expected 70-80)`. Nothing is returned half-parsed, so nothing half-valid can reach the store or
the kernel.

Each mistake is reported once, where it is (see `collector`): a bad field does not hide the other fields of
its item, and an item that is wrong (a VM with a bad MAC) is not reported again wherever it is referenced.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, StrictBool, StrictInt, StrictStr

from hyperfence.errors import InvalidInputError, Problem
from hyperfence.model.policy import (
    L4,
    MAX_CONNECTIONS,
    Action,
    AddressRange,
    IcmpService,
    IpSetSelector,
    NamedService,
    Network,
    Policy,
    PortRange,
    PortService,
    Rule,
    Selector,
    Service,
    Settings,
    SpecialService,
    Vm,
    VmSelector,
)
from hyperfence.policy import edits as edits_module
from hyperfence.policy import syntax
from hyperfence.policy.collector import ALL, Collector, Strict, key_path, one_or_list, shown
from hyperfence.policy.document import load_document
from hyperfence.policy.memo import Recent
from hyperfence.policy.objects import HEAD, ObjectChange
from hyperfence.policy.sections import parse_heartbeats, parse_limits, parsed_selectors

T = TypeVar("T")

# Every field has a default, so that one bad field leaves the others to be checked (`Collector.fields`);
# the required ones are named where the item is parsed. `Any` fields are checked by the `syntax` functions,
# which name each bad list item.


class SettingsDoc(Strict):
    log_denied: StrictBool = True
    log_rate: Annotated[StrictInt, Field(ge=1, le=10000)] = 10
    log_burst: Annotated[StrictInt, Field(ge=1, le=100000)] = 20
    nflog_group: Annotated[StrictInt, Field(ge=1, le=65535)] = 7
    learn_group: Annotated[StrictInt, Field(ge=1, le=65535)] = 8
    conntrack_mark: Annotated[StrictInt, Field(ge=1, le=0x80000000)] = 0x00200000
    agent_endpoint: StrictStr | None = None
    inventory: Literal["none", "libvirt"] = "none"
    connections_per_vm: Annotated[StrictInt, Field(ge=1, le=MAX_CONNECTIONS)] = Settings().connections_per_vm
    host_addresses: list[Any] = []  # addresses, CIDRs or ranges: checked by syntax.parse_address_range


class NetworkDoc(Strict):
    name: StrictStr | None = None  # required
    bridge: StrictStr | None = None  # required
    subnet: StrictStr | None = None  # required
    gateway: StrictStr | None = None
    uplinks: list[StrictStr] = []


NETWORK_REQUIRED = ("name", "bridge", "subnet")


class VmDoc(Strict):
    name: StrictStr | None = None  # required
    id: StrictStr | None = None
    network: StrictStr | None = None
    port: StrictStr | None = None  # required
    mac: StrictStr | None = None  # required
    # Omitted: the VM's addresses are learned from its DHCP leases (`Vm.learns`).
    ips: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    labels: dict[StrictStr, StrictStr] = {}


VM_REQUIRED = ("name", "port", "mac")


class RuleDoc(Strict):
    id: StrictStr | None = None
    description: StrictStr = ""
    from_: Any = Field(None, alias="from")  # required: a selector or a list of them
    to: Any = None  # required: the same
    protocol: Any = None  # a name or a number
    ports: Any = None  # a port, a range or a list of them
    icmp_type: Any = None
    icmp_code: Any = None
    services: Any = None  # a list of services
    action: Literal["allow", "deny", "reject"] = "allow"
    priority: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 1000
    log: StrictBool = False


RULE_REQUIRED = ("from", "to")


class PolicyDoc(Strict):
    version: Literal[1] = 1
    settings: Any = None  # a mapping: checked field by field by SettingsDoc
    networks: Annotated[list[Any], Field(min_length=1)] = []  # required
    vms: list[Any] = []
    ipsets: Any = None  # a mapping of names to address lists: checked by _ipsets
    rules: list[Any] = []
    limits: list[Any] = []
    heartbeats: list[Any] = []


def parse_policy_text(text: str | bytes, *, source: str = "policy") -> Policy:
    return parse_policy(load_document(text, source=source), source=source)


def parse_policy(data: Any, *, source: str = "policy") -> Policy:
    """Validate a whole policy document. Raises `InvalidInputError` with every problem, or returns it."""
    c = Collector()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"{source} is not a policy",
            [Problem("", f"expected a mapping with networks, vms, ipsets, rules; got {type(data).__name__}")],
        )
    got = c.fields(PolicyDoc, data, "", required=("networks",))
    if got is None:
        raise InvalidInputError(f"{source} has {len(c.problems)} problem(s)", c.problems)
    doc, bad = got
    # A section that is wrong as a whole is reported once: not again at each reference into it.
    for section, kind in (("networks", "network"), ("vms", "vm"), ("ipsets", "ipset")):
        if section in bad:
            c.mark_reported(kind)

    settings = _settings(c, doc.settings)
    networks = _networks(c, doc.networks)
    vms = _vms_cached(c, doc.vms, networks, declared=len(doc.networks))
    ipsets = _ipsets(c, doc.ipsets)
    # (No rules, nothing to validate: and the memo of the last policy's rules stays as it is.)
    rules = _rules(c, doc.rules, vms, ipsets, strict_names=settings.inventory == "none") if doc.rules else []
    names = {v.name for v in vms} if settings.inventory == "none" else None  # None: any name may appear
    limits, caps = parse_limits(c, doc.limits, names)
    heartbeats = parse_heartbeats(c, doc.heartbeats, names)
    if c.problems:
        raise InvalidInputError(f"{source} has {len(c.problems)} problem(s)", c.problems)
    return Policy(
        networks=tuple(networks),
        vms=tuple(vms),
        ipsets=tuple(sorted(ipsets.items())),
        rules=tuple(rules),
        settings=settings,
        limits=tuple(limits),
        connection_caps=tuple(caps),
        heartbeats=tuple(heartbeats),
    )


def _settings(c: Collector, data: Any) -> Settings:
    got = c.fields(SettingsDoc, {} if data is None else data, "settings")
    if got is None:
        c.mark_reported("vm")  # VMs may come from an inventory: which names exist is unknown
        return Settings()
    doc, bad = got
    if "inventory" in bad:
        c.mark_reported("vm")  # VMs may come from an inventory: which names exist is unknown
    if doc.learn_group == doc.nflog_group:
        c.add(
            "settings.learn_group",
            f"{doc.learn_group} is also nflog_group (expected a group of its own for DHCP learning)",
        )
    if doc.conntrack_mark & (doc.conntrack_mark - 1):
        c.add(
            "settings.conntrack_mark", f"{doc.conntrack_mark:#x} is not a single bit (expected e.g. 0x200000)"
        )
    endpoint = None
    if doc.agent_endpoint is not None:
        endpoint = c.value(_endpoint, doc.agent_endpoint, "settings.agent_endpoint")
    host_addresses = tuple(
        r
        for j, text in enumerate(doc.host_addresses)
        if (r := c.value(syntax.parse_address_range, text, f"settings.host_addresses[{j}]")) is not None
    )
    return Settings(
        log_denied=doc.log_denied,
        log_rate_per_second=doc.log_rate,
        log_burst=doc.log_burst,
        nflog_group=doc.nflog_group,
        learn_group=doc.learn_group,
        conntrack_mark=doc.conntrack_mark,
        agent_endpoint=endpoint,
        inventory=doc.inventory,
        connections_per_vm=doc.connections_per_vm,
        host_addresses=host_addresses,
    )


def _endpoint(text: str) -> tuple[IPv4Address, int]:
    addr, sep, port = text.rpartition(":")
    try:
        ip, number = IPv4Address(addr), int(port)
    except ValueError:
        ip, number = None, 0
    if not sep or ip is None or not 1 <= number <= 65535:
        raise ValueError(f"{shown(text)} is not ADDRESS:PORT (expected e.g. 10.77.0.1:7474)")
    return ip, number


def _networks(c: Collector, items: list[Any]) -> list[Network]:
    out: list[Network] = []
    seen_names: set[str] = set()
    seen_bridges: set[str] = set()
    for i, raw in enumerate(items):
        p = f"networks[{i}]"
        got = c.fields(NetworkDoc, raw, p, required=NETWORK_REQUIRED)
        if got is None:
            continue
        doc, _ = got
        name = c.value(syntax.parse_name, doc.name, f"{p}.name") if doc.name is not None else None
        bridge = c.value(syntax.parse_ifname, doc.bridge, f"{p}.bridge") if doc.bridge is not None else None
        subnet = c.value(syntax.parse_network, doc.subnet, f"{p}.subnet") if doc.subnet is not None else None
        gateway = c.value(syntax.parse_ipv4, doc.gateway, f"{p}.gateway") if doc.gateway else None
        uplinks = tuple(
            u
            for j, raw_u in enumerate(doc.uplinks)
            if (u := c.value(syntax.parse_ifname, raw_u, f"{p}.uplinks[{j}]")) is not None
        )
        if name in seen_names:
            c.add(f"{p}.name", f"{name!r} is used by another network (expected unique names)")
        if bridge in seen_bridges:
            c.add(f"{p}.bridge", f"{bridge!r} is used by another network (expected one network per bridge)")
        if subnet is not None and gateway is not None and gateway not in subnet:
            c.add(f"{p}.gateway", f"{gateway} is not in subnet {subnet}")
        if name is None or bridge is None or subnet is None:
            if doc.name is not None:
                c.mark_reported("network", doc.name)
            continue
        seen_names.add(name)
        seen_bridges.add(bridge)
        out.append(Network(name=name, bridge=bridge, subnet=subnet, gateway=gateway, uplinks=uplinks))
    return out


# Validated VM items by their JSON text: a policy of 1,000 VMs changes one rule at a time, and re-validating
# every unchanged VM item would cost most of a one-rule apply. Only items that validated are remembered.
_VM_DOCS: dict[str, VmDoc] = {}
_VM_DOCS_MAX = 20_000


def _plain_copy(raw: Any) -> Any:
    """A deep copy of plain JSON data, or None when it is not plain JSON."""
    key = _json_key(raw)
    return None if key is None else json.loads(key)


def _json_key(raw: Any) -> str | None:
    """Canonical JSON text of plain data (a memo key), or None when it is not plain JSON."""
    try:
        return json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):
        return None


def _cached_vm_doc(raw: Any) -> VmDoc | None:
    key = _json_key(raw)
    return None if key is None else _VM_DOCS.get(key)


def _remember_vm_doc(raw: Any, doc: VmDoc) -> None:
    key = _json_key(raw)
    if key is None:
        return
    if len(_VM_DOCS) >= _VM_DOCS_MAX:
        _VM_DOCS.clear()
    _VM_DOCS[key] = doc


# The last valid `vms` section, by its JSON text and the networks it was checked against: a one-rule change
# of a 1,000-VM policy then reuses the very same Vm objects (which also lets resolve and compile see at a
# glance that nothing about the VMs changed).
_LAST_VMS: tuple[str, tuple[tuple[Network, ...], int], list[Vm]] | None = None


def _vms_cached(c: Collector, items: list[Any], networks: list[Network], *, declared: int) -> list[Vm]:
    """`declared`: how many networks the policy declares, valid or not."""
    global _LAST_VMS  # noqa: PLW0603 - a one-entry memo of a pure function
    key = _json_key(items)
    against = (tuple(networks), declared)
    if key is not None and _LAST_VMS is not None and _LAST_VMS[0] == key and _LAST_VMS[1] == against:
        return _LAST_VMS[2]
    before = len(c.problems)
    vms = _vms(c, items, networks, declared=declared)
    if key is not None and len(c.problems) == before:
        _LAST_VMS = (key, against, vms)
    return vms


def _vm_doc(c: Collector, raw: Any, p: str) -> VmDoc | None:
    """The item's document (its bad fields, reported, hold None), remembered when it had no problem."""
    doc = _cached_vm_doc(raw)
    if doc is not None:
        return doc
    got = c.fields(VmDoc, raw, p, required=VM_REQUIRED)
    if got is None:
        return None
    doc, bad = got
    if not bad:
        _remember_vm_doc(raw, doc)
    return doc


def _vm_network(
    c: Collector, doc: VmDoc, p: str, networks: list[Network], *, declared: int
) -> Network | None:
    """The VM's network, or None with the problem collected (unless the network's own problems are)."""
    if doc.network is None:
        if declared == 1 and len(networks) == 1:
            return networks[0]
        if declared != 1 and not c.is_reported("network", ALL):
            c.add(
                f"{p}.network", f"missing (expected the name of one of the networks, as there are {declared})"
            )
        return None
    for net in networks:
        if net.name == doc.network:
            return net
    if not c.is_reported("network", doc.network):
        c.add(
            f"{p}.network",
            f"{shown(doc.network)} is not a declared network "
            f"(expected one of: {', '.join(sorted(n.name for n in networks)) or 'none declared'})",
        )
    return None


def _vms(c: Collector, items: list[Any], networks: list[Network], *, declared: int) -> list[Vm]:
    out: list[Vm] = []
    owners: dict[str, dict[object, str]] = {"name": {}, "id": {}, "port": {}, "mac": {}, "ip": {}}

    def claim(kind: str, key: object, path: str, who: str) -> None:
        other = owners[kind].setdefault(key, who)
        if other != who:
            c.add(path, f"{key} is already used by VM {other!r} (expected each VM to have its own {kind})")

    for i, raw in enumerate(items):
        p = f"vms[{i}]"
        doc = _vm_doc(c, raw, p)
        if doc is None:
            continue
        name = (
            None
            if doc.name is None
            else c.value(lambda s: syntax.parse_name(s, "VM name"), doc.name, f"{p}.name")
        )
        # (No id: the name is the id, and a bad name is reported once, as a name.)
        vm_id = c.value(lambda s: syntax.parse_name(s, "VM id"), doc.id, f"{p}.id") if doc.id else name
        port = c.value(syntax.parse_ifname, doc.port, f"{p}.port") if doc.port is not None else None
        mac = c.value(syntax.parse_mac, doc.mac, f"{p}.mac") if doc.mac is not None else None
        ips = tuple(
            a
            for j, s in enumerate(doc.ips or ())
            if (a := c.value(syntax.parse_ipv4, s, f"{p}.ips[{j}]")) is not None
        )
        labels: list[tuple[str, str]] = []
        for k, v in sorted(doc.labels.items()):
            if not syntax.LABEL_RE.fullmatch(k) or not syntax.LABEL_RE.fullmatch(v):
                c.add(
                    key_path(f"{p}.labels", k),
                    f"{shown(k)}: {shown(v)} is not a label "
                    "(expected KEY: VALUE of letters, digits, '_', '.', '/', '-')",
                )
            else:
                labels.append((k, v))
        net = _vm_network(c, doc, p, networks, declared=declared)
        if net is not None:
            for j, a in enumerate(ips):
                if a not in net.subnet:
                    c.add(f"{p}.ips[{j}]", f"{a} is not in network {net.name!r} ({net.subnet})")
                if a == net.gateway:
                    c.add(f"{p}.ips[{j}]", f"{a} is the gateway of network {net.name!r} (the host's address)")
            if port is not None and port in net.uplinks:
                c.add(f"{p}.port", f"{port!r} is declared as an uplink of network {net.name!r}")
        if (
            net is None
            or name is None
            or vm_id is None
            or port is None
            or mac is None
            or len(ips) != len(doc.ips or ())
        ):
            # Its problems are reported here: a rule naming it is not told it is "not declared".
            if doc.name is not None:
                c.mark_reported("vm", doc.name.strip())  # (as a selector names it: stripped)
            continue
        who = f"{name}"
        claim("name", name, f"{p}.name", who)
        claim("id", vm_id, f"{p}.id", who)
        claim("port", f"{port} on {net.bridge}", f"{p}.port", who)
        claim("mac", mac, f"{p}.mac", who)
        for j, a in enumerate(ips):
            claim("ip", a, f"{p}.ips[{j}]", who)
        out.append(
            Vm(
                id=vm_id,
                name=name,
                network=net.name,
                port=port,
                mac=mac,
                ips=ips,
                labels=tuple(labels),
                learns=doc.ips is None,
            )
        )
    return out


def _ipsets(c: Collector, items: Any) -> dict[str, tuple[AddressRange, ...]]:
    out: dict[str, tuple[AddressRange, ...]] = {}
    if items is None:
        return out
    if not isinstance(items, dict):
        c.add("ipsets", f"expected a mapping of IP set names to address lists (got {shown(items)})")
        c.mark_reported("ipset")
        return out
    for name, raw in items.items():
        p = key_path("ipsets", name)
        if c.value(lambda s: syntax.parse_name(s, "IP set name"), name, p) is None:
            continue
        if not isinstance(raw, list):
            c.add(p, f"expected a list of addresses, CIDRs or ranges (got {shown(raw)})")
            c.mark_reported("ipset", name)
            continue
        ranges = tuple(
            r
            for j, s in enumerate(raw)
            if (r := c.value(syntax.parse_address_range, s, f"{p}[{j}]")) is not None
        )
        if len(ranges) == len(raw):
            out[name] = ranges
        else:
            c.mark_reported("ipset", name)
    return out


PROTOCOL_HELP = "expected tcp, udp, icmp, arp, dhcp, dhcp-server, any, a number 0-255 or one of " + ", ".join(
    n for n in syntax.PROTOCOL_NAMES if n not in ("tcp", "udp", "icmp")
)


def _rule_services(c: Collector, doc: RuleDoc, p: str) -> tuple[Service, ...]:
    """The rule's services, from `services` or from protocol/ports/icmp_type/icmp_code. Each field is
    checked on its own, so that a bad protocol does not hide bad ports."""
    if doc.services is not None:
        if doc.protocol is not None or doc.ports is not None or doc.icmp_type is not None:
            c.add(p, "both services and protocol/ports/icmp_type given (expected one way of naming services)")
        if not isinstance(doc.services, list):
            c.add(
                f"{p}.services",
                f"expected a list of services, e.g. [tcp/80, udp/53] (got {shown(doc.services)})",
            )
            return ()
        if not doc.services:
            c.add(f"{p}.services", "empty (expected at least one service, or `any`)")
        # The same service named twice (`icmp/echo-request` and `icmp/8`) is one service: kept once, so that
        # every nft rule of the rule has its own id (`rule:<id>#<n>`).
        return tuple(
            dict.fromkeys(
                s
                for j, t in enumerate(doc.services)
                if (s := c.value(syntax.parse_service, t, f"{p}.services[{j}]")) is not None
            )
        )
    ports: tuple[PortRange, ...] = ()
    if doc.ports is not None:
        if doc.ports == []:
            c.add(f"{p}.ports", "empty (expected at least one port; leave ports out for all ports)")
        ports = tuple(
            r
            for where, x in one_or_list(doc.ports, f"{p}.ports")
            if (r := c.value(syntax.parse_port_range, x, where)) is not None
        )
    typ = None if doc.icmp_type is None else c.value(syntax.parse_icmp_type, doc.icmp_type, f"{p}.icmp_type")
    code = None if doc.icmp_code is None else c.value(syntax.parse_icmp_code, doc.icmp_code, f"{p}.icmp_code")
    if doc.icmp_code is not None and doc.icmp_type is None:
        c.add(f"{p}.icmp_code", "given without icmp_type (expected icmp_type too)")
    proto = "any" if doc.protocol is None else doc.protocol
    svc: Service | None
    if proto in ("tcp", "udp"):
        svc = PortService(L4(proto), syntax.normalize_ports(ports))
    elif proto == "icmp":
        svc = IcmpService(typ, code)
    elif isinstance(proto, int) or (
        isinstance(proto, str) and (proto.isdigit() or proto in syntax.PROTOCOL_NAMES)
    ):
        number = c.value(syntax.parse_protocol_number, proto, f"{p}.protocol")
        svc = None if number is None else syntax.normalize_protocol_service(number)
    else:
        try:
            svc = syntax.parse_service(proto)  # also `tcp/80`, `arp`, `any`, ...
        except ValueError:
            c.add(f"{p}.protocol", f"{shown(proto)} is not a protocol ({PROTOCOL_HELP})")
            return ()  # which ports or ICMP types it may have is unknown
    if svc is None:
        return ()
    if doc.ports is not None and proto not in ("tcp", "udp"):
        c.add(f"{p}.ports", f"ports given for protocol {shown(proto)} (expected protocol tcp or udp)")
    if doc.icmp_type is not None and proto != "icmp":
        c.add(f"{p}.icmp_type", f"icmp_type given for protocol {shown(proto)} (expected protocol icmp)")
    return (svc,)


_RULES_MEMO: (
    tuple[tuple[set[str], dict[str, tuple[AddressRange, ...]], bool], dict[int, tuple[Any, Rule]]] | None
) = None


def _rule_side(
    c: Collector,
    value: Any,
    path: str,
    vm_names: set[str],
    ipsets: dict[str, tuple[AddressRange, ...]],
    *,
    strict_names: bool,
) -> tuple[Selector, ...]:
    """The selectors of a rule's `from` or `to` (one or a list), each problem located."""
    sels: list[Selector] = []
    for where, _, sel in parsed_selectors(c, value, path):
        if (
            isinstance(sel, VmSelector)
            and sel.name not in vm_names
            and strict_names
            and not c.is_reported("vm", sel.name)
        ):
            c.add(
                where,
                f"VM {sel.name!r} is not declared (expected one of: "
                f"{', '.join(sorted(vm_names)[:10]) or 'no VMs declared'})",
            )
        if isinstance(sel, IpSetSelector) and sel.name not in ipsets and not c.is_reported("ipset", sel.name):
            c.add(
                where,
                f"IP set {sel.name!r} is not declared (expected one of: "
                f"{', '.join(sorted(ipsets)) or 'no IP sets declared'})",
            )
        sels.append(sel)
    return tuple(sels)


def _rules(
    c: Collector,
    items: list[Any],
    vms: list[Vm],
    ipsets: dict[str, tuple[AddressRange, ...]],
    *,
    strict_names: bool = True,
) -> list[Rule]:
    """`strict_names`: a `vm:NAME` naming no declared VM is a problem (False with an inventory: the VM may
    appear later)."""
    out: list[Rule] = []
    vm_names = {v.name for v in vms}
    ids: dict[str, int] = {}
    # Rules that validated last time against the same VMs and IP sets are taken back as they were (same
    # objects): a one-rule change of a 1,000-rule policy validates one rule.
    global _RULES_MEMO  # noqa: PLW0603 - a memo of a pure function
    token = (vm_names, ipsets, strict_names)
    memo = _RULES_MEMO[1] if _RULES_MEMO is not None and _RULES_MEMO[0] == token else {}
    fresh: dict[int, tuple[Any, Rule]] = {}
    for i, raw in enumerate(items):
        # Compared with a private copy of the item as it was validated (a plain `==`, no serialisation).
        seen = memo.get(i)
        if seen is not None and seen[0] == raw and ids.setdefault(seen[1].id, i) == i:
            out.append(seen[1])
            fresh[i] = seen
            continue
        before = len(c.problems)
        rule = _rule(c, raw, i, vm_names, ipsets, ids=ids, strict_names=strict_names)
        if rule is None:
            continue
        out.append(rule)
        if len(c.problems) == before and (copy := _plain_copy(raw)) is not None:
            fresh[i] = (copy, rule)
    if not c.problems:
        _RULES_MEMO = (token, fresh)
    return out


def _rule(
    c: Collector,
    raw: Any,
    i: int,
    vm_names: set[str],
    ipsets: dict[str, tuple[AddressRange, ...]],
    *,
    ids: dict[str, int],
    strict_names: bool,
) -> Rule | None:
    """Item `i` of `rules` (its problems added to `c`; None when it cannot be made). `ids`: the rule ids
    taken so far, by item (this one's is added)."""
    p = f"rules[{i}]"
    got = c.fields(RuleDoc, raw, p, required=RULE_REQUIRED)
    if got is None:
        return None
    doc, bad = got
    rule_id = None
    if "id" not in bad:
        rule_id = c.value(lambda s: syntax.parse_id(s, "rule id"), doc.id or f"r{i}", f"{p}.id")
    if rule_id is not None and (first := ids.setdefault(rule_id, i)) != i:
        c.add(f"{p}.id", f"{rule_id!r} is also the id of rules[{first}] (expected unique ids)")
    sides = {
        side: _rule_side(c, value, f"{p}.{side}", vm_names, ipsets, strict_names=strict_names)
        for side, value in (("from", doc.from_), ("to", doc.to))
        if side not in bad
    }
    services = _rule_services(c, doc, p)
    action = Action(doc.action)
    if action is Action.REJECT and any(
        isinstance(s, NamedService) and s.kind is not SpecialService.ANY for s in services
    ):
        c.add(f"{p}.action", "reject applies to IP traffic only (expected deny for arp/dhcp services)")
    if rule_id is None or len(sides) != 2:
        return None
    return Rule(
        id=rule_id,
        index=i,
        from_=sides["from"],
        to=sides["to"],
        services=services,
        action=action,
        priority=doc.priority,
        log=doc.log,
        description=doc.description,
    )


def parse_rules_changed(
    previous: Policy, before: dict[str, Any], document: dict[str, Any], changes: Iterable[ObjectChange]
) -> Policy | None:
    """`parse_policy(document)`, made from `previous` (= `parse_policy(before)`) when `changes` (the object
    changes from `before` to `document`: policy/objects.py) only edit or append rules and every other
    section of `document` is the very object it was in `before`: each changed rule is validated as itself
    (against the same VMs and IP sets), the other rules are `previous`'s objects. None when the change is of
    another kind, or a changed rule has a problem: parse the whole document (which says what, where)."""
    if document.keys() != before.keys() or any(
        document[k] is not before[k] for k in document if k != "rules"
    ):
        return None
    items = document.get("rules")
    if not isinstance(items, list) or len(items) < len(previous.rules):
        return None
    edits: list[int] = []
    for ch in changes:
        if ch.section != "rules" or ch.deleted or ch.name == HEAD or not 0 <= ch.pos < len(items):
            return None
        edits.append(ch.pos)
    if len(items) != len(previous.rules) + sum(1 for i in edits if i >= len(previous.rules)):
        return None
    c = Collector()
    vm_names, ids = _rule_context(previous)
    freed = {previous.rules[i].id for i in edits if i < len(previous.rules)}  # the edited rules' old ids
    added: set[str] = set()
    ipsets = dict(previous.ipsets)
    strict = previous.settings.inventory == "none"
    rules = list(previous.rules)
    at = tuple(sorted(set(edits)))
    for i in at:
        rule = _rule(c, items[i], i, vm_names, ipsets, ids={}, strict_names=strict)
        if rule is None or c.problems or rule.id in added or (rule.id in ids and rule.id not in freed):
            return None  # the whole parse says what is wrong, where (a taken id: at the later rule)
        added.add(rule.id)
        if i < len(rules):
            rules[i] = rule
        else:
            rules.append(rule)
    made = dataclasses.replace(previous, rules=tuple(rules))
    _NAMES.put(previous.vms, vm_names)
    _IDS.put(previous.rules, ids)
    _IDS.put(made.rules, ids if added == freed else (ids - freed) | added)
    edits_module.record(previous.rules, made.rules, at)
    return made


# The VM names and rule ids of the policies `parse_rules_changed` made last and made them from: the next
# one-rule change starts from them instead of a pass over 10,000 VMs and rules (the daemon validates an
# edit, then compiles it: twice from the same policy).
_NAMES: Recent[tuple[Vm, ...], set[str]] = Recent(2)
_IDS: Recent[tuple[Rule, ...], frozenset[str]] = Recent(3)


def _rule_context(policy: Policy) -> tuple[set[str], frozenset[str]]:
    """The VM names and the rule ids of `policy` (both shared: not to be changed)."""
    names, ids = _NAMES.get(policy.vms), _IDS.get(policy.rules)
    return (
        {v.name for v in policy.vms} if names is None else names,
        frozenset(r.id for r in policy.rules) if ids is None else ids,
    )
