"""`hyperfence vm ...` (agents, isolation) and `hyperfence agent build`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from hyperfence import errors
from hyperfence.cli.output import err, out, plain, table
from hyperfence.codec.libvirt_xml import AGENT_FW_CFG
from hyperfence.daemon import request
from hyperfence.policy.syntax import LABEL_RE, parse_ipv4
from hyperfence.reconcile.conntrack import read_vm_connections
from hyperfence.reconcile.engine import Engine
from hyperfence.services.enroll import Enrolment, enroll_vm, fw_cfg_dir
from hyperfence.services.events import list_events
from hyperfence.services.overlays import RELEASE_CHOICES, release, set_operator_overlay

__all__ = ["agent_app", "fw_cfg_dir", "vm_app"]  # fw_cfg_dir: now services/enroll.py's

vm_app = typer.Typer(
    no_args_is_help=True,
    help="VMs: agents (enrol, list, events) and overlays (isolate, rate-limit, shield, release).",
)
agent_app = typer.Typer(no_args_is_help=True, help="The guest agent.")


def _engine(ctx: typer.Context) -> Engine:
    engine: Engine = ctx.obj.engine()
    return engine


def _ask(engine: Engine, payload: dict[str, Any]) -> dict[str, Any] | None:
    reply = request(engine.state_dir, payload)
    if reply is not None and not reply.get("ok"):
        raise errors.ConflictError(f"the daemon refused: {reply.get('error')}")
    return reply


@vm_app.command("enroll")
def vm_enroll(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id) from the policy.")],
    channel: Annotated[
        str, typer.Option(help="unix (lab, this host), virtio (libvirt guests) or tls (over the network).")
    ] = "unix",
    out_file: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Where to write the agent's config (default: STATE/agents/VM.json; with --fw-cfg: "
            "STATE-fw-cfg/VM.agent.json, readable by QEMU's user only).",
        ),
    ] = None,
    libvirt: Annotated[
        str | None,
        typer.Option(help="VM is a libvirt domain (name or UUID) at this URI: its UUID and channel socket."),
    ] = None,
    fw_cfg: Annotated[
        bool,
        typer.Option(
            "--fw-cfg",
            help="With --libvirt: hand the config to the guest at its next boot as QEMU firmware config "
            f"{AGENT_FW_CFG} (added to the domain's definition), instead of copying it in.",
        ),
    ] = False,
) -> None:
    """Issue a new key for VM's agent and write the agent's config file (copy it into the guest, or --fw-cfg)."""
    engine = _engine(ctx)
    hypervisor = None
    if libvirt:
        from hyperfence.adapters.libvirt import LibvirtInventory  # noqa: PLC0415 - only with --libvirt

        hypervisor = LibvirtInventory(libvirt)
    try:
        done = enroll_vm(
            Enrolment(vm, channel=channel, out=out_file, fw_cfg=fw_cfg),
            engine=engine,
            hypervisor=hypervisor,
            ask=lambda payload: request(engine.state_dir, payload),
        )
    finally:
        if hypervisor is not None:
            hypervisor.close()
    handover = ""
    if done.qemu is not None:
        handover = (
            f"; readable by QEMU's user {done.qemu.name} ({done.qemu.source}) only; the domain hands it over as "
            f"firmware config {AGENT_FW_CFG} from its next boot (in the guest: modprobe qemu_fw_cfg; agent "
            f"--config /sys/firmware/qemu_fw_cfg/by_name/{AGENT_FW_CFG}/raw)"
        )
    out.print(
        plain(
            f"enrolled {done.vm.name} ({done.vm.id}): agent config {done.path} (contains the key: mode 0600)"
            + handover
            + ("" if done.reloaded else "; no daemon is running: it reads the enrolment when it starts")
        )
    )


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    return f"{max(0.0, time.time() - t):.1f} s ago"


def no_agent_row(vm: str, name: str) -> dict[str, Any]:
    """`vm list`'s row of a VM no agent is enrolled for (shaped like the agent monitor's rows)."""
    return {
        "vm": vm,
        "name": name,
        "state": None,
        "status": "no agent",
        "last_seen": None,
        "seq": None,
        "agent": None,
        "isolated": None,
        "counts": {},
    }


def _with_connections(engine: Engine, rows: list[dict[str, Any]]) -> list[str]:
    """Add every VM of the policy that has no agent row, and each VM's share of connection tracking
    (`connections`: cap, tracked now, cap drops; read from the kernel). Returns what could not be read."""
    compiled = engine.compiled()
    if compiled is None:
        return []
    known = {row["vm"] for row in rows}
    for vm in compiled.policy.vms:
        if vm.id not in known:
            rows.append(no_agent_row(vm.id, vm.name))
    figures, problems = read_vm_connections(compiled.resolved, netns=engine.netns)
    learners = {vm.id for vm in compiled.policy.vms if vm.learns}
    for row in rows:
        fig = figures.get(row["vm"])
        row["connections"] = None if fig is None else fig.as_dict()
        if row["vm"] in learners:  # its addresses come from DHCP leases: which, and until when
            row["learned"] = [
                {
                    "ip": str(le.ip),
                    "expires": le.expires,
                    "server": None if le.server is None else str(le.server),
                }
                for le in engine.leases
                if le.vm == row["vm"]
            ]
    return problems


def _learned_cell(row: dict[str, Any]) -> Text:
    """A learning VM's addresses and when each lease ends (plain text); `-` for a VM that declares them."""
    leases = row.get("learned")
    if leases is None:
        return Text("-")
    if not leases:
        return Text("none yet")
    now = time.time()
    return Text(
        ", ".join(
            f"{le['ip']} until "
            f"{datetime.fromtimestamp(le['expires'], UTC).isoformat(timespec='seconds')}"
            f" ({max(0.0, le['expires'] - now) / 60:.0f} min)"
            for le in leases
        )
    )


