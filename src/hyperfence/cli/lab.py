"""`hyperfence lab up|down|status|exec`: VMs as network namespaces on a bridge (see lab/plan.py)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from hyperfence.cli.output import out, table
from hyperfence.errors import InvalidInputError, NotFoundError, Problem
from hyperfence.lab import agents as lab_agents
from hyperfence.lab import domains as lab_domains
from hyperfence.lab import hostroot_guest, records, topology
from hyperfence.lab import image as lab_image
from hyperfence.lab import qemu as lab_qemu
from hyperfence.lab.guest_shell import run_in_guest
from hyperfence.lab.plan import plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.lab.session import claim_state_dir, lab_state_dir, remove_state_dir
from hyperfence.model.kernel import FLAVOUR_ENV, parse_flavour
from hyperfence.policy.local import CHAINS_ENV, parse_chains
from hyperfence.reconcile.engine import Engine

app = typer.Typer(no_args_is_help=True, help="A lab of VMs as network namespaces (for the demo and tests).")

NameOpt = Annotated[str, typer.Option("--name", help="Lab name ([a-z0-9]{1,8}); several labs can coexist.")]


@app.command("up")
def up(
    name: NameOpt = "lab",
    vms: Annotated[int, typer.Option(help="How many VMs.")] = 3,
    agents: Annotated[bool, typer.Option(help="Start a real agent in every VM.")] = True,
    qemu: Annotated[
        bool,
        typer.Option(
            help="VMs as QEMU (TCG) guests under libvirt instead of namespaces (see docs/libvirt.md)."
        ),
    ] = False,
) -> None:
    """Create (or repair) the lab. Idempotent: what exists and works is kept (a QEMU guest that runs with
    its agent enrolled is not restarted). Writes a starting policy (no rules) beside its state, and
    starts an enrolled agent in every VM (they report once `hyperfence --lab NAME daemon` runs)."""
    plan = plan_lab(name, vms)
    topology.create_lab(plan, only=0 if qemu else None)
    engine = Engine(
        netns=plan.host_netns,
        state_dir=str(claim_state_dir(name)),
        flavour=parse_flavour(os.environ.get(FLAVOUR_ENV), field=FLAVOUR_ENV),
        local_only=parse_chains(os.environ.get(CHAINS_ENV), field=CHAINS_ENV),
    )
    try:
        if qemu:
            out.print(
                "lab libvirtd runs QEMU as root (a lab-only choice: see docs/libvirt.md); building the guest"
            )
            guests = lab_qemu.ensure_guests(plan, engine)
            started = [d.name for d, kept in guests if not kept]
            kept = [d.name for d, kept in guests if kept]
            out.print(
                f"{len(guests)} guest{'' if len(guests) == 1 else 's'} running: "
                + "; ".join(
                    part
                    for part in (
                        f"started {', '.join(started)}" if started else "",
                        f"already up {', '.join(kept)}" if kept else "",
                    )
                    if part
                )
            )
        elif agents:
            pids = lab_agents.start_detached(engine, plan)
            out.print(f"agents running in {len(pids)} VMs (pids {', '.join(str(p) for p in pids.values())})")
    finally:
        engine.close()
    policy_file = os.path.join(str(records.state_dir(name)), "policy.yaml")
    if not os.path.exists(policy_file):
        with open(policy_file, "w", encoding="utf-8") as f:
            yaml.safe_dump(lab_qemu.qemu_policy(plan) if qemu else lab_policy(plan), f, sort_keys=False)
    out.print(
        f"lab {name!r} is up: {len(plan.vms)} VMs on {plan.bridge} in netns {plan.host_netns}, "
        f"outside in {plan.outside_netns}"
    )
    out.print(f"a starting policy (no rules: all traffic denied) is in {policy_file}")
    out.print(f"use it with: hyperfence --lab {name} policy apply {policy_file}")
    if qemu:
        out.print(f"then run: hyperfence --lab {name} daemon --libvirt {lab_qemu.URI}")


@app.command("down")
def down(name: NameOpt = "lab") -> None:
    """Remove what `lab up` made: the lab's namespaces, processes and guests, and its state directory (store,
    agent keys, traffic log) if `lab up` created it. Idempotent. A daemon running for the lab is not the
    lab's: it is left running, and then its state directory is kept too."""
    from hyperfence.daemon import request  # noqa: PLC0415 - only down asks for a daemon

    plan = topology.read_lab(name)
    if plan is not None:
        lab_agents.stop_detached(plan)
        lab_qemu.down_qemu(plan)
    topology.destroy_lab(name)
    state = lab_state_dir(name)
    try:
        daemon = request(str(state), {"op": "status"}, timeout=2)
    except (OSError, ValueError):  # a control socket that does not answer: no daemon serves it
        daemon = None
    if daemon is not None:
        out.print(
            f"lab {name!r} is down; a daemon (pid {daemon.get('pid')}) still runs for it, so its state "
            f"{state} is kept: stop the daemon, then run `hyperfence lab down --name {name}` again"
        )
    elif remove_state_dir(name):
        out.print(f"lab {name!r} is down (its state {state} removed)")
    elif state.exists():
        out.print(f"lab {name!r} is down; {state} was not made by `lab up` and is left as it is")
    else:
        out.print(f"lab {name!r} is down")


