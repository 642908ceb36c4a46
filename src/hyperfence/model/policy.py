"""The policy, as hyperfence understands it after parsing: frozen, validated, comparable.

A policy names the networks (managed bridges), the VMs on them, IP sets and rules. Every declared VM is
*protected*: it gets nothing, in either direction, unless a rule allows it.

Selectors come in two kinds:

* **workload selectors** (`vm:NAME`, `label:KEY=VALUE`, `vms`) pick VMs. A VM picked on a rule's `from` side
  gets the rule in its egress chain; on the `to` side, in its ingress chain. One rule between two VMs
  therefore grants both the sender's egress and the receiver's ingress.
* **address selectors** (`10.0.0.0/24`, `10.0.0.5-10.0.0.9`, `ipset:NAME`, `host`, `outside`, `any`) only
  match addresses; they never make a rule apply to a VM.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REJECT = "reject"


class Direction(enum.StrEnum):
    """Seen from the VM: `out` is what it sends (egress), `in` what it receives (ingress)."""

    OUT = "out"
    IN = "in"


class AddressRange(NamedTuple):
    """An inclusive IPv4 range; a CIDR or a single address is a range too. (A named tuple: hashed and
    compared very often.)"""

    first: IPv4Address
    last: IPv4Address

    @classmethod
    def of_network(cls, net: IPv4Network) -> AddressRange:
        return cls(net.network_address, net.broadcast_address)

    @classmethod
    def single(cls, addr: IPv4Address) -> AddressRange:
        return cls(addr, addr)


# --- selectors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSelector:
    name: str


@dataclass(frozen=True)
class LabelSelector:
    key: str
    value: str


@dataclass(frozen=True)
class AllVmsSelector:
    pass


@dataclass(frozen=True)
class AddressSelector:
    """A CIDR or range, written in the policy as such."""

    range: AddressRange
    text: str


@dataclass(frozen=True)
class IpSetSelector:
    name: str


class SpecialPeer(enum.StrEnum):
    ANY = "any"  # every IPv4 address
    HOST = "host"  # every address of the hypervisor itself: the gateways, its other addresses (the uplink's)
    OUTSIDE = "outside"  # unicast addresses neither on a managed network nor the host's: beyond its routing


@dataclass(frozen=True)
class SpecialSelector:
    peer: SpecialPeer


Selector = VmSelector | LabelSelector | AllVmsSelector | AddressSelector | IpSetSelector | SpecialSelector
WORKLOAD_SELECTORS = (VmSelector, LabelSelector, AllVmsSelector)


# --- services --------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int


class L4(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class PortService:
    """TCP or UDP to these destination ports (all ports when `ports` is empty)."""

    protocol: L4
    ports: tuple[PortRange, ...] = ()


@dataclass(frozen=True)
class IcmpService:
    """ICMP (v4) of a type and optionally a code; any ICMP when `type` is None."""

    type: int | None = None
    code: int | None = None


@dataclass(frozen=True)
class ProtocolService:
    """Any packet of this IP protocol number (e.g. 47 = GRE)."""

    number: int


class SpecialService(enum.StrEnum):
    ANY = "any"  # every IPv4 packet
    ARP = "arp"  # ARP between the VM and the peers
    DHCP = "dhcp"  # `from` gets leases from `to` (`from` VMs are clients, `to` VMs servers)
    DHCP_SERVER = "dhcp-server"  # `from` serves `to` (the same exchange, written from the server side)


@dataclass(frozen=True)
class NamedService:
    kind: SpecialService


Service = PortService | IcmpService | ProtocolService | NamedService


# --- the policy ------------------------------------------------------------------------------------

# The longest id of a rule, limit or heartbeat. Rule and limit ids are written into nft rule comments
# (`rule:<id>#<n>:pair:log`) and kernel log prefixes (`hf:<vm>:<dir>:<verdict>:rule:<id>#<n>:pair`); the
# kernel refuses a log prefix longer than 127 bytes, and 32 leaves that ample room (see `ruleset/build.py`).
MAX_ID_LENGTH = 32


@dataclass(frozen=True)
class Rule:
    id: str
    index: int  # position in the file; breaks ties between equal priorities
    from_: tuple[Selector, ...]
    to: tuple[Selector, ...]
    services: tuple[Service, ...]
    action: Action = Action.ALLOW
    priority: int = 1000  # lower runs first
    log: bool = False
    description: str = ""

    @property
    def order(self) -> tuple[int, int]:
        return (self.priority, self.index)


@dataclass(frozen=True)
class FloodLimit:
    """Per selected VM and direction: at most `rate` packets a second (bursts up to `burst`) that do not
    belong to an established flow; the rest is dropped and counted (and logged, rate-limited, if `log`).
    Packets of established flows never count: a flood is what makes new flows (SYN, UDP, ICMP, ARP)."""

    id: str
    vms: tuple[Selector, ...]
    directions: tuple[Direction, ...]
    rate: int
    burst: int
    log: bool = True


# The largest per-VM connection cap a policy may ask for: 16 x the default conntrack table of a large host
# (262,144 entries). A larger number is a typo, or means "no cap", which the policy does not offer.
MAX_CONNECTIONS = 4_194_304


@dataclass(frozen=True)
class ConnectionCap:
    """Per selected VM: at most `connections` open connections tracked by the host's conntrack, counting
    both the connections the VM opens and those opened towards it. A new connection beyond the cap is
    dropped and counted (and logged, rate-limited, if `log`); established connections are never touched.
    `id` is "default" for the cap of `Settings.connections_per_vm` (VMs no `limits` entry caps)."""

    id: str
    vms: tuple[Selector, ...]
    connections: int
    log: bool = True


class SilenceAction(enum.Enum):
    ALERT = "alert"  # an event only
    ISOLATE = "isolate"  # quarantine: every packet to and from the VM dropped, established flows too
    PAUSE = "pause"  # the hypervisor pauses the VM (libvirt guests); isolate where there is no hypervisor


class Release(enum.Enum):
    AUTO = "auto"  # when beats resume
    MANUAL = "manual"  # only `hyperfence vm release VM`


DEFAULT_BOOT_GRACE = 60.0
"""Seconds a VM that just started (or was reset) has for its agent's first message before its silence counts:
a stock Debian guest with the agent as a service beats within ~10-30 s, the lab's TCG guest in ~17 s."""


