"""A bridge port as the kernel lists it: what `policy/uplinks.py` classifies (VM-like or network device)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BridgePort:
    """One port of bridge `bridge` (`ip -d link show master BRIDGE`). `kind` is the link's kind as the
    kernel names it (`tun` for a tap, `veth`, `vxlan`, `bond`, ...; empty for a device without one, such
    as a physical NIC); `parent` is its parent device on a bus (`pci 0000:00:1f.6`; empty for none)."""

    bridge: str
    name: str
    kind: str = ""
    parent: str = ""