def _connections_cells(conn: dict[str, Any] | None) -> tuple[Text, Text]:
    """(tracked / cap, cap drops), plain text (never markup)."""
    if conn is None:
        return Text("-"), Text("-")

    def number(v: int | None) -> str:
        return "?" if v is None else str(v)

    return Text(f"{number(conn['tracked'])} / {conn['cap']}"), Text(number(conn["cap_drops"]))


@vm_app.command("list")
def vm_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False
) -> None:
    """Every VM of the policy and every enrolled VM, shut-off ones too: its full id, its state in libvirt
    (running, paused, shutoff; `-` when libvirt does not manage it or no daemon runs), agent status (ok /
    late / silent / booting / never / no agent / vm not running), last seen, isolation, refusals, its
    connection tracking: tracked connections / cap, and new connections its cap dropped, and for a VM that
    learns its addresses from DHCP, each learned address and when its lease ends."""
    engine = _engine(ctx)
    reply = _ask(engine, {"op": "agents"})
    if reply is not None:
        rows: list[dict[str, Any]] = reply["agents"]
    else:  # no daemon: what the store remembers
        names = _policy_names(engine)
        rows = [
            {
                "vm": r.vm,
                "name": names.get(r.vm, r.vm),
                "state": None,
                "status": "daemon not running",
                "last_seen": r.last_seen,
                "seq": r.last_seq,
                "agent": r.agent,
                "isolated": r.isolated,
                "counts": {},
            }
            for r in engine.store.agents().values()
        ]
    problems = _with_connections(engine, rows)
    _with_overlays(engine, rows)
    for p in problems:
        err.print(plain(p))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
        return
    grid = table(
        "vm",
        "id",
        "state",
        "agent",
        "last seen",
        "isolation",
        "refused",
        "version",
        "conns / cap",
        "cap drops",
        "learned addresses",
        "overlays",
    )
    for row in rows:
        refused = {k: v for k, v in row.get("counts", {}).items() if k != "accepted" and v}
        grid.add_row(
            plain(row["name"]),
            plain(row["vm"]),
            plain(row.get("state") or "-"),
            plain(row["status"]),
            _ago(row["last_seen"]),
            plain("isolated: " + row["isolated"]) if row["isolated"] else "-",
            plain(", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "-"),
            plain(row.get("agent") or "-"),
            *_connections_cells(row.get("connections")),
            _learned_cell(row),
            _overlays_cell(row["overlays"]),
        )
    out.print(grid)


def _with_overlays(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Each VM's overlays in force (`overlays`: producer, kind, reason, since, until, rate), from the store
    (every producer stores its overlays before they are applied); a VM with overlays and no row gets one."""
    now = time.time()
    by_vm: dict[str, list[dict[str, object]]] = {}
    for o in engine.store.overlays():
        if o.is_active(now):
            by_vm.setdefault(o.vm, []).append(o.as_dict())
    known = {row["vm"] for row in rows}
    for vm in sorted(set(by_vm) - known):
        rows.append(no_agent_row(vm, vm))
    for row in rows:
        row["overlays"] = by_vm.get(row["vm"], [])


def _overlays_cell(overlays: list[dict[str, Any]]) -> Text:
    """`isolate by operator since T until T: reason`, one line each (plain text, never markup)."""
    if not overlays:
        return Text("-")
    lines = []
    for o in overlays:
        rate = f" {o['rate']}/s" if o.get("rate") else ""
        until = "released" if o["until"] is None else _when(float(o["until"]))
        lines.append(
            f"{o['kind']}{rate} by {o['producer']} since {_when(float(o['since']))} until {until}: {o['reason']}"
        )
    return Text("\n".join(lines))


def _policy_names(engine: Engine) -> dict[str, str]:
    """VM id -> name, for the VMs of the stored policy."""
    compiled = engine.compiled()
    return {} if compiled is None else {vm.id: vm.name for vm in compiled.policy.vms}


def _target(engine: Engine, name: str) -> tuple[str, str]:
    """(id, name) of VM `name` (a name or an id): a VM of the policy, or an enrolled VM. VMs from libvirt
    are in the policy only while they run, so a shut-off one is found among the enrolled VMs, by its id or
    by the name the running daemon knows it by."""
    compiled = engine.compiled()
    for vm in compiled.policy.vms if compiled is not None else ():
        if name in (vm.name, vm.id):
            return vm.id, vm.name
    if name in engine.store.agents():
        return name, name
    try:
        reply = request(engine.state_dir, {"op": "agents"}, timeout=5)
    except (OSError, ValueError):  # a daemon that does not answer: the names it knows are not needed
        reply = None
    rows = reply.get("agents", []) if reply is not None and reply.get("ok") else []
    for row in rows:
        if name in (row.get("vm"), row.get("name")):
            return str(row["vm"]), str(row["name"])
    known = sorted(vm.name for vm in compiled.policy.vms) if compiled is not None else []
    known += sorted(str(row.get("name")) for row in rows if row.get("name") not in known)
    if compiled is None and not known:
        raise errors.NotFoundError("no policy yet: run `hyperfence policy apply FILE` first")
    raise errors.NotFoundError(
        f"VM {name!r} is neither in the policy nor enrolled (expected one of: {', '.join(known[:10]) or 'none'}"
        "; an enrolled VM's id works too, see `hyperfence vm list`)"
    )


@vm_app.command("events")
def vm_events(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
) -> None:
    """The VM's events: agent hello/bye, security events, isolation and release, filter repairs, the
    addresses it learned from DHCP (lease-learned with the lease's end, lease-released, lease-expired,
    lease-ignored), and from libvirt: actions, an address lost from its metadata, NICs left unprotected."""
    engine = _engine(ctx)
    try:
        vm_id, _ = _target(engine, vm)
    except errors.NotFoundError as e:  # a libvirt VM out of the policy: by the domain name of its events
        found = engine.store.vm_with_events(vm)
        if found is None:
            raise errors.NotFoundError(f"{e}; and no events are recorded for a VM or domain {vm!r}") from None
        vm_id = found
    last = 0
    while True:
        for ev in list_events(engine.store, vm=vm_id, after=last, limit=limit):
            last = ev["id"]
            when = datetime.fromtimestamp(ev.pop("time"), UTC).isoformat(timespec="seconds")
            kind = ev.pop("kind")
            for k in ("id", "vm"):
                ev.pop(k, None)
            # json.dumps escapes control characters in the event's fields; the kind may be a guest's
            out.print(f"{when} {plain(kind)} {json.dumps(ev, sort_keys=True)}", soft_wrap=True)
        if not follow:
            return
        time.sleep(0.5)


def _ask_typed(engine: Engine, payload: dict[str, Any]) -> dict[str, Any] | None:
    """Ask the daemon; a refusal is raised as the error class the daemon named (`error_kind`), so the
    exit code is the one the command has without a daemon."""
    reply = request(engine.state_dir, payload)
    if reply is not None and not reply.get("ok"):
        cls = getattr(errors, str(reply.get("error_kind")), None)
        if (
            isinstance(cls, type)
            and issubclass(cls, errors.HyperfenceError)
            and cls is not errors.HyperfenceError
        ):
            raise cls(str(reply.get("error")))
        raise errors.ConflictError(f"the daemon refused: {reply.get('error')}")
    return reply


ReasonOpt = Annotated[
    str | None, typer.Option("--reason", help="Why (required): shown in `vm list` and the events.")
]
ForOpt = Annotated[
    str | None,
    typer.Option("--for", help="For how long: 90s, 15m, 2h, 1d (default: until `hyperfence vm release`)."),
]


def _set_overlay(ctx: typer.Context, request_: dict[str, Any]) -> None:
    """The operator producer's overlay: through the daemon, or without one on this command's own engine
    (stored, then converged). Every problem of the request is reported at once (the VM too), with the
    same exit code with a daemon or without (`_ask_typed`)."""
    engine = _engine(ctx)
    reply = _ask_typed(engine, {"op": "overlay-set", "overlay": request_})
    if reply is not None:
        shown, how = reply["overlay"], "applied by the daemon"
    else:
        overlay, changed = set_operator_overlay(engine, request_)
        if changed:
            engine.converge()
        shown, how = overlay.as_dict(), "applied (no daemon is running)"
    until = shown["until"]
    end = "until released" if until is None else f"until {_when(until)}"
    rate = f" at {shown['rate']} new flows a second" if shown.get("rate") else ""
    out.print(plain(f"{request_['vm']}: {shown['kind']}{rate} by operator, {end}: {how}"))


@vm_app.command("isolate")
def vm_isolate(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id).")],
    reason: ReasonOpt = None,
    for_: ForOpt = None,
) -> None:
    """Isolate the VM (the operator's overlay): every packet to and from it is dropped, open flows too."""
    _set_overlay(ctx, {"vm": vm, "kind": "isolate", "reason": reason, "for": for_})


@vm_app.command("rate-limit")
def vm_rate_limit(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id).")],
    rate: Annotated[str, typer.Argument(help="New flows a second the VM may open (1 to 10,000,000).")],
    reason: ReasonOpt = None,
    for_: ForOpt = None,
) -> None:
    """Hold the new flows the VM sends to RATE a second (bursts of twice that); established flows are
    not counted. Of several producers' rate limits on a VM the strictest holds."""
    _set_overlay(ctx, {"vm": vm, "kind": "rate-limit", "reason": reason, "for": for_, "rate": rate})


@vm_app.command("shield")
def vm_shield(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id).")],
    reason: ReasonOpt = None,
    for_: ForOpt = None,
) -> None:
    """Shield the VM (a victim under attack): no new inbound flow reaches it; its established flows and
    its own outbound flows go on."""
    _set_overlay(ctx, {"vm": vm, "kind": "shield", "reason": reason, "for": for_})


@vm_app.command("release")
def vm_release(
    ctx: typer.Context,
    vm: Annotated[str, typer.Argument(help="VM name (or id).")],
    producer: Annotated[
        str,
        typer.Option(
            help="Whose overlays: operator (isolate, rate-limit, shield), heartbeat (the agent monitor's "
            "isolation; its silence counts again from now) or all (every producer's, the detector's too)."
        ),
    ] = "all",
) -> None:
    """Release the VM from a producer's overlays now (default: every producer's). Another producer's
    isolation stays: `vm list` shows who holds what."""
    engine = _engine(ctx)
    if producer not in RELEASE_CHOICES:
        raise errors.InvalidInputError(
            "vm release",
            [errors.Problem("--producer", f"{producer!r} is not one of {', '.join(RELEASE_CHOICES)}")],
        )
    vm_id, name = _target(engine, vm)
    reply = _ask_typed(engine, {"op": "overlay-release", "vm": vm_id, "producer": producer})
    if reply is None:
        reply = release(engine, vm_id, producer, None)
        if reply["changed"]:
            engine.converge()
    released = reply["released"]
    what = ", ".join(f"{o['kind']} by {o['producer']}" for o in released) or "nothing to release"
    still = "; still isolated by another producer (see `hyperfence vm list`)" if reply.get("isolated") else ""
    out.print(plain(f"{name}: " + ("released " if released else "") + what + still))


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@vm_app.command("label")
def vm_label(
    domain: Annotated[str, typer.Argument(help="The libvirt domain (name or UUID).")],
    changes: Annotated[
        list[str] | None,
        typer.Argument(help="KEY=VALUE labels to set (others are kept).", show_default=False),
    ] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="A label KEY to remove.")] = None,
    ips: Annotated[
        list[str] | None, typer.Option("--ip", help="The VM's address (repeat; replaces all of them).")
    ] = None,
    libvirt: Annotated[str, typer.Option(help="libvirt URI.")] = "qemu:///system",
) -> None:
    """Show or change a libvirt domain's hyperfence labels and addresses (its metadata), keeping the rest.

    Labels not named are kept, and so are the addresses unless --ip is given (`virsh metadata --set`
    replaces the whole element: labels without the <ip> take the VM out of the firewall). Written to the
    persistent definition and, if the domain runs, to the running domain; a running daemon sees it at once.
    """
    from hyperfence.adapters.libvirt import LibvirtInventory  # noqa: PLC0415 - only this command needs it

    wanted = _label_changes(domain, changes or [], remove or [], ips or [])
    addresses = list(ips) if ips else None  # None: keep them
    inventory = LibvirtInventory(libvirt)
    try:
        info = next((d for d in inventory.domains() if domain in (d.name, d.uuid)), None)
        if info is None:
            raise errors.NotFoundError(f"libvirt {libvirt} has no domain {domain!r} (see `virsh list --all`)")
        changed = bool(wanted or remove or addresses)
        if changed:
            labels = {k: v for k, v in info.labels.items() if k not in (remove or [])} | wanted
            info = inventory.set_labels(info.uuid, labels, ips=addresses)
    finally:
        inventory.close()
    shown = ", ".join(f"{k}={v}" for k, v in sorted(info.labels.items())) or "none"
    where = ""
    if changed:
        where = (
            " (set in the definition and the running domain)"
            if info.is_active
            else " (set in the definition)"
        )
    out.print(plain(f"{info.name}: labels {shown}; addresses {', '.join(info.ips) or 'none'}{where}"))
    if not info.ips:
        err.print(
            plain(f"warning: {info.name} has no address: hyperfence gives its tap nothing (--ip ADDRESS)")
        )


