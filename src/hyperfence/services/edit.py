"""One object of the policy at a time: write or remove a VM, a rule, a network, a limit, a heartbeat, an IP
set or a section (what the REST API will expose, and `hyperfence policy set` / `policy remove` do).

The edit is validated against the policy as the engine holds it: a rule edited or added is checked as
itself (against the same VMs and IP sets: `policy/desired.py desired_update`), any other edit by a parse of
the whole document it makes (with the bridges' devices checked, as `policy apply` does). It is then stored
as the object changes it is (`ports.PolicyRepository.put_objects`), a compare-and-swap on the generation it
was validated against; a writer that came in between makes it validate again (at most `ATTEMPTS` times).
The caller then converges: the daemon reads the change as itself (`Engine._load_document`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hyperfence.adapters.bridge_ports import read_bridge_ports
from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError, Problem, from_wire
from hyperfence.policy.collector import shown
from hyperfence.policy.desired import desired_update
from hyperfence.policy.objects import ObjectChange, apply_changes, check_depth, holds, remove_item, write_item
from hyperfence.policy.parse import parse_policy
from hyperfence.ports import PolicyRepository
from hyperfence.reconcile.engine import PortReader, check_devices
from hyperfence.services.ports import Ask, Kernel

ATTEMPTS = 3


@dataclass(frozen=True)
class Edit:
    """What to do: write `item` into `section`, or (`remove`) remove the item named `name` from it."""

    section: str
    item: Any = None
    remove: bool = False
    name: str = ""


@dataclass(frozen=True)
class Stored:
    generation: int
    changes: tuple[ObjectChange, ...]  # the objects written or removed (none: the edit changed nothing)
    checked: str  # "item": validated as itself; "document": the whole document it makes was parsed


def store_edit(
    edit: Edit,
    *,
    kernel: Kernel,
    policies: PolicyRepository,
    source: str,
    read_ports: PortReader = read_bridge_ports,
) -> Stored:
    """Validate `edit` against the current policy and store it as a new generation (see the module).
    `InvalidInputError` (what is wrong, where), `NotFoundError` (no policy, no such item), `ConflictError`
    (the engine applies a policy file; other writers kept winning)."""
    attempt = 0
    while True:
        compiled = kernel.compiled()
        if compiled is None:
            raise NotFoundError("no policy stored yet: run `hyperfence policy apply FILE` first")
        if compiled.generation is None or not isinstance(compiled.document, dict):
            raise ConflictError("this policy comes from a file (--policy-file): edit the file instead")
        document = compiled.document
        if edit.remove:
            changes = remove_item(document, edit.section, edit.name)
        else:
            changes = [ch for ch in write_item(document, edit.section, edit.item) if not holds(document, ch)]
        if not changes:
            return Stored(compiled.generation, (), "item")
        new = apply_changes(document, changes)
        checked = "item"
        if compiled.desired is None or desired_update(compiled.desired, document, new, changes) is None:
            checked = "document"
            check_devices(kernel.netns, parse_policy(new, source=source), read_ports)
        try:
            generation = policies.put_objects(changes, source=source, expected=compiled.generation)
        except ConflictError:
            attempt += 1
            if attempt == ATTEMPTS:
                raise
            continue
        return Stored(generation, tuple(changes), checked)


@dataclass(frozen=True)
class Edited:
    """A stored edit and how the kernel came to hold it: by the running daemon, or by this process."""

    generation: int
    changes: int  # objects written or removed (0: the policy already said so; nothing stored)
    checked: str
    by_daemon: bool
    summary: dict[str, int]
    ms: float | None


def edit_wire(edit: Edit) -> dict[str, Any]:
    return {"section": edit.section, "item": edit.item, "remove": edit.remove, "name": edit.name}


def edit_from_wire(req: dict[str, Any]) -> Edit:
    """The edit a control request asks for; `InvalidInputError` naming the field that is wrong."""
    section, remove, name = req.get("section"), req.get("remove", False), req.get("name", "")
    problems = []
    if not isinstance(section, str):
        problems.append(Problem("section", f"{shown(section)} (expected a section name)"))
    if not isinstance(remove, bool):
        problems.append(Problem("remove", f"{shown(remove)} (expected true or false)"))
    if not isinstance(name, str):
        problems.append(Problem("name", f"{shown(name)} (expected the name of the item to remove)"))
    if problems:
        raise InvalidInputError("bad policy-edit request", problems)
    check_depth(req.get("item"))
    return Edit(str(section), req.get("item"), bool(remove), str(name))


def edit_policy(
    edit: Edit,
    *,
    kernel: Kernel,
    policies: PolicyRepository,
    source: str,
    ask: Ask | None = None,
    read_ports: PortReader = read_bridge_ports,
) -> Edited:
    """Make `edit` and have the kernel hold it: a running daemon (`ask`) validates, stores and converges it
    (its refusal raised with its own kind); with none, this process does (`store_edit`, then a converge that
    reads the kernel first)."""
    reply = ask({"op": "policy-edit", **edit_wire(edit), "source": source}) if ask is not None else None
    if reply is not None:
        if not reply.get("ok"):
            raise from_wire(reply)
        ms = reply.get("ms")
        return Edited(
            generation=int(reply.get("generation") or 0),
            changes=int(reply.get("changes") or 0),
            checked=str(reply.get("checked")),
            by_daemon=True,
            summary=dict(reply.get("summary") or {}),
            ms=float(ms) if isinstance(ms, int | float) else None,
        )
    stored = store_edit(edit, kernel=kernel, policies=policies, source=source, read_ports=read_ports)
    summary: dict[str, int] = {}
    ms = None
    if stored.changes:
        _, result = kernel.converge(full=True)
        if result is not None:
            summary, ms = dict(result.summary), result.seconds * 1000
    return Edited(stored.generation, len(stored.changes), stored.checked, False, summary, ms)
