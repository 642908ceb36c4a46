"""`hyperfence <noun> <verb>`: the command line. A command parses its arguments, calls its use case in
`hyperfence/services/` and renders the answer; errors become exit codes in one place (`main`, through the
table in `errors.py`)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Annotated

import typer
import yaml

from hyperfence import errors
from hyperfence.cli import render
from hyperfence.cli.output import err, out, plain, plain_lines, styled, table
from hyperfence.cli.vm import agent_app, vm_app
from hyperfence.model.kernel import FLAVOUR_ENV, Flavour, parse_flavour
from hyperfence.policy.document import MAX_POLICY_BYTES, load_document
from hyperfence.policy.local import CHAINS_ENV, parse_chains
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.whatif import Flow
from hyperfence.reconcile.engine import Engine, read_policy_file
from hyperfence.services import can as can_service
from hyperfence.services import edit as edit_service
from hyperfence.services import policy as policy_service
from hyperfence.services import ruleset as ruleset_service
from hyperfence.services import status as status_service
from hyperfence.services.edit import Edit

DEFAULT_STATE = "/var/lib/hyperfence"

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="hyperfence: per-VM firewall on the hypervisor's virtual switch.",
)
policy_app = typer.Typer(no_args_is_help=True, help="Check, apply and show the policy.")
ruleset_app = typer.Typer(
    no_args_is_help=True, help="What hyperfence wants in the kernel, and what is there."
)
app.add_typer(policy_app, name="policy")
app.add_typer(ruleset_app, name="ruleset")
app.add_typer(vm_app, name="vm")
app.add_typer(agent_app, name="agent")


@dataclass
class Ctx:
    netns: str | None
    state_dir: str
    flavour: Flavour | None = None  # forced data plane; None: picked from what the kernel offers
    local_only: bool = True  # only the VMs whose port is on this host's bridges get chains (--chains)

    def engine(self, policy_file: str | None = None) -> Engine:
        return Engine(
            netns=self.netns,
            state_dir=self.state_dir,
            policy_file=policy_file,
            flavour=self.flavour,
            local_only=self.local_only,
        )


def lab_target(lab: str) -> tuple[str, str]:
    """(netns, state dir) of a lab made by `hyperfence lab up --name LAB`."""
    return f"hf-{lab}-host", os.path.join(DEFAULT_STATE, "labs", lab)


@app.callback()
def _global(
    ctx: typer.Context,
    netns: Annotated[
        str | None,
        typer.Option(
            envvar="HYPERFENCE_NETNS", help="Network namespace holding the bridges (default: ours)."
        ),
    ] = None,
    state_dir: Annotated[
        str | None,
        typer.Option(envvar="HYPERFENCE_STATE_DIR", help=f"State directory (default {DEFAULT_STATE})."),
    ] = None,
    lab: Annotated[
        str | None,
        typer.Option(
            envvar="HYPERFENCE_LAB", help="Act on the lab of this name (sets --netns and --state-dir)."
        ),
    ] = None,
    flavour: Annotated[
        str | None,
        typer.Option(
            envvar=FLAVOUR_ENV,
            help="Data plane: auto (default: bridge_native where the kernel has bridge conntrack and "
            "reject, else br_netfilter), br_netfilter or bridge_native.",
        ),
    ] = None,
    chains: Annotated[
        str,
        typer.Option(
            envvar=CHAINS_ENV,
            help="Which declared VMs get chains in this host's kernel: local (default: the VMs whose port "
            "is on its bridges; the others stay addresses in the rules' sets) or declared (every VM the "
            "policy declares). Give every command on a host the same.",
        ),
    ] = "local",
) -> None:
    if lab:
        lab_ns, lab_state = lab_target(lab)
        netns = netns or lab_ns
        state_dir = state_dir or lab_state
    ctx.obj = Ctx(
        netns=netns,
        state_dir=state_dir or DEFAULT_STATE,
        flavour=parse_flavour(flavour, field="--flavour"),
        local_only=parse_chains(chains, field=f"--chains ({CHAINS_ENV})"),
    )


# --- policy -----------------------------------------------------------------------------------------


@policy_app.command("check")
def policy_check(
    ctx: typer.Context,
    file: str,
    kernel: Annotated[
        bool,
        typer.Option(
            "--kernel",
            help="Also check the bridges' ports in the kernel (implied by --netns and --lab): a network "
            "device on a managed bridge must be declared as an uplink.",
        ),
    ] = False,
) -> None:
    """Validate FILE; list every problem with its path and value. Changes nothing."""
    c: Ctx = ctx.obj
    r = policy_service.check_policy(
        read_policy_file(file), source=file, netns=c.netns, devices=kernel or c.netns is not None
    )
    out.print(
        f"{plain(file)}: ok — {r.vms} VMs, {r.rules} rules, {r.ipsets} IP sets "
        f"-> {r.chains} chains, {r.nft_rules} nft rules, {r.sets} sets"
        + ("; no undeclared network device on its bridges" if r.devices_checked else "")
    )


@policy_app.command("apply")
def policy_apply(
    ctx: typer.Context,
    file: str,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Only show the plan and what differs, after the kernel checked the batch as a dry run.",
        ),
    ] = False,
) -> None:
    """Validate FILE, store it as a new generation and make the kernel hold it (atomically). Refused,
    changing nothing, while a network device on one of its bridges is not declared as an uplink."""
    from hyperfence.daemon import request  # noqa: PLC0415 - keeps `hyperfence policy check` light

    c: Ctx = ctx.obj
    document = read_policy_file(file)
    parsed = parse_policy(document, source=file)  # an invalid file is refused before the store is opened
    engine = c.engine()
    try:
        if dry_run:
            preview = policy_service.preview_policy(document, source=file, kernel=engine, parsed=parsed)
            out.print(f"would send {preview.commands} commands: {preview.summary or 'nothing to change'}")
            for line in preview.differences:
                out.print(f"- {plain(line)}")
            return
        applied = policy_service.apply_policy(
            document,
            source=os.path.abspath(file),
            kernel=engine,
            policies=engine.store,
            ask=lambda payload: request(c.state_dir, payload),
            parsed=parsed,
        )
    finally:
        engine.close()
    if applied.by_daemon:
        out.print(
            f"generation {applied.generation} applied by the daemon: {applied.summary or 'no change'} "
            f"({applied.ms} ms)"
        )
    else:
        out.print(
            f"generation {applied.generation} applied: {applied.summary or 'no change'} "
            f"({applied.ms or 0:.1f} ms; {applied.vms} VMs, {applied.rules} rules)"
        )


SectionArg = Annotated[
    str, typer.Argument(help="vms, networks, rules, limits, heartbeats, ipsets, settings or version.")
]


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    section: SectionArg,
    file: Annotated[str, typer.Argument(help="The item, YAML or JSON ('-': standard input).")],
) -> None:
    """Write one item of the policy: the VM, network, rule, limit or heartbeat of the same name (rules,
    limits, heartbeats: id) is replaced where it is, or the item is appended; for ipsets, FILE is one
    `NAME: [addresses]` entry; settings and version are replaced whole. Validated against the stored policy
    (a rule as itself), stored as the one object it changes, and applied."""
    item = load_document(sys.stdin.buffer.read() if file == "-" else _read_item(file), source=file)
    _edit(ctx, Edit(section, item), f"policy set {section} {file}")


@policy_app.command("remove")
def policy_remove(
    ctx: typer.Context,
    section: SectionArg,
    name: Annotated[str, typer.Argument(help="The item's name (rules, limits, heartbeats: its id).")] = "",
) -> None:
    """Remove one item of the policy (a section without items, e.g. settings: the whole section), and
    apply the policy without it."""
    _edit(ctx, Edit(section, remove=True, name=name), f"policy remove {section} {name}")


def _read_item(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise errors.NotFoundError(f"cannot read {file}: {e.strerror}") from None


def _edit(ctx: typer.Context, edit: Edit, source: str) -> None:
    from hyperfence.daemon import request  # noqa: PLC0415 - keeps `hyperfence policy check` light

    c: Ctx = ctx.obj
    engine = c.engine()
    try:
        done = edit_service.edit_policy(
            edit,
            kernel=engine,
            policies=engine.store,
            source=source,
            ask=lambda payload: request(c.state_dir, payload),
        )
    finally:
        engine.close()
    if not done.changes:
        out.print(f"generation {done.generation} already says so: nothing stored")
        return
    by = " by the daemon" if done.by_daemon else ""
    ms = f" ({done.ms:.1f} ms)" if done.ms is not None else ""
    out.print(
        f"generation {done.generation} ({done.changes} object(s) changed) applied{by}: "
        f"{done.summary or 'no change'}{ms}"
    )


@policy_app.command("show")
def policy_show(
    ctx: typer.Context, generation: Annotated[int | None, typer.Option(help="Default: the latest.")] = None
) -> None:
    """Print the stored policy (YAML)."""
    c: Ctx = ctx.obj
    stored = policy_service.show_policy(c.engine().store, generation)
    out.print(f"# generation {stored.generation} from {plain(stored.source)}")
    out.print(yaml.safe_dump(stored.document, sort_keys=False))  # YAML escapes control characters


# --- ruleset ----------------------------------------------------------------------------------------


@ruleset_app.command("show")
def ruleset_show(
    ctx: typer.Context,
    desired: Annotated[bool, typer.Option("--desired", help="What the policy compiles to.")] = False,
    actual: Annotated[bool, typer.Option("--actual", help="What the kernel holds (default).")] = False,
    policy: Annotated[str | None, typer.Option(help="Compile this file instead of the store.")] = None,
) -> None:
    """Show hyperfence's nftables state (desired or actual) in nft syntax, after comment lines saying what
    the kernel offers and whether the stateful path holds."""
    c: Ctx = ctx.obj
    if desired and actual:
        raise errors.InvalidInputError("--desired and --actual: choose one")
    shown = ruleset_service.show_ruleset(c.engine(policy), desired=desired)
    out.print(f"# {shown.kernel.description}", highlight=False)
    for p in shown.kernel.broken:
        out.print(f"# BROKEN: {p}", highlight=False)
    out.print(render.ruleset_text(shown.ruleset), highlight=False)


@ruleset_app.command("diff")
def ruleset_diff(
    ctx: typer.Context,
    policy: Annotated[str | None, typer.Option(help="Compare this file instead of the store.")] = None,
) -> None:
    """What differs between the desired ruleset and the kernel. Exit 1 when they differ."""
    c: Ctx = ctx.obj
    diff = ruleset_service.diff_ruleset(c.engine(policy))
    if diff.in_sync:
        out.print("in sync: the kernel holds exactly the desired ruleset")
        return
    for p in [*diff.broken, *diff.differences]:
        out.print(f"- {plain(p)}")
    if diff.commands:
        out.print(f"a reconcile would send {diff.commands} commands: {diff.summary}")
    raise typer.Exit(1)


@ruleset_app.command("stats")
def ruleset_stats(
    ctx: typer.Context,
    by_vm: Annotated[bool, typer.Option("--by-vm", help="One line per VM and rule.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Packet and byte counters per policy rule (summed over the VMs it applies to)."""
    c: Ctx = ctx.obj
    rows = ruleset_service.ruleset_stats(c.engine(), by_vm=by_vm)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    grid = table("rule", *(["vm"] if by_vm else []), "direction", "packets", "bytes")
    for r in rows:
        grid.add_row(
            plain(r["rule"]),
            *([plain(r["vm"])] if by_vm else []),
            r["direction"],
            str(r["packets"]),
            str(r["bytes"]),
        )
    out.print(grid)


