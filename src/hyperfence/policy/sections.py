"""The policy sections around the rules: flood limits (`limits`) and agent heartbeats (`heartbeats`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from hyperfence.model.policy import AllVmsSelector, Direction, FloodLimit, LabelSelector, Selector, VmSelector
from hyperfence.policy import syntax
from hyperfence.policy.collector import Collector, Strict

StrOrList = StrictStr | list[StrictStr]


class LimitDoc(Strict):
    id: StrictStr | None = None
    vms: StrOrList
    direction: Literal["in", "out", "both"] = "both"
    new_flows: Annotated[StrictInt, Field(ge=1, le=10_000_000)]
    burst: Annotated[StrictInt, Field(ge=1, le=100_000_000)] | None = None
    log: StrictBool = True


_DIRECTIONS = {"in": (Direction.IN,), "out": (Direction.OUT,), "both": (Direction.OUT, Direction.IN)}


def parse_limits(c: Collector, items: list[Any], vm_names: set[str]) -> list[FloodLimit]:
    out: list[FloodLimit] = []
    ids: dict[str, int] = {}
    for i, raw in enumerate(items):
        p = f"limits[{i}]"
        doc = c.model(LimitDoc, raw, p)
        if doc is None:
            continue
        limit_id = c.value(lambda s: syntax.parse_name(s, "limit id"), doc.id or f"l{i}", f"{p}.id")
        if limit_id is not None and len(limit_id) > 32:
            c.add(f"{p}.id", f"{limit_id!r} is longer than 32 characters (it is written into log prefixes)")
        if limit_id is not None and (first := ids.setdefault(limit_id, i)) != i:
            c.add(f"{p}.id", f"{limit_id!r} is also the id of limits[{first}] (expected unique ids)")
        texts = [doc.vms] if isinstance(doc.vms, str) else doc.vms
        if not texts:
            c.add(f"{p}.vms", "empty (expected at least one selector)")
        sels: list[Selector] = []
        for j, text in enumerate(texts):
            path = f"{p}.vms" if isinstance(doc.vms, str) else f"{p}.vms[{j}]"
            sel = c.value(syntax.parse_selector, text, path)
            if sel is None:
                continue
            if not isinstance(sel, VmSelector | LabelSelector | AllVmsSelector):
                c.add(path, f"{text!r} selects addresses, not VMs (expected vm:NAME, label:KEY=VALUE or vms)")
            elif isinstance(sel, VmSelector) and sel.name not in vm_names:
                c.add(path, f"VM {sel.name!r} is not declared")
            else:
                sels.append(sel)
        burst = doc.burst if doc.burst is not None else 2 * doc.new_flows
        if limit_id is not None and sels:
            out.append(
                FloodLimit(limit_id, tuple(sels), _DIRECTIONS[doc.direction], doc.new_flows, burst, doc.log)
            )
    return out
