"""The small languages inside a policy file: selectors, services, ports, addresses.

Each `parse_*` function takes the text a person wrote and returns a model value, or raises `ValueError`
with a message that says what was expected. The caller adds the location (`rules[2].to[0]`).
"""

from __future__ import annotations

import re
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError

from hyperfence.model.policy import (
    L4,
    MAX_ID_LENGTH,
    AddressRange,
    AddressSelector,
    AllVmsSelector,
    IcmpService,
    IpSetSelector,
    LabelSelector,
    NamedService,
    PortRange,
    PortService,
    ProtocolService,
    Selector,
    Service,
    SpecialPeer,
    SpecialSelector,
    SpecialService,
    VmSelector,
)
from hyperfence.policy.collector import shown

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ID_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_ID_LENGTH - 1}}}$")
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")

# ICMP type names, as nft and ping use them.
ICMP_TYPES: dict[str, int] = {
    "echo-reply": 0,
    "destination-unreachable": 3,
    "source-quench": 4,
    "redirect": 5,
    "echo-request": 8,
    "router-advertisement": 9,
    "router-solicitation": 10,
    "time-exceeded": 11,
    "parameter-problem": 12,
    "timestamp-request": 13,
    "timestamp-reply": 14,
}

PROTOCOL_NAMES: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "sctp": 132,
}

SELECTOR_HELP = (
    "expected vm:NAME, label:KEY=VALUE, vms, ipset:NAME, a CIDR (10.0.0.0/24), "
    "a range (10.0.0.5-10.0.0.9), an address, host, outside or any"
)
SERVICE_HELP = (
    "expected tcp/PORTS, udp/PORTS, tcp, udp, icmp, icmp/TYPE, icmp/TYPE/CODE, proto/NUMBER, "
    "arp, dhcp, dhcp-server or any"
)


def parse_name(text: object, what: str = "name") -> str:
    if not isinstance(text, str) or not NAME_RE.fullmatch(text):
        raise ValueError(
            f"{shown(text)} is not a valid {what} (expected letters, digits, '_', '.', '-'; "
            "at most 63 characters, starting with a letter or digit)"
        )
    return text


def parse_id(text: object, what: str = "rule id") -> str:
    """The id of a rule, limit or heartbeat: a name of at most `MAX_ID_LENGTH` characters (it is written
    into nft comments and kernel log prefixes)."""
    if not isinstance(text, str) or not ID_RE.fullmatch(text):
        raise ValueError(
            f"{shown(text)} is not a valid {what} (expected letters, digits, '_', '.', '-'; "
            f"at most {MAX_ID_LENGTH} characters, starting with a letter or digit)"
        )
    return text


def parse_ifname(text: object) -> str:
    if not isinstance(text, str) or not IFNAME_RE.fullmatch(text):
        raise ValueError(
            f"{shown(text)} is not an interface name (expected 1-15 characters of "
            "letters, digits, '_', '.', ':', '-')"
        )
    return text


def parse_mac(text: str) -> str:
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.fullmatch(mac):
        raise ValueError(
            f"{shown(text)} is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)"
        )
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{shown(text)} is a multicast MAC address (expected a unicast address)")
    return mac


def parse_ipv4(text: str) -> IPv4Address:
    try:
        return IPv4Address(text.strip())
    except AddressValueError:
        raise ValueError(f"{shown(text)} is not an IPv4 address (expected a.b.c.d)") from None


def parse_network(text: str) -> IPv4Network:
    try:
        return IPv4Network(text.strip(), strict=True)
    except (AddressValueError, NetmaskValueError):
        raise ValueError(f"{shown(text)} is not an IPv4 network (expected a.b.c.d/len)") from None
    except ValueError:
        raise ValueError(
            f"{shown(text)} has host bits set (expected the network address, "
            f"e.g. {IPv4Network(text.strip(), strict=False)})"
        ) from None


def parse_address_range(text: object) -> AddressRange:
    """`10.0.0.0/24`, `10.0.0.5-10.0.0.9` or `10.0.0.7`."""
    if not isinstance(text, str):
        raise ValueError(f"{shown(text)} is not an address, CIDR or range (expected e.g. 10.0.0.0/24)")
    t = text.strip()
    if "/" in t:
        return AddressRange.of_network(parse_network(t))
    if "-" in t:
        a, _, b = t.partition("-")
        first, last = parse_ipv4(a), parse_ipv4(b)
        if first > last:
            raise ValueError(f"range {t} is reversed (expected the lower address first: {last}-{first})")
        return AddressRange(first, last)
    return AddressRange.single(parse_ipv4(t))


def parse_selector(text: object) -> Selector:
    if not isinstance(text, str):
        raise ValueError(f"{shown(text)} is not a selector ({SELECTOR_HELP})")
    t = text.strip()
    kind, sep, arg = t.partition(":")
    if sep and kind == "vm":
        return VmSelector(parse_name(arg, "VM name"))
    if sep and kind == "label":
        key, eq, value = arg.partition("=")
        if not eq or not LABEL_RE.fullmatch(key) or not LABEL_RE.fullmatch(value):
            raise ValueError(f"{shown(text)} is not a label selector (expected label:KEY=VALUE)")
        return LabelSelector(key, value)
    if sep and kind == "ipset":
        return IpSetSelector(parse_name(arg, "IP set name"))
    if t == "vms":
        return AllVmsSelector()
    for peer in SpecialPeer:
        if t == peer.value:
            return SpecialSelector(peer)
    if t and (t[0].isdigit()):
        return AddressSelector(parse_address_range(t), t)
    raise ValueError(f"{shown(text)} is not a selector ({SELECTOR_HELP})")


