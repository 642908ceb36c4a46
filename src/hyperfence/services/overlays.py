"""The operator as an overlay producer: isolate, rate-limit, shield and release one VM.

One path for the daemon's control socket and for a CLI command that finds no daemon (it then works on its
own engine, writes the store and converges, as `policy apply` does). What every producer's overlays are
and how they merge: model/overlay.py; the heartbeat producer is the agent monitor (reconcile/agents.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

from hyperfence.errors import InvalidInputError, NotFoundError, Problem
from hyperfence.model.overlay import PRODUCERS, Overlay
from hyperfence.policy.overlays import parse_overlay, parse_producer
from hyperfence.reconcile.agents import PRODUCER as HEARTBEAT
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.engine import Engine

OPERATOR = "operator"
RELEASE_CHOICES = (OPERATOR, HEARTBEAT, "all")


def vm_choices(engine: Engine) -> dict[str, str]:
    """Every name and id a VM of the current policy (with the discovered VMs, in the daemon) goes by ->
    its id."""
    compiled = engine.compiled()
    out: dict[str, str] = {}
    for vm in compiled.policy.vms if compiled is not None else ():
        out[vm.name] = out[vm.id] = vm.id
    return out


def resolve_vm(engine: Engine, name: object) -> str:
    """The id of VM `name` (a name or an id): `InvalidInputError` at field `vm` naming some VMs."""
    choices = vm_choices(engine)
    if isinstance(name, str) and name in choices:
        return choices[name]
    compiled = engine.current
    names = sorted(vm.name for vm in compiled.policy.vms) if compiled is not None else []
    raise InvalidInputError(
        "overlay request refused",
        [
            Problem(
                "vm",
                f"{str(name)[:60]!r} is not a VM of the policy (expected one of: {', '.join(names[:10]) or 'none'}"
                "; see `hyperfence vm list`)",
            )
        ],
    )


def set_operator_overlay(engine: Engine, request: dict[str, Any]) -> tuple[Overlay, bool]:
    """Validate the request (every problem located, the VM included), then replace the operator's overlay
    of that kind on that VM (a second `vm isolate` updates the reason and the end). Stored before it is
    applied; (the overlay, whether what the compiler sees changed: converge)."""
    problems: list[Problem] = []
    vm_id = None
    try:
        vm_id = resolve_vm(engine, request.get("vm"))
    except InvalidInputError as e:
        problems.extend(e.problems)
    try:
        overlay = parse_overlay({**request, "vm": vm_id or "?"}, producer=OPERATOR, now=engine.clock())
    except InvalidInputError as e:
        problems.extend(e.problems)
    if problems:
        raise InvalidInputError("overlay request refused", problems)
    with engine.lock:
        mine = tuple(o for o in engine.overlays if o.producer == OPERATOR and o.key() != overlay.key())
        changed = engine.set_overlays(OPERATOR, (*mine, overlay))
    return overlay, changed


def release(engine: Engine, vm: object, producer: object, agents: AgentMonitor | None) -> dict[str, Any]:
    """Release VM `vm` from `producer`'s overlays (`all`: every producer's). The heartbeat producer's
    isolation is released as `vm release` always did (the agent's silence counts again from now; with
    `release: manual`, the only way out): through the agent monitor in the daemon, in the store without
    one. Returns what was released and whether the merge changed (`changed`: converge)."""
    problems: list[Problem] = []
    which: tuple[str, ...] | None = None
    if producer == "all":
        which = PRODUCERS
    else:
        try:
            which = (parse_producer(producer),)
        except ValueError as e:
            problems.append(Problem("producer", f"{e} or all"))
    vm_id = None
    try:
        vm_id = _release_target(engine, vm)
    except InvalidInputError as e:
        problems.extend(e.problems)
    if problems or which is None or vm_id is None:
        raise InvalidInputError("release refused", problems)
    before = engine.merged_overlays()
    released = [o.as_dict() for o in engine.overlays if o.vm == vm_id and o.producer in which]
    for p in which:
        if p == HEARTBEAT:
            _release_heartbeat(engine, vm_id, agents)
        else:
            with engine.lock:
                keep = tuple(o for o in engine.overlays if o.producer == p and o.vm != vm_id)
                engine.set_overlays(p, keep)
    return {
        "vm": vm_id,
        "released": released,
        "changed": engine.merged_overlays() != before,
        "isolated": vm_id in engine.quarantine,  # still, by a producer not released
    }


def _release_target(engine: Engine, vm: object) -> str:
    """A VM of the policy, or one that has overlays or an agent record (a libvirt VM that is shut off)."""
    if isinstance(vm, str) and (vm in {o.vm for o in engine.overlays} or vm in engine.store.agents()):
        return vm
    return resolve_vm(engine, vm)


def _release_heartbeat(engine: Engine, vm: str, agents: AgentMonitor | None) -> None:
    if agents is not None:
        with contextlib.suppress(NotFoundError):  # no agent enrolled: nothing of the heartbeat's to release
            agents.release(vm)
        return
    # No daemon: its agent records are in the store; the next daemon's monitor starts from them.
    records = engine.store.agents()
    rec = records.get(vm)
    if rec is not None and rec.isolated is not None:
        was = rec.isolated
        rec.isolated, rec.isolated_since, rec.released_at = None, None, engine.clock()
        engine.store.save_agents([rec])
        engine.store.add_event("released", {"by": "operator", "was": was}, vm=vm)
    with engine.lock:
        engine.set_overlays(
            HEARTBEAT, tuple(o for o in engine.overlays if o.producer == HEARTBEAT and o.vm != vm)
        )
