"""The policy sections around the rules: limits (flood limits and connection caps, `limits`) and agent
heartbeats (`heartbeats`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, StrictBool, StrictInt, StrictStr

from hyperfence.model.policy import (
    DEFAULT_BOOT_GRACE,
    MAX_CONNECTIONS,
    AllVmsSelector,
    ConnectionCap,
    Direction,
    FloodLimit,
    Heartbeat,
    LabelSelector,
    Release,
    Selector,
    SilenceAction,
    VmSelector,
)
from hyperfence.policy import syntax
from hyperfence.policy.collector import Collector, Strict, one_or_list


class SectionDoc(Strict):
    """An entry that selects VMs. (Every field has a default, see `Collector.fields`; `REQUIRED` names the
    fields that must be given.)"""

    REQUIRED: ClassVar[tuple[str, ...]] = ("vms",)
    id: StrictStr | None = None
    vms: Any = None  # a selector or a list of them


class LimitDoc(SectionDoc):
    """A flood limit (`new_flows`), a connection cap (`connections`), or both for the same VMs."""

    direction: Literal["in", "out", "both"] = "both"
    new_flows: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    burst: Annotated[StrictInt, Field(ge=1, le=100_000_000)] | None = None
    connections: Annotated[StrictInt, Field(ge=1, le=MAX_CONNECTIONS)] | None = None
    log: StrictBool = True


_DIRECTIONS = {"in": (Direction.IN,), "out": (Direction.OUT,), "both": (Direction.OUT, Direction.IN)}


def _section_id(c: Collector, text: str, p: str, *, section: str, ids: dict[str, int], i: int) -> str | None:
    item_id = c.value(lambda s: syntax.parse_id(s, "id"), text, f"{p}.id")
    if item_id is not None and (first := ids.setdefault(item_id, i)) != i:
        c.add(f"{p}.id", f"{item_id!r} is also the id of {section}[{first}] (expected unique ids)")
    return item_id


def parsed_selectors(c: Collector, value: Any, path: str) -> Iterator[tuple[str, Any, Selector]]:
    """Each selector of `value` (one or a list) that parses, with its path and text; an empty list and every
    selector that does not parse are reported."""
    if value == []:
        c.add(path, "empty (expected at least one selector)")
    for where, text in one_or_list(value, path):
        sel = c.value(syntax.parse_selector, text, where)
        if sel is not None:
            yield where, text, sel


def _vm_selectors(c: Collector, value: Any, path: str, vm_names: set[str] | None) -> list[Selector]:
    """Selectors of VMs only: vm:NAME (declared, unless `vm_names` is None: VMs come from an inventory),
    label:KEY=VALUE, vms."""
    sels: list[Selector] = []
    for where, text, sel in parsed_selectors(c, value, path):
        if not isinstance(sel, VmSelector | LabelSelector | AllVmsSelector):
            c.add(where, f"{text!r} selects addresses, not VMs (expected vm:NAME, label:KEY=VALUE or vms)")
        elif isinstance(sel, VmSelector) and vm_names is not None and sel.name not in vm_names:
            if not c.is_reported("vm", sel.name):  # (an invalid VM is reported where it is declared)
                c.add(where, f"VM {sel.name!r} is not declared")
        else:
            sels.append(sel)
    return sels


D = TypeVar("D", bound=SectionDoc)


def _entries(
    c: Collector, items: list[Any], doc_type: type[D], section: str, vm_names: set[str] | None
) -> Iterator[tuple[int, D, str, tuple[Selector, ...]]]:
    """The valid entries of a section that selects VMs: (index, document, id, selectors); problems are
    collected."""
    ids: dict[str, int] = {}
    for i, raw in enumerate(items):
        p = f"{section}[{i}]"
        got = c.fields(doc_type, raw, p, required=doc_type.REQUIRED)
        if got is None:
            continue
        doc, bad = got
        item_id = None
        if "id" not in bad:
            item_id = _section_id(c, doc.id or f"{section[0]}{i}", p, section=section, ids=ids, i=i)
        sels = _vm_selectors(c, doc.vms, f"{p}.vms", vm_names) if "vms" not in bad else []
        if item_id is not None and sels and not bad:
            yield i, doc, item_id, tuple(sels)


def parse_limits(
    c: Collector, items: list[Any], vm_names: set[str] | None
) -> tuple[list[FloodLimit], list[ConnectionCap]]:
    """The `limits` section: its flood limits and its connection caps (each in policy order)."""
    floods: list[FloodLimit] = []
    caps: list[ConnectionCap] = []
    for i, doc, lim_id, sels in _entries(c, items, LimitDoc, "limits", vm_names):
        p = f"limits[{i}]"
        if doc.new_flows is None:
            if doc.connections is None:
                c.add(p, "neither new_flows nor connections (expected at least one of them)")
            for name in ("direction", "burst"):
                if name in doc.model_fields_set:
                    c.add(
                        f"{p}.{name}",
                        "applies to new_flows only, which this entry does not set (the connection cap "
                        "counts the connections of both directions)",
                    )
        else:
            burst = doc.burst if doc.burst is not None else 2 * doc.new_flows
            floods.append(FloodLimit(lim_id, sels, _DIRECTIONS[doc.direction], doc.new_flows, burst, doc.log))
        if doc.connections is not None:
            caps.append(ConnectionCap(lim_id, sels, doc.connections, doc.log))
    return floods, caps


class HeartbeatDoc(SectionDoc):
    interval: Annotated[float, Field(ge=0.2, le=3600, allow_inf_nan=False)] = 1.0
    misses: Annotated[StrictInt, Field(ge=1, le=1000)] = 3
    action: Literal["alert", "isolate", "pause"] = "isolate"
    release: Literal["auto", "manual"] = "auto"
    boot_grace: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = DEFAULT_BOOT_GRACE


def parse_heartbeats(c: Collector, items: list[Any], vm_names: set[str] | None) -> list[Heartbeat]:
    """The `heartbeats` section. A VM selected by several entries takes the first (see `heartbeat_for`)."""
    return [
        Heartbeat(
            hb_id,
            sels,
            float(doc.interval),
            doc.misses,
            SilenceAction(doc.action),
            Release(doc.release),
            boot_grace=float(doc.boot_grace),
        )
        for _, doc, hb_id, sels in _entries(c, items, HeartbeatDoc, "heartbeats", vm_names)
    ]
