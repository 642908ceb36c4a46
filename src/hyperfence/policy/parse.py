"""Policy files (YAML or JSON) -> `Policy`, with every problem located.

`parse_policy` never stops at the first mistake: each section item is validated on its own (pydantic, strict
mode: `false` is not a port, `"80"` is not a priority), then cross-references are checked (a rule naming a
VM that does not exist, two VMs on one port, an IP claimed twice, ...). If anything is wrong it raises one
`InvalidInputError` listing every problem as `path: message`, e.g. `rules[2].ports[0]: range 80-70 is
reversed (expected 70-80)`. Nothing is returned half-parsed, so nothing half-valid can reach the store or
the kernel.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr

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
    PortService,
    Rule,
    Selector,
    Service,
    Settings,
    SpecialService,
    Vm,
    VmSelector,
)
from hyperfence.policy import syntax
from hyperfence.policy.collector import Collector, Strict
from hyperfence.policy.sections import parse_heartbeats, parse_limits

T = TypeVar("T")

MAX_POLICY_BYTES = 64 * 1024 * 1024


StrOrList = StrictStr | list[StrictStr]


class SettingsDoc(Strict):
    log_denied: StrictBool = True
    log_rate: Annotated[StrictInt, Field(ge=1, le=10000)] = 10
    log_burst: Annotated[StrictInt, Field(ge=1, le=100000)] = 20
    nflog_group: Annotated[StrictInt, Field(ge=1, le=65535)] = 7
    conntrack_mark: Annotated[StrictInt, Field(ge=1, le=0x80000000)] = 0x00200000
    agent_endpoint: StrictStr | None = None
    inventory: Literal["none", "libvirt"] = "none"
    connections_per_vm: Annotated[StrictInt, Field(ge=1, le=MAX_CONNECTIONS)] = Settings().connections_per_vm


class NetworkDoc(Strict):
    name: StrictStr
    bridge: StrictStr
    subnet: StrictStr
    gateway: StrictStr | None = None
    uplinks: list[StrictStr] = []


class VmDoc(Strict):
    name: StrictStr
    id: StrictStr | None = None
    network: StrictStr | None = None
    port: StrictStr
    mac: StrictStr
    ips: list[StrictStr] = Field(min_length=1)
    labels: dict[StrictStr, StrictStr] = {}


class RuleDoc(Strict):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)
    id: StrictStr | None = None
    description: StrictStr = ""
    from_: StrOrList = Field(alias="from")
    to: StrOrList
    protocol: StrictStr | StrictInt | None = None
    ports: Any = None  # checked by syntax.parse_port_range, which names the bad item
    icmp_type: StrictStr | StrictInt | None = None
    icmp_code: StrictInt | None = None
    services: list[StrictStr] | None = None
    action: Literal["allow", "deny", "reject"] = "allow"
    priority: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 1000
    log: StrictBool = False


class PolicyDoc(Strict):
    version: Literal[1] = 1
    settings: dict[str, Any] = {}
    networks: list[Any] = Field(min_length=1)
    vms: list[Any] = []
    ipsets: dict[str, Any] = {}
    rules: list[Any] = []
    limits: list[Any] = []
    heartbeats: list[Any] = []


def load_document(text: str, *, source: str = "policy") -> Any:
    """YAML (a superset of JSON) -> plain data. Syntax errors become one located problem."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise InvalidInputError(f"{source}: larger than {MAX_POLICY_BYTES} bytes; split it or use IP sets")
    try:
        if text.lstrip().startswith("{"):
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"{source} is not valid JSON", [Problem(f"line {e.lineno} column {e.colno}", e.msg)]
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise InvalidInputError(
            f"{source} is not valid YAML", [Problem(where, str(getattr(e, "problem", e)))]
        ) from None


def parse_policy_text(text: str, *, source: str = "policy") -> Policy:
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
    doc = c.model(PolicyDoc, data, "")
    if doc is None:
        raise InvalidInputError(f"{source} has {len(c.problems)} problem(s)", c.problems)

    settings = _settings(c, doc.settings)
    networks = _networks(c, doc.networks)
    vms = _vms_cached(c, doc.vms, networks)
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