# --- what-if ----------------------------------------------------------------------------------------


def parse_flow(
    port: str | None, protocol: str | None, icmp_type: str | None, icmp_code: int | None = None
) -> Flow:
    from hyperfence.policy import syntax  # noqa: PLC0415

    if port:
        number, sep, proto = port.partition("/")
        if not sep or proto not in ("tcp", "udp") or not number.isdigit() or not 1 <= int(number) <= 65535:
            raise errors.InvalidInputError(
                f"--port: {port!r} is not PORT/PROTO (expected e.g. 443/tcp or 53/udp)"
            )
        return Flow(proto, int(number))
    proto = protocol or "icmp"
    if proto == "icmp":
        try:
            typ = syntax.parse_icmp_type(icmp_type or "echo-request")
        except ValueError as e:
            raise errors.InvalidInputError(f"--icmp-type: {e}") from None
        # A flow's first ICMP packet is a query (echo, timestamp, ...): code 0, which is what ping sends.
        return Flow("icmp", icmp_type=typ, icmp_code=0 if icmp_code is None else icmp_code)
    if proto in ("arp", "dhcp") or proto.isdigit():
        return Flow(proto)
    raise errors.InvalidInputError(
        f"--protocol: {proto!r} is not a protocol (expected icmp, arp, dhcp or a number; use --port for tcp/udp)"
    )


