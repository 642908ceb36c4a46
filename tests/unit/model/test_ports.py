"""A bridge port as the kernel lists it (model/ports.py): a frozen value; a port without a kind (a physical
NIC) or a parent on a bus has them empty."""

from __future__ import annotations

import dataclasses

import pytest

from hyperfence.model.ports import BridgePort


def test_a_port_without_kind_or_parent_has_them_empty() -> None:
    nic = BridgePort("br0", "eth1")
    assert (nic.kind, nic.parent) == ("", "")
    assert nic == BridgePort(bridge="br0", name="eth1", kind="", parent="")


def test_a_port_is_a_frozen_hashable_value() -> None:
    tap = BridgePort("br0", "vnet3", kind="tun")
    assert len({tap, BridgePort("br0", "vnet3", "tun"), BridgePort("br1", "vnet3", "tun")}) == 2
    assert tap != BridgePort("br0", "vnet3", kind="veth")
    with pytest.raises(dataclasses.FrozenInstanceError):
        tap.kind = "veth"  # type: ignore[misc]
