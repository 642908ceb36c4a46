"""Each VM's share of connection tracking from a conntrack dump and the cap rules' counters (pure parts)."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

from hyperfence.model.policy import Vm
from hyperfence.reconcile.conntrack import cap_drops_per_vm, tracked_per_vm
from hyperfence.ruleset.compile import BRIDGE, INET, vm_sid

VM1 = Vm("id1", "vm1", "lab", "vp1", "02:00:00:00:00:01", (IPv4Address("10.0.0.1"), IPv4Address("10.0.0.9")))
VM2 = Vm("id2", "vm2", "lab", "vp2", "02:00:00:00:00:02", (IPv4Address("10.0.0.2"),))
VM3 = Vm("id3", "vm3", "lab", "vp3", "02:00:00:00:00:03", (IPv4Address("10.0.0.3"),))


def a(text: str) -> bytes:
    return IPv4Address(text).packed


def test_a_connection_counts_for_each_vm_at_either_end() -> None:
    pairs = Counter(
        {
            (a("10.0.0.1"), a("192.0.2.1")): 5,  # vm1 -> outside
            (a("10.0.0.9"), a("10.0.0.2")): 2,  # vm1 (its second address) -> vm2: both
            (a("192.0.2.1"), a("10.0.0.2")): 3,  # outside -> vm2
            (a("192.0.2.1"), a("192.0.2.2")): 7,  # neither: the host's own business
        }
    )
    assert tracked_per_vm(pairs, [VM1, VM2, VM3]) == {"id1": 7, "id2": 5, "id3": 0}


def test_cap_drops_come_from_each_vms_cap_rule() -> None:
    counters = {
        (INET, f"{vm_sid('id1')}_cap_drop", "sys:ct-cap"): (42, 4200),
        (INET, f"{vm_sid('id2')}_cap_drop", "sys:ct-cap"): (0, 0),
        (BRIDGE, f"{vm_sid('id3')}_out", "sys:ct-cap"): (9, 9),  # not a cap rule
    }
    assert cap_drops_per_vm(counters, [VM1, VM2, VM3]) == {"id1": 42, "id2": 0}


def test_bridge_native_cap_drops_sum_the_bridge_and_the_routed_budget() -> None:
    counters = {
        (BRIDGE, f"{vm_sid('id1')}_cap_drop", "sys:ct-cap"): (40, 4000),  # opened by it or by other VMs
        (INET, f"{vm_sid('id1')}_cap_drop", "sys:ct-cap"): (2, 200),  # routed to it from the outside
        (BRIDGE, f"{vm_sid('id2')}_cap_drop", "sys:ct-cap"): (7, 700),
    }
    assert cap_drops_per_vm(counters, [VM1, VM2, VM3]) == {"id1": 42, "id2": 7}