def _label_changes(domain: str, changes: list[str], remove: list[str], ips: list[str]) -> dict[str, str]:
    """The labels to set from KEY=VALUE arguments; `InvalidInputError` listing every bad argument (labels,
    keys to remove, addresses) before libvirt is asked anything."""
    problems: list[errors.Problem] = []
    wanted: dict[str, str] = {}
    for i, item in enumerate(changes):
        key, eq, value = item.partition("=")
        if eq and LABEL_RE.fullmatch(key) and LABEL_RE.fullmatch(value):
            wanted[key] = value
        else:
            problems.append(
                errors.Problem(
                    f"labels[{i}]",
                    f"{item!r} is not a label (expected KEY=VALUE of letters, digits, '_', '.', '/', '-')",
                )
            )
    problems += [
        errors.Problem("--remove", f"{k!r} is not a label key") for k in remove if not LABEL_RE.fullmatch(k)
    ]
    for addr in ips:
        try:
            parse_ipv4(addr)
        except ValueError as e:
            problems.append(errors.Problem("--ip", str(e)))
    if problems:
        raise errors.InvalidInputError(f"vm label {domain}", problems)
    return wanted


@agent_app.command("build")
def agent_build(
    out_file: Annotated[str, typer.Option("--out", help="The zipapp to write.")] = "hyperfence-agent.pyz",
) -> None:
    """Build the agent as one file (a zipapp: `python3 hyperfence-agent.pyz --config FILE`)."""
    from hyperfence.agent.build import build_zipapp  # noqa: PLC0415 - only this command needs it

    path = build_zipapp(Path(out_file))
    out.print(plain(f"{path} ({path.stat().st_size} bytes)"))