def _settings(c: Collector, data: dict[str, Any]) -> Settings:
    doc = c.model(SettingsDoc, data, "settings")
    if doc is None:
        return Settings()
    if doc.conntrack_mark & (doc.conntrack_mark - 1):
        c.add(
            "settings.conntrack_mark", f"{doc.conntrack_mark:#x} is not a single bit (expected e.g. 0x200000)"
        )
    endpoint = None
    if doc.agent_endpoint is not None:
        endpoint = c.value(_endpoint, doc.agent_endpoint, "settings.agent_endpoint")
    return Settings(
        log_denied=doc.log_denied,
        log_rate_per_second=doc.log_rate,
        log_burst=doc.log_burst,
        nflog_group=doc.nflog_group,
        conntrack_mark=doc.conntrack_mark,
        agent_endpoint=endpoint,
        inventory=doc.inventory,
        connections_per_vm=doc.connections_per_vm,
    )


def _endpoint(text: str) -> tuple[IPv4Address, int]:
    addr, sep, port = text.rpartition(":")
    try:
        ip, number = IPv4Address(addr), int(port)
    except ValueError:
        ip, number = None, 0
    if not sep or ip is None or not 1 <= number <= 65535:
        raise ValueError(f"{text!r} is not ADDRESS:PORT (expected e.g. 10.77.0.1:7474)")
    return ip, number


def _networks(c: Collector, items: list[Any]) -> list[Network]:
    out: list[Network] = []
    seen_names: set[str] = set()
    seen_bridges: set[str] = set()
    for i, raw in enumerate(items):
        p = f"networks[{i}]"
        doc = c.model(NetworkDoc, raw, p)
        if doc is None:
            continue
        name = c.value(syntax.parse_name, doc.name, f"{p}.name")
        bridge = c.value(syntax.parse_ifname, doc.bridge, f"{p}.bridge")
        subnet = c.value(syntax.parse_network, doc.subnet, f"{p}.subnet")
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
_LAST_VMS: tuple[str, tuple[Network, ...], list[Vm]] | None = None


def _vms_cached(c: Collector, items: list[Any], networks: list[Network]) -> list[Vm]:
    global _LAST_VMS  # noqa: PLW0603 - a one-entry memo of a pure function
    key = _json_key(items)
    if key is not None and _LAST_VMS is not None and _LAST_VMS[0] == key and _LAST_VMS[1] == tuple(networks):
        return _LAST_VMS[2]
    before = len(c.problems)
    vms = _vms(c, items, networks)
    if key is not None and len(c.problems) == before:
        _LAST_VMS = (key, tuple(networks), vms)
    return vms


