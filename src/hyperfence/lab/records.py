"""A lab's record: ``/run/hyperfence/labs/<lab>.json`` holds its plan, how many VMs really exist, and
dnsmasq's PID and command line; ``/run/hyperfence/labs/<lab>/`` holds dnsmasq's leases, log and PID file and
what other lab tools keep (libvirtd, agents, QEMU). The record is written before anything is created, so
`destroy_lab` can always find what a crashed `create_lab` left."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hyperfence.errors import ConflictError, InvalidInputError
from hyperfence.lab.plan import STATE_VERSION, LabPlan, plan_from_dict, plan_to_dict, validate_lab_name

STATE_ROOT = Path("/run/hyperfence/labs")


@dataclass(frozen=True)
class Record:
    plan: LabPlan
    created_vms: int
    dnsmasq_pid: int | None
    dnsmasq_argv: tuple[str, ...] | None


def state_file(name: str) -> Path:
    """Where lab `name` is recorded."""
    return STATE_ROOT / f"{validate_lab_name(name)}.json"


def state_dir(name: str) -> Path:
    """The directory holding lab `name`'s dnsmasq leases (``leases``), log (``dnsmasq.log``) and PID file."""
    return STATE_ROOT / validate_lab_name(name)


def read_record(name: str) -> Record | None:
    path = state_file(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"expected a version {STATE_VERSION} lab record")
        plan = plan_from_dict(data["plan"])
        created = data["created_vms"]
        pid = data["dnsmasq_pid"]
        argv = data["dnsmasq_argv"]
        if not isinstance(created, int) or not 0 <= created <= len(plan.vms):
            raise ValueError(f"created_vms: {created!r} is out of range")
        if pid is not None and (not isinstance(pid, int) or pid <= 1):
            raise ValueError(f"dnsmasq_pid: {pid!r} is not a PID")
        if argv is not None and (not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)):
            raise ValueError(f"dnsmasq_argv: {argv!r} is not a command line")
    except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
        raise ConflictError(
            f"lab {name!r}: the record {path} is unreadable ({exc}); destroy_lab({name!r}) removes the lab"
        ) from exc
    return Record(plan, created, pid, tuple(argv) if argv is not None else None)


def write_record(record: Record) -> None:
    """Replace the record atomically (write a temporary file, then rename it over the old one)."""
    path = state_file(record.plan.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "version": STATE_VERSION,
        "plan": plan_to_dict(record.plan),
        "created_vms": record.created_vms,
        "dnsmasq_pid": record.dnsmasq_pid,
        "dnsmasq_argv": list(record.dnsmasq_argv) if record.dnsmasq_argv is not None else None,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