@app.command("status")
def status(name: NameOpt = "lab") -> None:
    """What exists of the lab: its namespaces, dnsmasq, NAT, and each VM (namespace, or QEMU guest and its
    state in libvirt) with its port on the bridge."""
    st = topology.lab_status(name)
    if not st.recorded and not st.host_netns_exists:
        raise NotFoundError(f"lab {name!r} does not exist (run `hyperfence lab up --name {name}`)")
    plan = topology.read_lab(name)
    guests = lab_qemu.guest_status(plan) if plan is not None and lab_qemu.is_qemu_lab(plan) else None
    vms = (
        f"{sum(g.is_active for g in guests)}/{st.planned_vms} QEMU guests running"
        if guests is not None
        else f"{st.created_vms}/{st.planned_vms} VMs"
    )
    out.print(
        f"lab {name}: host netns {'up' if st.host_netns_exists else 'MISSING'}, outside "
        f"{'up' if st.outside_netns_exists else 'MISSING'}, dnsmasq "
        f"{'pid ' + str(st.dnsmasq_pid) if st.dnsmasq_alive else 'not running'}, "
        f"NAT {'present' if st.nat_present else 'missing'}, {vms}"
    )
    if guests is not None:
        grid = table("vm", "domain", "state", "port present", "port up")
        for g in guests:
            grid.add_row(
                g.vm, g.domain, g.state, "yes" if g.port_present else "no", "yes" if g.port_up else "no"
            )
        out.print(grid)
        return
    grid = table("vm", "netns", "port present", "port up")
    for v in st.vms:
        grid.add_row(
            v.name,
            "yes" if v.netns_exists else "no",
            "yes" if v.port_present else "no",
            "yes" if v.port_up else "no",
        )
    out.print(grid)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_cmd(
    ctx: typer.Context,
    vm: str,
    name: NameOpt = "lab",
    timeout: Annotated[
        int, typer.Option(help="QEMU guests: the guest stops the command after this many seconds.")
    ] = 30,
) -> None:
    """Run a command inside a lab VM (or `host` / `outside`): hyperfence lab exec vm1 -- ping -c1 10.77.0.12

    In a `lab up --qemu` lab the command runs in the guest through its lab shell (docs/guests.md)."""
    plan = topology.read_lab(name)
    if plan is None:
        raise NotFoundError(f"lab {name!r} does not exist (run `hyperfence lab up --name {name}`)")
    argv = list(ctx.args)
    if not argv:
        raise typer.BadParameter("give the command after --, e.g. -- ping -c1 10.77.0.12")
    if vm == "host":
        netns = plan.host_netns
    elif vm == "outside":
        netns = plan.outside_netns
    else:
        match = next((v for v in plan.vms if v.name == vm), None)
        if match is None:
            raise NotFoundError(
                f"lab {name!r} has no VM {vm!r} (expected host, outside or vm1..vm{len(plan.vms)})"
            )
        shell = lab_domains.shell_socket(plan, vm)
        if not (topology.NETNS_DIR / match.netns).exists() and shell.exists():  # a QEMU guest (lab up --qemu)
            result = run_in_guest(shell, shlex.join(argv), timeout=timeout)
            sys.stdout.write(result.output)
            raise typer.Exit(result.status)
        netns = match.netns
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", netns, *argv])  # noqa: S606 - replaces this process by design


