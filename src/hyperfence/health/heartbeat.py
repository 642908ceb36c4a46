"""Which heartbeat policy applies to a VM (pure)."""

from __future__ import annotations

from hyperfence.model.policy import (
    DEFAULT_HEARTBEAT,
    AllVmsSelector,
    Heartbeat,
    LabelSelector,
    Policy,
    Selector,
    Vm,
    VmSelector,
)


def selects(selectors: tuple[Selector, ...], vm: Vm) -> bool:
    for sel in selectors:
        if isinstance(sel, AllVmsSelector):
            return True
        if isinstance(sel, VmSelector) and sel.name == vm.name:
            return True
        if isinstance(sel, LabelSelector) and vm.label(sel.key) == sel.value:
            return True
    return False


def heartbeat_for(policy: Policy, vm: Vm) -> Heartbeat:
    """The first `heartbeats` entry that selects the VM, else the default (1 s, 3 misses, isolate, auto)."""
    return next((hb for hb in policy.heartbeats if selects(hb.vms, vm)), DEFAULT_HEARTBEAT)