def parse_port_range(value: object) -> PortRange:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{shown(value)} is not a port (expected 1-65535 or a range like 8000-8080)")
    if isinstance(value, int):
        first = last = value
        text = str(value)
    else:
        text = value.strip()
        a, sep, b = text.partition("-")
        if not a.isdigit() or (sep and not b.isdigit()):
            raise ValueError(f"{shown(value)} is not a port (expected 1-65535 or a range like 8000-8080)")
        first, last = int(a), int(b) if sep else int(a)
    for p in (first, last):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is out of range (expected 1-65535)")
    if first > last:
        raise ValueError(f"range {text} is reversed (expected {last}-{first})")
    return PortRange(first, last)


def normalize_ports(ports: tuple[PortRange, ...]) -> tuple[PortRange, ...]:
    """Sorted, with overlapping and adjacent ranges merged: the form nft itself keeps (and lists), so that
    `[443, 80, 81]` and `[80-81, 443]` are the same service and read back exactly as written."""
    out: list[PortRange] = []
    for p in sorted(ports):
        if out and p.first <= out[-1].last + 1:
            out[-1] = PortRange(out[-1].first, max(out[-1].last, p.last))
        else:
            out.append(p)
    return tuple(out)


def parse_icmp_type(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    if isinstance(value, str):
        if value.isdigit() and int(value) <= 255:
            return int(value)
        if value in ICMP_TYPES:
            return ICMP_TYPES[value]
    raise ValueError(f"{shown(value)} is not an ICMP type (expected 0-255 or one of {', '.join(ICMP_TYPES)})")


def parse_icmp_code(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) <= 255:
        return int(value)
    raise ValueError(f"{shown(value)} is not an ICMP code (expected 0-255)")


def parse_protocol_number(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    if isinstance(value, str):
        if value.isdigit() and int(value) <= 255:
            return int(value)
        if value in PROTOCOL_NAMES:
            return PROTOCOL_NAMES[value]
    raise ValueError(
        f"{shown(value)} is not an IP protocol (expected 0-255 or one of {', '.join(PROTOCOL_NAMES)})"
    )


def normalize_protocol_service(number: int) -> Service:
    """`proto/6` means all of TCP: say so in the model, so that equal things compare equal."""
    if number == 6:
        return PortService(L4.TCP)
    if number == 17:
        return PortService(L4.UDP)
    if number == 1:
        return IcmpService()
    return ProtocolService(number)


def parse_service(text: object) -> Service:
    """`tcp/80`, `tcp/80,443,8000-8080`, `udp`, `icmp/echo-request`, `icmp/3/4`, `proto/47`, `arp`, ..."""
    if not isinstance(text, str):
        raise ValueError(f"{shown(text)} is not a service ({SERVICE_HELP})")
    t = text.strip()
    head, _, rest = t.partition("/")
    if head in ("tcp", "udp"):
        ports = tuple(parse_port_range(p) for p in rest.split(",")) if rest else ()
        return PortService(L4(head), normalize_ports(ports))
    if head == "icmp":
        if not rest:
            return IcmpService()
        typ, _, code = rest.partition("/")
        return IcmpService(parse_icmp_type(typ), parse_icmp_code(code) if code else None)
    if head == "proto" and rest:
        return normalize_protocol_service(parse_protocol_number(rest))
    for special in SpecialService:
        if t == special.value:
            return NamedService(special)
    raise ValueError(f"{shown(text)} is not a service ({SERVICE_HELP})")


def format_selector(sel: Selector) -> str:
    """The text `parse_selector` reads back to `sel`."""
    match sel:
        case VmSelector(name):
            return f"vm:{name}"
        case LabelSelector(key, value):
            return f"label:{key}={value}"
        case AllVmsSelector():
            return "vms"
        case IpSetSelector(name):
            return f"ipset:{name}"
        case SpecialSelector(peer):
            return peer.value
        case AddressSelector(rng, _):
            return format_range(rng)


def format_range(rng: AddressRange) -> str:
    if rng.first == rng.last:
        return str(rng.first)
    first, last = int(rng.first), int(rng.last)
    size = last - first + 1
    if size & (size - 1) == 0 and first % size == 0:
        return f"{rng.first}/{32 - size.bit_length() + 1}"
    return f"{rng.first}-{rng.last}"


def format_ports(ports: tuple[PortRange, ...]) -> str:
    return ",".join(str(p.first) if p.first == p.last else f"{p.first}-{p.last}" for p in ports)


def format_service(svc: Service) -> str:
    """The text `parse_service` reads back to `svc`."""
    match svc:
        case PortService(proto, ports):
            return f"{proto.value}/{format_ports(ports)}" if ports else proto.value
        case IcmpService(typ, code):
            if typ is None:
                return "icmp"
            return f"icmp/{typ}" if code is None else f"icmp/{typ}/{code}"
        case ProtocolService(number):
            return f"proto/{number}"
        case NamedService(kind):
            return kind.value