@app.command("image")
def image(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where the image and its cache go (nothing is installed elsewhere).")
    ] = lab_image.DEFAULT_OUT,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if an up-to-date image is there.")
    ] = False,
) -> None:
    """Build (or reuse) a tiny guest for tests and the demo: a Debian kernel and an initramfs with busybox,
    Debian's Python and the agent; it boots under QEMU TCG in seconds (docs/guests.md)."""
    img = lab_image.build_image(out_dir, force=force)
    how = "reused (up to date)" if img.reused else f"built in {img.build_seconds:.1f} s"
    out.print(f"guest image {how}: {img.kernel_package}, Python {img.python_version}")
    out.print(f"  kernel  {img.kernel}  {img.kernel_bytes / 1e6:.1f} MB")
    out.print(
        f"  initrd  {img.initrd}  {img.initrd_bytes / 1e6:.1f} MB "
        f"({img.initrd_unpacked_bytes / 1e6:.1f} MB unpacked, {img.stdlib_modules} stdlib files)"
    )
    out.print("boot it by hand: see docs/guests.md (the agent's config comes as QEMU firmware config)")


@app.command("guest-run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def guest_run(
    ctx: typer.Context,
    cwd: Annotated[
        Path | None, typer.Option(help="Where the command runs in the guest (default: here).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="K=V added to the command's environment (repeat).")
    ] = None,
    memory: Annotated[int, typer.Option(help="The guest's memory in MiB.", min=256)] = 2048,
    smp: Annotated[int, typer.Option(help="The guest's CPUs.", min=1, max=16)] = 2,
    timeout: Annotated[float, typer.Option(help="Kill the guest after this many seconds.", min=1)] = 1800,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            "--run-dir", help="Keep the run's files here ($HF_GUEST_OUT in the guest, console.log)."
        ),
    ] = None,
    images: Annotated[
        Path, typer.Option("--images", help="Where `lab image` keeps its files; the boot files go under it.")
    ] = lab_image.DEFAULT_OUT,
) -> None:
    """Run a command of this host on Debian's stock kernel: a QEMU (TCG) guest booted from the kernel `lab
    image` uses, with its modules, whose root is this host's filesystem (read-only, writes in RAM); e.g.
    hyperfence lab guest-run -- .venv/bin/python -m pytest -q tests/netns/firewall (docs/hostroot.md).
    Exits with the command's status; 124 when it timed out, 125 when the guest never ran it."""
    argv = list(ctx.args)
    if not argv:
        raise typer.BadParameter("give the command after --, e.g. -- uname -r")
    extra: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError("invalid --env", [Problem("--env", f"{item!r} (expected KEY=VALUE)")])
        extra[key] = value
    boot = hostroot_guest.prepare_boot(images)
    how = "reused" if boot.reused else f"made in {boot.build_seconds:.1f} s"
    typer.echo(f"hostroot guest: {boot.kernel_package} (boot files {how})", err=True)
    run = hostroot_guest.run_in_hostroot(
        argv,
        cwd=str((cwd or Path.cwd()).absolute()),
        boot=boot,
        env=extra,
        memory_mib=memory,
        smp=smp,
        timeout=timeout,
        stream=sys.stdout,
        run_dir=run_dir,
    )
    boot_time = "-" if run.boot_seconds is None else f"{run.boot_seconds:.1f} s"
    typer.echo(
        f"hostroot guest: status {run.status}, boot {boot_time}, whole run {run.seconds:.1f} s", err=True
    )
    if run.timed_out:
        typer.echo(f"hostroot guest: killed after {timeout:g} s", err=True)
        raise typer.Exit(124)
    if run.status is None:
        typer.echo(f"hostroot guest: the command never ended; the console said:\n{run.console}", err=True)
        raise typer.Exit(125)
    raise typer.Exit(run.status)