def serving_flavour(c: Ctx, engine: Engine) -> Flavour:
    """The data plane `can` answers for: the forced one (`--flavour`, `HYPERFENCE_FLAVOUR`), else the running
    daemon's (its status), else the one last applied to this state dir's kernel (the store's `applied`
    events), else br_netfilter (what the compiler builds when nothing decided). Asks no kernel: `can` is a
    question about the policy and works without privileges."""
    if c.flavour is not None:
        return c.flavour
    from hyperfence.daemon import request  # noqa: PLC0415

    try:
        reply = request(c.state_dir, {"op": "status"}, timeout=5)
    except (OSError, ValueError):  # a daemon that does not answer (in time, or sensibly): ask the store
        reply = None
    kernel = (reply or {}).get("kernel") or {}
    running = {f.value: f for f in Flavour}.get(
        str(kernel.get("flavour"))
    )  # None: no daemon, or no probe yet
    return running or engine.applied_flavour() or Flavour.BR_NETFILTER


@app.command("can")
def can_cmd(
    ctx: typer.Context,
    src: str,
    dst: str,
    port: Annotated[str | None, typer.Option(help="PORT/PROTO, e.g. 443/tcp")] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="icmp (default), arp, dhcp (may SRC get a lease from DST?) or an IP protocol number"
        ),
    ] = None,
    icmp_type: Annotated[str | None, typer.Option(help="ICMP type (default echo-request)")] = None,
    icmp_code: Annotated[int | None, typer.Option(min=0, max=255, help="ICMP code (default 0)")] = None,
    policy: Annotated[str | None, typer.Option(help="Ask this policy file instead of the store.")] = None,
) -> None:
    """Would the compiled policy let SRC open this flow to DST? Names the deciding rule. Exit 1 if not."""
    c: Ctx = ctx.obj
    engine = c.engine(policy)
    flow = parse_flow(port, protocol, icmp_type, icmp_code)
    answer = can_service.check_flow(engine, src, dst, flow, flavour=lambda: serving_flavour(c, engine))
    verdict = styled("allowed", "green") if answer.allowed else styled("denied", "red")
    out.print(verdict, f": {plain(answer.reason)}", sep="")
    if not answer.allowed:
        raise typer.Exit(1)


