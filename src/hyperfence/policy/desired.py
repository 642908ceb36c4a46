"""The desired policy, as every use case sees it (pure): the policy document with what the host learned
about its VMs merged in.

    document                       (the store's latest generation, or a policy file)
    + the last known inventory     VMs discovered from the hypervisor (`policy/inventory.py`), kept in the
                                   store (`ports.InventoryStore`) by the daemon that read them
    + learned addresses            DHCP leases of VMs that learn their addresses (`policy/leases.py`)
    = the Policy

`Engine.compiled` builds every compiled policy from it (the daemon's converges, and every CLI command:
`can`, `vm list/events/release`, `ruleset diff/stats`, `policy apply` without a daemon), so none of them can
see a different set of VMs than the daemon does. After it come the provisional uplinks, the resolve, the
producers' overlays (`policy/overlays.py`) and the compiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hyperfence.model.lease import Lease
from hyperfence.model.policy import Policy
from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.leases import apply_leases
from hyperfence.policy.parse import parse_policy


@dataclass(frozen=True)
class DesiredPolicy:
    policy: Policy
    skipped: tuple[str, ...] = ()  # discovered VMs left out, and why
    ignored_leases: tuple[tuple[Lease, str], ...] = ()  # learned addresses left out, and why


def desired_policy(
    document: Any, *, source: str, discovered: Sequence[dict[str, Any]], leases: Sequence[Lease]
) -> DesiredPolicy:
    """Parse `document` (from `source`) with the discovered VMs merged in (a discovered VM that is invalid
    or collides with a declared one is left out, and said why) and the learned addresses applied.
    Raises `InvalidInputError` for a document that is invalid by itself."""
    skipped: list[str] = []
    if discovered and isinstance(document, dict):
        document, skipped = merge_discovered(document, tuple(discovered))
    policy, ignored = apply_leases(parse_policy(document, source=source), tuple(leases))
    return DesiredPolicy(policy, tuple(skipped), ignored)
