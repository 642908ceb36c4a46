"""VMs discovered from the hypervisor, merged into the policy document as if declared (pure).

A discovered VM is a plain `vms` item (name, id, network, port, mac, ips, labels), made by the inventory
adapter from the hypervisor's view. It joins the policy only if it is valid on its own and does not collide
with a declared VM (the declared one wins): one odd domain never makes the whole policy invalid.
"""

from __future__ import annotations

import re
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
        kept.append(vm)
        _claim(taken, vm)
    # One validation of them all: every problem names its item (`vms[k]...`), so the bad ones are known.
    try:
        parse_policy({"networks": networks, "vms": kept}, source="discovered VMs")
    except InvalidInputError as e:
        bad: dict[int, list[str]] = {}
        for problem in e.problems:
            m = _ITEM.match(problem.path)
            if m is None:  # not about one VM (e.g. the networks): no discovered VM can be used
                return {**document, "vms": declared}, [*skipped, f"{e}: {problem}"]
            bad.setdefault(int(m.group(1)), []).append(str(problem))
        for k in sorted(bad):
            skipped.append(f"discovered VM {kept[k].get('name')!r}: " + "; ".join(bad[k][:3]))
        kept = [vm for k, vm in enumerate(kept) if k not in bad]
    return {**document, "vms": [*declared, *kept]}, skipped


_ITEM = re.compile(r"vms\[(\d+)\]")


def _identity(vm: dict[str, Any], key: str) -> object:
    return vm.get("id") or vm.get("name") if key == "id" else vm.get(key)


def _claim(taken: dict[str, set[object]], vm: dict[str, Any]) -> None:
    for key, seen in taken.items():
        seen.add(_identity(vm, key))
