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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hyperfence.model.lease import Lease
from hyperfence.model.policy import Policy
from hyperfence.policy.inventory import merge_discovered
from hyperfence.policy.leases import apply_leases
from hyperfence.policy.objects import ObjectChange
from hyperfence.policy.parse import parse_policy, parse_rules_changed


@dataclass(frozen=True)
class DesiredPolicy:
    policy: Policy
    skipped: tuple[str, ...] = ()  # discovered VMs left out, and why
    ignored_leases: tuple[tuple[Lease, str], ...] = ()  # learned addresses left out, and why
    # What `desired_update` starts from: the document with the discovered VMs merged in (the one parsed),
    # and its parse before the learned addresses were applied.
    merged: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    parsed: Policy | None = field(default=None, compare=False, repr=False)


def desired_policy(
    document: Any, *, source: str, discovered: Sequence[dict[str, Any]], leases: Sequence[Lease]
) -> DesiredPolicy:
    """Parse `document` (from `source`) with the discovered VMs merged in (a discovered VM that is invalid
    or collides with a declared one is left out, and said why) and the learned addresses applied.
    Raises `InvalidInputError` for a document that is invalid by itself."""
    skipped: list[str] = []
    if discovered and isinstance(document, dict):
        document, skipped = merge_discovered(document, tuple(discovered))
    parsed = parse_policy(document, source=source)
    policy, ignored = apply_leases(parsed, tuple(leases))
    return DesiredPolicy(
        policy,
        tuple(skipped),
        ignored,
        merged=document if isinstance(document, dict) else None,
        parsed=parsed,
    )


def desired_update(
    previous: DesiredPolicy, before: dict[str, Any], document: dict[str, Any], changes: Sequence[ObjectChange]
) -> DesiredPolicy | None:
    """`desired_policy(document, ...)` made from `previous` (= `desired_policy(before, ...)` with the very
    same discovered VMs and leases) when `changes` (the object changes from `before` to `document`) only edit
    or append rules: the changed rules are validated as themselves (`parse_rules_changed`), the VMs, the
    discovered ones and the learned addresses are `previous`'s (rules change none of them). None for any
    other change: call `desired_policy`."""
    if previous.merged is None or previous.parsed is None:
        return None
    if any(document[k] is not before[k] for k in document.keys() & before.keys() if k != "rules"):
        return None
    # The discovered VMs were merged into `vms` (the only section the merge changes), from the same inputs.
    merged = {**document, "vms": previous.merged["vms"]} if "vms" in previous.merged else document
    parsed = parse_rules_changed(previous.parsed, previous.merged, merged, changes)
    if parsed is None:
        return None
    return dataclasses.replace(
        previous,
        policy=dataclasses.replace(previous.policy, rules=parsed.rules),
        merged=merged,
        parsed=parsed,
    )