@dataclass(frozen=True)
class Heartbeat:
    """What the host expects from the agents of the selected VMs, and what it does when one goes silent:
    no valid message for `misses` x `interval` seconds. A VM that starts (or is reset) has not been silent
    while it was off: until its agent's first message its silence counts from `boot_grace` seconds after the
    start, so it is silent `boot_grace` + `misses` x `interval` after it when no agent ever speaks."""

    id: str
    vms: tuple[Selector, ...]
    interval: float = 1.0
    misses: int = 3
    action: SilenceAction = SilenceAction.ISOLATE
    release: Release = Release.AUTO
    boot_grace: float = DEFAULT_BOOT_GRACE

    @property
    def silent_after(self) -> float:
        return self.interval * self.misses


DEFAULT_HEARTBEAT = Heartbeat(id="default", vms=())


@dataclass(frozen=True)
class Network:
    """A managed bridge. `gateway` is the host's address on it; `uplinks` are bridge ports that lead to a
    physical network rather than to a VM (they are not filtered as VMs)."""

    name: str
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address | None = None
    uplinks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vm:
    """A VM's identity as the firewall needs it. `id` is stable (a libvirt UUID); `name` is for people.

    `learns`: the policy declares no address for it (`ips` omitted): its addresses are learned from the
    DHCP leases it takes from the servers its `dhcp` rules allow (see `policy/leases.py`), and `ips` holds
    the learned ones that are valid now (none before its first lease: it can only ask for one)."""

    id: str
    name: str
    network: str
    port: str  # the bridge port (tap) the VM is plugged into
    mac: str  # lower case, colon separated
    ips: tuple[IPv4Address, ...]
    labels: tuple[tuple[str, str], ...] = ()
    learns: bool = False

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


@dataclass(frozen=True)
class Settings:
    log_denied: bool = True  # every default deny emits a (rate-limited) NFLOG event
    log_rate_per_second: int = 10  # per VM and direction (and per logged rule)
    log_burst: int = 20
    nflog_group: int = 7
    # Where the DHCP answers (and releases) of VMs that learn their addresses are logged for the daemon's
    # lease learner: a group of its own, read with copies large enough for a whole DHCP message.
    learn_group: int = 8
    conntrack_mark: int = 0x00200000  # one bit of the packet mark, reserved for hyperfence
    # Where agents reach the host over TCP+TLS (address, port), or None: every VM may open that flow (also
    # while isolated), so a guest whose channel is the network can still report.
    agent_endpoint: tuple[IPv4Address, int] | None = None
    # "none": every VM is declared in the policy; "libvirt": VMs are also discovered from the hypervisor, so a
    # rule may name a VM that does not exist right now (it selects nothing until it does).
    inventory: str = "none"
    # Every VM's share of the host's connection tracking table unless a `limits` entry says otherwise: 1/16
    # of a large host's default table (nf_conntrack_max 262,144), so it takes 16 VMs at their cap to fill
    # the table, while a busy server VM (thousands of concurrent clients and its own upstream connections)
    # stays far below it. See docs/policy.md.
    connections_per_vm: int = 16_384
    # Addresses the host answers on that are not its own local addresses (e.g. an address DNATed to it):
    # part of `host`, as the addresses the daemon reads from the kernel (see docs/policy.md).
    host_addresses: tuple[AddressRange, ...] = ()

    @property
    def default_cap(self) -> ConnectionCap:
        return ConnectionCap("default", (), self.connections_per_vm)


@dataclass(frozen=True)
class Policy:
    networks: tuple[Network, ...]
    vms: tuple[Vm, ...]
    ipsets: tuple[tuple[str, tuple[AddressRange, ...]], ...] = ()
    rules: tuple[Rule, ...] = ()
    settings: Settings = field(default_factory=Settings)
    limits: tuple[FloodLimit, ...] = ()
    connection_caps: tuple[ConnectionCap, ...] = ()  # in policy order: a VM takes the first that selects it
    heartbeats: tuple[Heartbeat, ...] = ()

    def vm_by_name(self, name: str) -> Vm | None:
        return next((v for v in self.vms if v.name == name), None)

    def ipset(self, name: str) -> tuple[AddressRange, ...] | None:
        return dict(self.ipsets).get(name)
