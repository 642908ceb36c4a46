"""Each VM's share of the host's connection tracking, as `hyperfence vm list` shows it: its cap (from the
policy), the connections the kernel tracks for it now, and the new connections its cap dropped.

Read straight from the kernel (a ctnetlink dump and the cap rules' counters), so it needs no daemon and no
agent. A connection counts for a VM when the VM is its original source or destination, as the cap counts
it (a connection between two VMs counts for both). Unlike the cap, the table also holds TCP connections in
TIME_WAIT or CLOSE, which the cap no longer counts: `tracked` may exceed `cap` by those.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hyperfence.adapters.conntrack import read_address_pairs
from hyperfence.adapters.nft import Nft
from hyperfence.errors import HyperfenceError
from hyperfence.model.policy import Vm
from hyperfence.policy.resolve import Resolved
from hyperfence.ruleset.compile import BRIDGE, INET, vm_sid
from hyperfence.ruleset.readback import RuleKey, rule_counters


@dataclass(frozen=True)
class VmConnections:
    cap: int
    tracked: int | None  # None: the table could not be read
    cap_drops: int | None  # None: the counter could not be read (or the VM's cap rule is not in the kernel)

    def as_dict(self) -> dict[str, Any]:
        return {"cap": self.cap, "tracked": self.tracked, "cap_drops": self.cap_drops}


def tracked_per_vm(pairs: Mapping[tuple[bytes, bytes], int], vms: Iterable[Vm]) -> dict[str, int]:
    """Connections per VM id from (original source, original destination) address pairs and their counts:
    a pair counts for the VM owning its source and for the (other) VM owning its destination."""
    owner = {ip.packed: vm.id for vm in vms for ip in vm.ips}
    out = dict.fromkeys(owner.values(), 0)
    for (src, dst), n in pairs.items():
        a, b = owner.get(src), owner.get(dst)
        if a is not None:
            out[a] += n
        if b is not None and b != a:
            out[b] += n
    return out


def cap_drops_per_vm(counters: Mapping[RuleKey, tuple[int, int]], vms: Iterable[Vm]) -> dict[str, int]:
    """Packets dropped by each VM's cap rules (`sys:ct-cap` in its `<sid>_cap_drop` chains: in the inet table
    (br_netfilter), or in the bridge table and in inet for what is routed to it (bridge_native), summed),
    by VM id; a VM none of whose cap rules is in the counters has no entry."""
    out = {}
    for vm in vms:
        chain = f"{vm_sid(vm.id)}_cap_drop"
        hits = [counters.get((table, chain, "sys:ct-cap")) for table in (INET, BRIDGE)]
        if any(h is not None for h in hits):
            out[vm.id] = sum(h[0] for h in hits if h is not None)
    return out


def read_vm_connections(
    resolved: Resolved, *, netns: str | None
) -> tuple[dict[str, VmConnections], list[str]]:
    """Per VM id: cap, tracked connections and cap drops, read in the bridges' namespace `netns`; and what
    could not be read (each a sentence)."""
    vms = [vp.vm for vp in resolved.vms]
    problems: list[str] = []
    tracked: dict[str, int] | None = None
    drops: dict[str, int] | None = None
    try:
        tracked = tracked_per_vm(read_address_pairs(netns), vms)
    except HyperfenceError as e:
        problems.append(f"tracked connections unavailable: {e}")
    try:
        nft = Nft(netns)
        try:
            listing = [
                *nft.list({"table": {"family": INET.family, "name": INET.name}}),
                *nft.list({"table": {"family": BRIDGE.family, "name": BRIDGE.name}}),
            ]
        finally:
            nft.close()
        drops = cap_drops_per_vm(rule_counters(listing), vms)
    except HyperfenceError as e:
        problems.append(f"cap drops unavailable: {e}")
    figures = {
        vp.vm.id: VmConnections(
            vp.connection_cap.connections,
            None if tracked is None else tracked.get(vp.vm.id, 0),
            None if drops is None else drops.get(vp.vm.id),
        )
        for vp in resolved.vms
    }
    return figures, problems
