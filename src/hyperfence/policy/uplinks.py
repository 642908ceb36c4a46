"""Never cut the host off its network: the network devices on a managed bridge that the policy forgets.

On a real host the physical NIC (or a bond or VLAN device on top of it) is a port of the same bridge as the
VMs' taps, and the host's own address is often on that bridge. A bridge port that is neither a declared VM's
port nor a declared uplink gets nothing (`sys:unknown-port`): for a removed VM's tap that is right (fail
closed), for the NIC it cuts the host and every VM off the physical network. So the ports of the managed
bridges are classified from what the kernel says about them:

* VM-like: a tap (`tun` kind) or a `veth` (a container's or the lab's VM port). Undeclared, it gets nothing,
  as before.
* a network device: everything else: a physical NIC (no link kind; it has a parent device on a bus), `bond`,
  `team`, `vlan`, `macvlan`, `vxlan`, `bridge`, `dummy`, ... Undeclared, it is reported: applying a policy
  that forgets it is refused (`UndeclaredDevice`, `refusal`), and one that joins a bridge later is reported
  by the daemon (see reconcile/bridge_ports.py).

Pure: the ports come from `adapters/bridge_ports.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from hyperfence.model.policy import Policy
from hyperfence.model.ports import BridgePort
from hyperfence.model.text import printable
from hyperfence.policy.syntax import parse_ifname

VM_LIKE_KINDS = frozenset({"tun", "veth"})


def is_network_device(port: BridgePort) -> bool:
    """True unless the port is VM-like (a tap or a veth). Kinds not listed anywhere count as network
    devices: forgetting one is refused loudly, where the other mistake would cut the host off silently."""
    return port.kind not in VM_LIKE_KINDS


def describe_port(port: BridgePort) -> str:
    """What the port is, for people: "a physical NIC (pci 0000:00:1f.6)", "a bond device", "a tap"."""
    if port.kind == "tun":
        return "a tap"
    if port.kind == "veth":
        return "a veth"
    if port.kind:
        return f"a {printable(port.kind)} device"
    if port.parent:
        return f"a physical NIC ({printable(port.parent)})"
    return "a network device without a link kind"


@dataclass(frozen=True)
class UndeclaredDevice:
    """A network device on a managed bridge that the policy declares neither as an uplink nor as a VM's
    port. `index` is its network's position in `networks` (for the hint)."""

    index: int
    network: str
    bridge: str
    port: str
    what: str  # describe_port

    @property
    def hint(self) -> str:
        """How to declare it, as a located change to the policy."""
        try:
            parse_ifname(self.port)
        except ValueError:
            return (
                f'networks[{self.index}].uplinks cannot name "{printable(self.port)}": rename the device '
                "(ip link set DEV name NEW) or take it off the bridge"
            )
        return f'networks[{self.index}].uplinks: add "{self.port}"'

    def sentence(self) -> str:
        return f"{self.hint} (bridge {self.bridge}, port {printable(self.port)}: {self.what})"

    def as_dict(self) -> dict[str, str]:
        return {
            "network": self.network,
            "bridge": self.bridge,
            "port": self.port,
            "kind": self.what,
            "declare": self.hint,
        }


def undeclared_devices(policy: Policy, ports: Iterable[BridgePort]) -> tuple[UndeclaredDevice, ...]:
    """The network-device ports of the policy's bridges that are neither a declared uplink nor a declared
    VM's port, sorted by bridge and port. (The ruleset dispatches by port name on every managed bridge
    alike, so a name declared anywhere counts as declared.) Ports of other bridges are ignored."""
    declared = {u for n in policy.networks for u in n.uplinks} | {v.port for v in policy.vms}
    networks = {n.bridge: (i, n) for i, n in enumerate(policy.networks)}
    found = {
        UndeclaredDevice(
            networks[p.bridge][0], networks[p.bridge][1].name, p.bridge, p.name, describe_port(p)
        )
        for p in ports
        if p.bridge in networks and p.name not in declared and is_network_device(p)
    }
    return tuple(sorted(found, key=lambda d: (d.bridge, d.port)))


def refusal(found: Iterable[UndeclaredDevice]) -> str:
    """The error for a policy that would cut these devices off: what, where, and what to do."""
    lines = "\n".join(f"  {d.sentence()}" for d in found)
    return (
        "the policy would cut the host off its network: these network devices are ports of managed "
        "bridges but neither declared uplinks nor VMs' ports, so they would get nothing (nothing was "
        "changed):\n"
        f"{lines}\n"
        "Declare each as an uplink of its network (it then passes unfiltered, like the physical network "
        "behind it), or take it off the bridge (ip link set DEV nomaster) if it is meant to get nothing."
    )


def with_uplinks(policy: Policy, devices: Iterable[UndeclaredDevice]) -> Policy:
    """`policy` with each of `devices` added to the uplinks of its bridge's network: what the daemon
    applies while those devices are provisional uplinks (see `Engine.converge`)."""
    extra: dict[str, set[str]] = {}
    for d in devices:
        extra.setdefault(d.bridge, set()).add(d.port)
    if not extra:
        return policy
    networks = tuple(
        dataclasses.replace(n, uplinks=tuple(sorted(set(n.uplinks) | extra[n.bridge])))
        if n.bridge in extra
        else n
        for n in policy.networks
    )
    return dataclasses.replace(policy, networks=networks)