def _vms(c: Collector, items: list[Any], networks: list[Network]) -> list[Vm]:
    out: list[Vm] = []
    by_name = {n.name: n for n in networks}
    owners: dict[str, dict[object, str]] = {"name": {}, "id": {}, "port": {}, "mac": {}, "ip": {}}

    def claim(kind: str, key: object, path: str, who: str) -> None:
        other = owners[kind].setdefault(key, who)
        if other != who:
            c.add(path, f"{key} is already used by VM {other!r} (expected each VM to have its own {kind})")

    for i, raw in enumerate(items):
        p = f"vms[{i}]"
        doc = _cached_vm_doc(raw)
        if doc is None:
            doc = c.model(VmDoc, raw, p)
            if doc is None:
                continue
            _remember_vm_doc(raw, doc)
        name = c.value(lambda s: syntax.parse_name(s, "VM name"), doc.name, f"{p}.name")
        vm_id = c.value(lambda s: syntax.parse_name(s, "VM id"), doc.id or doc.name, f"{p}.id")
        port = c.value(syntax.parse_ifname, doc.port, f"{p}.port")
        mac = c.value(syntax.parse_mac, doc.mac, f"{p}.mac")
        ips = tuple(
            a
            for j, s in enumerate(doc.ips)
            if (a := c.value(syntax.parse_ipv4, s, f"{p}.ips[{j}]")) is not None
        )
        labels: list[tuple[str, str]] = []
        for k, v in sorted(doc.labels.items()):
            if not syntax.LABEL_RE.match(k) or not syntax.LABEL_RE.match(v):
                c.add(
                    f"{p}.labels.{k}",
                    f"{k}={v!r} is not a label (expected KEY=VALUE of letters, digits, '_', '.', '/', '-')",
                )
            else:
                labels.append((k, v))
        if doc.network is None:
            if len(networks) != 1:
                c.add(
                    f"{p}.network",
                    f"missing (expected the name of one of the networks, as there are {len(networks)})",
                )
                continue
            net = networks[0]
        elif doc.network not in by_name:
            c.add(
                f"{p}.network",
                f"{doc.network!r} is not a declared network "
                f"(expected one of: {', '.join(sorted(by_name)) or 'none declared'})",
            )
            continue
        else:
            net = by_name[doc.network]
        for j, a in enumerate(ips):
            if a not in net.subnet:
                c.add(f"{p}.ips[{j}]", f"{a} is not in network {net.name!r} ({net.subnet})")
            if a == net.gateway:
                c.add(f"{p}.ips[{j}]", f"{a} is the gateway of network {net.name!r} (the host's address)")
        if port is not None and port in net.uplinks:
            c.add(f"{p}.port", f"{port!r} is declared as an uplink of network {net.name!r}")
        if name is None or vm_id is None or port is None or mac is None or len(ips) != len(doc.ips):
            continue
        who = f"{name}"
        claim("name", name, f"{p}.name", who)
        claim("id", vm_id, f"{p}.id", who)
        claim("port", f"{port} on {net.bridge}", f"{p}.port", who)
        claim("mac", mac, f"{p}.mac", who)
        for j, a in enumerate(ips):
            claim("ip", a, f"{p}.ips[{j}]", who)
        out.append(
            Vm(id=vm_id, name=name, network=net.name, port=port, mac=mac, ips=ips, labels=tuple(labels))
        )
    return out


def _ipsets(c: Collector, items: dict[str, Any]) -> dict[str, tuple[AddressRange, ...]]:
    out: dict[str, tuple[AddressRange, ...]] = {}
    for name, raw in items.items():
        p = f"ipsets.{name}"
        if c.value(lambda s: syntax.parse_name(s, "IP set name"), name, p) is None:
            continue
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            c.add(p, f"expected a list of addresses, CIDRs or ranges (got {raw!r:.60})")
            continue
        ranges = tuple(
            r
            for j, s in enumerate(raw)
            if (r := c.value(syntax.parse_address_range, s, f"{p}[{j}]")) is not None
        )
        if len(ranges) == len(raw):
            out[name] = ranges
    return out


def _rule_services(c: Collector, doc: RuleDoc, p: str) -> tuple[Service, ...]:
    if doc.services is not None:
        if doc.protocol is not None or doc.ports is not None or doc.icmp_type is not None:
            c.add(p, "both services and protocol/ports/icmp_type given (expected one way of naming services)")
        if not doc.services:
            c.add(f"{p}.services", "empty (expected at least one service, or `any`)")
        return tuple(
            s
            for j, t in enumerate(doc.services)
            if (s := c.value(syntax.parse_service, t, f"{p}.services[{j}]")) is not None
        )
    proto = "any" if doc.protocol is None else doc.protocol
    if (
        isinstance(proto, int)
        or proto.isdigit()
        or (proto in syntax.PROTOCOL_NAMES and proto not in ("tcp", "udp", "icmp"))
    ):
        number = c.value(syntax.parse_protocol_number, proto, f"{p}.protocol")
        svc: Service | None = None if number is None else syntax.normalize_protocol_service(number)
    elif proto in ("tcp", "udp"):
        raw = doc.ports if isinstance(doc.ports, list) else ([] if doc.ports is None else [doc.ports])
        ports = tuple(
            r
            for j, x in enumerate(raw)
            if (
                r := c.value(
                    syntax.parse_port_range,
                    x,
                    f"{p}.ports[{j}]" if isinstance(doc.ports, list) else f"{p}.ports",
                )
            )
            is not None
        )
        svc = PortService(L4(proto), syntax.normalize_ports(ports))
    elif proto == "icmp":
        typ = (
            c.value(syntax.parse_icmp_type, doc.icmp_type, f"{p}.icmp_type")
            if doc.icmp_type is not None
            else None
        )
        if doc.icmp_code is not None and doc.icmp_type is None:
            c.add(f"{p}.icmp_code", "given without icmp_type (expected icmp_type too)")
        code = (
            c.value(syntax.parse_icmp_code, doc.icmp_code, f"{p}.icmp_code")
            if doc.icmp_code is not None
            else None
        )
        svc = IcmpService(typ, code)
    else:
        svc = c.value(syntax.parse_service, proto, f"{p}.protocol")
    if doc.ports is not None and proto not in ("tcp", "udp"):
        c.add(f"{p}.ports", f"ports given for protocol {proto!r} (expected protocol tcp or udp)")
    if doc.icmp_type is not None and proto != "icmp":
        c.add(f"{p}.icmp_type", f"icmp_type given for protocol {proto!r} (expected protocol icmp)")
    return () if svc is None else (svc,)