# --- daemon, logs -----------------------------------------------------------------------------------


MAX_INTERVAL = 86400.0


def check_seconds(option: str, value: float, *, example: float) -> None:
    """An interval option is above 0 (0 or less would spin the loop) and at most a day (a longer one is
    a typo, and past ~1e9 the wait itself fails)."""
    if not (math.isfinite(value) and 0 < value <= MAX_INTERVAL):
        raise errors.InvalidInputError(
            f"{option}: {value:g} is not an interval in seconds (expected a number above 0 and at most "
            f"{MAX_INTERVAL:g}, e.g. {example:g})"
        )


@app.command("daemon")
def daemon_cmd(
    ctx: typer.Context,
    policy: Annotated[str | None, typer.Option(help="Follow this policy file instead of the store.")] = None,
    resync: Annotated[float, typer.Option(help="Seconds between full kernel checks.")] = 10.0,
    poll: Annotated[
        float | None,
        typer.Option(
            help="Seconds between checks of a --policy file (default 0.2). With the store, changes are seen "
            "as soon as they are written; this is only the longest wait without a change event (default 5)."
        ),
    ] = None,
    libvirt: Annotated[
        str | None,
        typer.Option(help="Take VMs from this libvirt URI too (e.g. qemu:///system); see docs/libvirt.md."),
    ] = None,
) -> None:
    """Run the reconcile loop (foreground). Kernel rules outlive it."""
    from hyperfence.daemon import configure_logging, run_daemon  # noqa: PLC0415

    c: Ctx = ctx.obj
    if poll is not None:
        check_seconds("--poll", poll, example=0.2)
    check_seconds("--resync", resync, example=10)
    configure_logging()
    run_daemon(
        netns=c.netns,
        state_dir=c.state_dir,
        policy_file=policy,
        poll=poll,
        resync=resync,
        libvirt=libvirt,
        flavour=c.flavour,
        local_only=c.local_only,
    )


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="The daemon's answer as JSON.")] = False,
) -> None:
    """The running daemon's health: the policy it applied, each loop (running or down, failures, last error),
    the agent channels (connections claimed, strangers refused), network devices on a managed bridge that
    get nothing because they are not declared as uplinks, those passed as provisional uplinks because the
    policy would cut them off, and a policy version refused for cutting one off. Exit 1 when a loop is down,
    the stateful path is broken, or a network device is cut off, provisional or refused."""
    from hyperfence.daemon import request  # noqa: PLC0415

    c: Ctx = ctx.obj
    reply = status_service.daemon_status(
        lambda payload: request(c.state_dir, payload, timeout=5), state_dir=c.state_dir
    )
    if as_json:
        typer.echo(json.dumps(reply, sort_keys=True))
    else:
        out.print(f"daemon pid {reply.get('pid')}, policy {plain(reply.get('policy'))}")
        grid = table("loop", "state", "failures", "last error")
        for name, loop in sorted((reply.get("loops") or {}).items()):
            state = styled(str(loop.get("state")), "red" if loop.get("state") == "down" else "green")
            grid.add_row(plain(name), state, str(loop.get("failures")), plain(loop.get("last_error") or "-"))
        out.print(grid)
        channels = reply.get("agent_channels") or {}
        refused = ", ".join(f"{k} {v}" for k, v in sorted((channels.get("refused") or {}).items())) or "none"
        out.print(
            plain(
                f"agent channels: {channels.get('claimed', 0)} connections verified; strangers refused: {refused}"
                + (f"; TLS endpoint {channels['endpoint']}" if channels.get("endpoint") else "")
            )
        )
        kernel = reply.get("kernel") or {}
        if kernel:
            repairs = f"; restored {kernel.get('repairs')} time(s)" if kernel.get("repairs") else ""
            out.print(plain(f"{kernel.get('summary')}; stateful path {kernel.get('stateful')}{repairs}"))
            for p in kernel.get("problems") or []:
                out.print(styled(plain(f"- {p}"), "red"))
        record = reply.get("kernel_record") or {}
        if record:
            known = (
                f"known at nftables generation {record.get('generation')} (rule bodies read back: "
                f"{'yes' if record.get('exact') else 'not yet'})"
                if record.get("generation") is not None
                else "read at the next converge"
            )
            out.print(plain(f"kernel state {known}; full reads skipped: {record.get('full_reads_skipped')}"))
            reads = reply.get("policy_reads") or {}
            if reads:
                out.print(
                    plain(
                        f"policy versions read as their changes: {reads.get('changes')} (parsed as "
                        f"themselves: {reads.get('parsed_changes')}), read whole: {reads.get('whole')}"
                    )
                )
        vms = reply.get("vms") or {}
        if vms:
            elsewhere = (
                ": the others' ports are not on this host's bridges" if vms.get("chains") == "local" else ""
            )
            here = f"{vms.get('here')} of {vms.get('declared')} declared (--chains {vms.get('chains')}{elsewhere})"
            out.print(plain(f"VMs with chains here: {here}"))
        for d in reply.get("undeclared_devices") or []:
            out.print(
                styled("cut off:", "red"),
                plain(
                    f"{d.get('port')} on bridge {d.get('bridge')} ({d.get('kind')}) is not declared as an "
                    f"uplink and gets nothing; to declare it: {d.get('declare')}"
                ),
            )
        for d in reply.get("provisional_uplinks") or []:
            out.print(
                styled("provisional uplink:", "yellow"),
                plain(
                    f"{d.get('port')} on bridge {d.get('bridge')} ({d.get('kind')}) is not declared as an "
                    "uplink; the policy would cut it off, so it passes unfiltered until declared "
                    f"({d.get('declare')}) or taken off the bridge"
                ),
            )
        if reply.get("refused"):
            out.print(styled("policy refused:", "red"), plain_lines(reply["refused"]))
    if not reply.get("healthy", False):
        raise typer.Exit(1)


def _register_optional() -> None:
    from hyperfence.cli import demo, lab, logs  # noqa: PLC0415

    app.add_typer(lab.app, name="lab")
    app.command("logs")(logs.logs_cmd)
    app.command("demo")(demo.demo_cmd)


def main() -> None:
    _register_optional()
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except errors.HyperfenceError as e:
        err.print(styled("error:", "red"), plain_lines(e))
        sys.exit(errors.exit_code(e))  # the one table (errors.KINDS)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        if not is_usage_error(e):
            raise
        e.show()  # type: ignore[attr-defined]
        sys.exit(e.exit_code)  # type: ignore[attr-defined]


def is_usage_error(e: BaseException) -> bool:
    """A click `ClickException` (a missing argument, an unknown command, a value of the wrong type): the
    click that typer 0.2x vendors (`typer._click`), not only the `click` package, so they are matched by
    class name."""
    return any(cls.__name__ == "ClickException" for cls in type(e).__mro__)
