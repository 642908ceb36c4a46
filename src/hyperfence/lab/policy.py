"""A policy document for a lab: its network and VMs, plus whatever rules the caller gives. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hyperfence.lab.plan import LabPlan


def lab_policy(
    plan: LabPlan,
    rules: Sequence[dict[str, Any]] = (),
    *,
    vms: int | None = None,
    labels: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The policy document (as `policy apply` reads it) declaring the lab's first `vms` VMs."""
    chosen = plan.vms if vms is None else plan.vms[:vms]
    return {
        "networks": [
            {"name": "lab", "bridge": plan.bridge, "subnet": str(plan.subnet), "gateway": str(plan.gateway)}
        ],
        "vms": [
            {
                "name": v.name,
                "id": f"{plan.name}-{v.name}",
                "port": v.port,
                "mac": v.mac,
                "ips": [str(v.ip)],
                **({"labels": labels[v.name]} if labels and v.name in labels else {}),
            }
            for v in chosen
        ],
        "rules": list(rules),
    }