_RULES_MEMO: (
    tuple[tuple[set[str], dict[str, tuple[AddressRange, ...]], bool], dict[int, tuple[Any, Rule]]] | None
) = None


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
        p = f"rules[{i}]"
        # Compared with a private copy of the item as it was validated (a plain `==`, no serialisation).
        seen = memo.get(i)
        if seen is not None and seen[0] == raw and ids.setdefault(seen[1].id, i) == i:
            out.append(seen[1])
            fresh[i] = seen
            continue
        before = len(c.problems)
        doc = c.model(RuleDoc, raw, p)
        if doc is None:
            continue
        rule_id = c.value(lambda s: syntax.parse_name(s, "rule id"), doc.id or f"r{i}", f"{p}.id")
        if rule_id is not None and len(rule_id) > 32:
            c.add(
                f"{p}.id",
                f"{rule_id!r} is longer than 32 characters (it is written into kernel log prefixes)",
            )
        if rule_id is not None and (first := ids.setdefault(rule_id, i)) != i:
            c.add(f"{p}.id", f"{rule_id!r} is also the id of rules[{first}] (expected unique ids)")
        sides: dict[str, tuple[Selector, ...]] = {}
        for side, value in (("from", doc.from_), ("to", doc.to)):
            texts = [value] if isinstance(value, str) else value
            if not texts:
                c.add(f"{p}.{side}", "empty (expected at least one selector)")
            sels: list[Selector] = []
            for j, t in enumerate(texts):
                path = f"{p}.{side}" if isinstance(value, str) else f"{p}.{side}[{j}]"
                sel = c.value(syntax.parse_selector, t, path)
                if sel is None:
                    continue
                if isinstance(sel, VmSelector) and sel.name not in vm_names and strict_names:
                    c.add(
                        path,
                        f"VM {sel.name!r} is not declared (expected one of: "
                        f"{', '.join(sorted(vm_names)[:10]) or 'no VMs declared'})",
                    )
                if isinstance(sel, IpSetSelector) and sel.name not in ipsets:
                    c.add(
                        path,
                        f"IP set {sel.name!r} is not declared (expected one of: "
                        f"{', '.join(sorted(ipsets)) or 'no IP sets declared'})",
                    )
                sels.append(sel)
            sides[side] = tuple(sels)
        services = _rule_services(c, doc, p)
        action = Action(doc.action)
        if action is Action.REJECT and any(
            isinstance(s, NamedService) and s.kind is not SpecialService.ANY for s in services
        ):
            c.add(f"{p}.action", "reject applies to IP traffic only (expected deny for arp/dhcp services)")
        if rule_id is None:
            continue
        rule = Rule(
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
        out.append(rule)
        if len(c.problems) == before and (copy := _plain_copy(raw)) is not None:
            fresh[i] = (copy, rule)
    if not c.problems:
        _RULES_MEMO = (token, fresh)
    return out
