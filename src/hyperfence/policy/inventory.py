"""VMs discovered from the hypervisor, merged into the policy document as if declared (pure).

A discovered VM is a plain `vms` item (name, id, network, port, mac, ips, labels), made by the inventory
adapter from the hypervisor's view. It joins the policy only if it is valid on its own and does not collide
with a declared VM (the declared one wins): one odd domain never makes the whole policy invalid.
"""

from __future__ import annotations

from typing import Any

from hyperfence.errors import InvalidInputError
from hyperfence.policy.parse import parse_policy


def merge_discovered(
    document: dict[str, Any], discovered: tuple[dict[str, Any], ...]
) -> tuple[dict[str, Any], list[str]]:
    """The document with the usable discovered VMs added to `vms`, and why the others were left out."""
    if not discovered:
        return document, []
    declared = list(document.get("vms") or [])
    taken: dict[str, set[object]] = {"name": set(), "id": set(), "port": set(), "mac": set()}
    for vm in declared:
        if isinstance(vm, dict):
            _claim(taken, vm)
    networks = document.get("networks") or []
    kept: list[dict[str, Any]] = []
    skipped: list[str] = []
    for vm in discovered:
        clash = [k for k, seen in taken.items() if _identity(vm, k) in seen]
        if clash:
            skipped.append(f"discovered VM {vm.get('name')!r}: its {', '.join(clash)} is already declared")
            continue
        try:
            parse_policy({"networks": networks, "vms": [vm]}, source=f"discovered VM {vm.get('name')!r}")
        except InvalidInputError as e:
            skipped.append(f"{e}: " + "; ".join(str(p) for p in e.problems[:3]))
            continue
        kept.append(vm)
        _claim(taken, vm)
    return {**document, "vms": [*declared, *kept]}, skipped


def _identity(vm: dict[str, Any], key: str) -> object:
    return vm.get("id") or vm.get("name") if key == "id" else vm.get(key)


def _claim(taken: dict[str, set[object]], vm: dict[str, Any]) -> None:
    for key, seen in taken.items():
        seen.add(_identity(vm, key))
