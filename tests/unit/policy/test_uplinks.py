"""Which bridge ports are network devices, and the ones a policy forgets: classification and error text."""

from __future__ import annotations

import pytest

from hyperfence.model.policy import Policy
from hyperfence.model.ports import BridgePort
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.uplinks import (
    UndeclaredDevice,
    describe_port,
    is_network_device,
    refusal,
    undeclared_devices,
)
from tests.unit.policy.test_parse import BASE, doc


@pytest.mark.parametrize("kind", ["tun", "veth"])
def test_taps_and_veths_are_vm_like(kind: str) -> None:
    assert not is_network_device(BridgePort("br0", "p", kind))


@pytest.mark.parametrize(
    "kind", ["", "bond", "team", "vlan", "macvlan", "vxlan", "bridge", "dummy", "ifb", "something-new"]
)
def test_everything_else_is_a_network_device(kind: str) -> None:
    """Kinds nobody listed count too: forgetting one is refused loudly instead of cutting the host off."""
    assert is_network_device(BridgePort("br0", "p", kind))


@pytest.mark.parametrize(
    ("port", "text"),
    [
        (BridgePort("br0", "eno1", "", "pci 0000:00:1f.6"), "a physical NIC (pci 0000:00:1f.6)"),
        (BridgePort("br0", "x", ""), "a network device without a link kind"),
        (BridgePort("br0", "bond0", "bond"), "a bond device"),
        (BridgePort("br0", "vnet0", "tun"), "a tap"),
        (BridgePort("br0", "v", "veth"), "a veth"),
        (
            BridgePort("br0", "x", "evil\x1b[2J"),
            "a evil\\x1b[2J device",
        ),  # kernel text never reaches a tty raw
    ],
)
def test_ports_are_described_for_people(port: BridgePort, text: str) -> None:
    assert describe_port(port) == text


def policy_with(**network: object) -> Policy:
    nets = [{**BASE["networks"][0], **network}, {"name": "dmz", "bridge": "br1", "subnet": "10.88.0.0/24"}]
    return parse_policy(doc(networks=nets, vms=[{**BASE["vms"][0], "network": "lab"}]))


def test_undeclared_network_devices_are_found_per_bridge_and_everything_declared_is_left_alone() -> None:
    policy = policy_with(uplinks=["bond0"])
    ports = [
        BridgePort("br0", "vp1", "veth"),  # vm1's port
        BridgePort("br0", "bond0", "bond"),  # a declared uplink
        BridgePort("br0", "vnet7", "tun"),  # a removed VM's tap: gets nothing, as before
        BridgePort("br0", "eno1", "", "pci 0000:00:1f.6"),
        BridgePort("br1", "vx0", "vxlan"),
        BridgePort("br9", "eno2", ""),  # not a managed bridge
    ]
    assert undeclared_devices(policy, ports) == (
        UndeclaredDevice(0, "lab", "br0", "eno1", "a physical NIC (pci 0000:00:1f.6)"),
        UndeclaredDevice(1, "dmz", "br1", "vx0", "a vxlan device"),
    )
    assert undeclared_devices(policy, [p for p in ports if p.name not in ("eno1", "vx0")]) == ()


def test_the_refusal_names_bridge_port_kind_and_how_to_declare_each() -> None:
    found = undeclared_devices(
        policy_with(), [BridgePort("br0", "eno1", "", "pci 0000:00:1f.6"), BridgePort("br1", "vx0", "vxlan")]
    )
    assert refusal(found).splitlines() == [
        "the policy would cut the host off its network: these network devices are ports of managed bridges "
        "but neither declared uplinks nor VMs' ports, so they would get nothing (nothing was changed):",
        '  networks[0].uplinks: add "eno1" (bridge br0, port eno1: a physical NIC (pci 0000:00:1f.6))',
        '  networks[1].uplinks: add "vx0" (bridge br1, port vx0: a vxlan device)',
        "Declare each as an uplink of its network (it then passes unfiltered, like the physical network "
        "behind it), or take it off the bridge (ip link set DEV nomaster) if it is meant to get nothing.",
    ]
    assert found[0].as_dict() == {
        "network": "lab",
        "bridge": "br0",
        "port": "eno1",
        "kind": "a physical NIC (pci 0000:00:1f.6)",
        "declare": 'networks[0].uplinks: add "eno1"',
    }


def test_a_name_the_policy_cannot_hold_gets_another_hint() -> None:
    (found,) = undeclared_devices(policy_with(), [BridgePort("br0", "eth@0\x07", "")])
    assert found.hint == (
        'networks[0].uplinks cannot name "eth@0\\x07": rename the device (ip link set DEV name NEW) or take '
        "it off the bridge"
    )
