"""The policy's use cases: check, preview, apply, show.

Every one validates the whole document first (`InvalidInputError` listing every problem) and refuses a
policy that would leave a network device on one of its bridges undeclared (`ConflictError`) before
anything is stored or sent to the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hyperfence.adapters.bridge_ports import read_bridge_ports
from hyperfence.errors import BugError, ConflictError, KernelError, NotFoundError, from_wire, prefixed
from hyperfence.model.policy import Policy
from hyperfence.policy.desired import desired_policy
from hyperfence.policy.local import with_local
from hyperfence.policy.overlays import with_overlays
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ports import PolicyRepository, StoredPolicy
from hyperfence.reconcile.engine import PortReader, check_devices
from hyperfence.reconcile.firewall import describe_drift
from hyperfence.ruleset.compile import compile_ruleset
from hyperfence.ruleset.plan import plan_changes
from hyperfence.services.ports import Ask, Kernel


@dataclass(frozen=True)
class CheckReport:
    """A valid policy's size, and what it compiles to."""

    source: str
    vms: int
    rules: int
    ipsets: int
    chains: int
    nft_rules: int
    sets: int
    devices_checked: bool  # the bridges' ports were read: no undeclared network device on them


def check_policy(
    document: Any,
    *,
    source: str,
    netns: str | None = None,
    devices: bool = False,
    read_ports: PortReader = read_bridge_ports,
) -> CheckReport:
    """Validate, resolve and compile `document`; with `devices`, also read the bridges' ports (in `netns`)
    and refuse a network device on them that the policy declares neither as an uplink nor as a VM's port.
    Changes nothing."""
    policy = parse_policy(document, source=source)
    counts = compile_ruleset(resolve_policy(policy)).counts()
    if devices:
        check_devices(netns, policy, read_ports)
    return CheckReport(
        source=source,
        vms=len(policy.vms),
        rules=len(policy.rules),
        ipsets=len(policy.ipsets),
        chains=counts["chains"],
        nft_rules=counts["rules"],
        sets=counts["sets"],
        devices_checked=devices,
    )


@dataclass(frozen=True)
class Preview:
    """What applying a policy would do to the kernel now: the batch's size and summary, and the differences
    between what the kernel holds and what the policy compiles to (sentences, as `ruleset diff` says them).
    The kernel took the batch as a dry run (`nft --check`): applying it would not be refused for what it
    says (a concurrent change can still intervene)."""

    vms: int
    rules: int
    commands: int
    summary: dict[str, int]
    differences: tuple[str, ...]


def preview_policy(
    document: Any,
    *,
    source: str,
    kernel: Kernel,
    parsed: Policy | None = None,
    read_ports: PortReader = read_bridge_ports,
) -> Preview:
    """Validate `document` (unless `parsed`, its `parse_policy` a caller already made, is given), check the
    bridges' devices, compile it as the daemon would (with the discovered VMs, learned addresses and
    overlays) for the kernel's data plane with the host's addresses, and plan it against what the kernel
    holds; the planned batch goes to the kernel as a dry run. Nothing is stored or applied.
    `KernelError` when the kernel would refuse the batch."""
    policy = _checked(document, parsed, source=source, netns=kernel.netns, read_ports=read_ports)
    # The desired state as the daemon would compile it: with the VMs it discovered, the learned addresses
    # and every producer's overlays (policy/desired.py); not the bare document.
    wanted = desired_policy(document, source=source, discovered=kernel.discovered, leases=kernel.leases)
    resolved = with_overlays(
        resolve_policy(wanted.policy, host_addresses=kernel.known_host_addresses()), kernel.merged_overlays()
    )
    desired = compile_ruleset(with_local(resolved, kernel.ports_for(wanted.policy)), flavour=kernel.flavour)
    actual = kernel.firewall.read()
    plan = plan_changes(desired, actual)
    if not plan.empty:
        refusal = kernel.nft.check(plan.batch())
        if refusal is not None:
            raise KernelError(
                f"the kernel would refuse this policy's batch ({len(plan.commands)} commands; checked as a "
                f"dry run, nothing was stored or changed): {refusal}"
            )
    return Preview(
        vms=len(policy.vms),
        rules=len(policy.rules),
        commands=len(plan.commands),
        summary=dict(plan.summary),
        differences=tuple(describe_drift(desired, actual.ruleset)),
    )


@dataclass(frozen=True)
class Applied:
    """A stored generation and how the kernel came to hold it: by the running daemon (`by_daemon`) or by
    this process's engine. `ms`: the whole apply as measured by whoever applied it."""

    generation: int
    by_daemon: bool
    summary: dict[str, int]
    ms: float | None
    vms: int
    rules: int


def apply_policy(
    document: Any,
    *,
    source: str,
    kernel: Kernel,
    policies: PolicyRepository,
    ask: Ask | None = None,
    expected: int | None = None,
    parsed: Policy | None = None,
    read_ports: PortReader = read_bridge_ports,
) -> Applied:
    """Validate `document` (unless `parsed` is given, as in `preview_policy`), check the bridges' devices,
    store it as a new generation (a compare-and-swap
    when `expected`, the generation the caller read as the latest, is given) and make the kernel hold it:
    a running daemon (`ask`) is asked to converge now, which it does as one atomic batch; with none, this
    process converges `kernel` itself (a full read of the kernel first). A daemon's refusal is raised with
    its own kind (a `ConflictError` stays one), prefixed with the generation it concerns."""
    policy = _checked(document, parsed, source=source, netns=kernel.netns, read_ports=read_ports)
    generation = policies.put_policy(document, source=source, expected=expected)
    # The version stored is named: the daemon then answers what applying it changed, even when its
    # reconcile loop (woken by the store's change feed) applied it first.
    reply = ask({"op": "reconcile", "policy": f"gen:{generation}"}) if ask is not None else None
    if reply is not None:
        if not reply.get("ok"):
            # (a daemon from before error kinds said only whether it was a conflict)
            default = ConflictError if reply.get("conflict") else KernelError
            raise prefixed(
                from_wire(reply, default=default), f"the daemon could not apply generation {generation}: "
            )
        ms = reply.get("ms")
        return Applied(
            generation=generation,
            by_daemon=True,
            summary=dict(reply.get("summary") or {}),
            ms=float(ms) if isinstance(ms, int | float) else None,
            vms=len(policy.vms),
            rules=len(policy.rules),
        )
    _, result = kernel.converge(full=True)
    if result is None:
        raise BugError("converge returned no result right after storing a policy")
    return Applied(
        generation=generation,
        by_daemon=False,
        summary=dict(result.summary),
        ms=result.seconds * 1000,
        vms=len(policy.vms),
        rules=len(policy.rules),
    )


def show_policy(policies: PolicyRepository, generation: int | None = None) -> StoredPolicy:
    """One stored generation (the latest when `generation` is None); `NotFoundError` saying what exists."""
    stored = policies.get_policy(generation)
    if stored is not None:
        return stored
    latest = policies.latest_generation()
    if generation is not None and latest:
        raise NotFoundError(f"--generation: there is no generation {generation} (the latest is {latest})")
    raise NotFoundError("no policy stored yet: run `hyperfence policy apply FILE`")


def _checked(
    document: Any, parsed: Policy | None, *, source: str, netns: str | None, read_ports: PortReader
) -> Policy:
    """The valid policy in `document` (`parsed`, when the caller parsed it) that leaves no network device on
    its bridges undeclared."""
    policy = parsed if parsed is not None else parse_policy(document, source=source)
    check_devices(netns, policy, read_ports)
    return policy
