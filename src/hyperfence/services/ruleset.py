"""The ruleset's use cases: what hyperfence wants in the kernel, what is there, how they differ, and the
rules' counters.

`desired_state` is the one place these use cases take the desired state from: whatever more the desired
state comes to include (the stored inventory of discovered VMs, say) is added there, once, for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hyperfence.adapters import kernel_probe
from hyperfence.errors import HyperfenceError, KernelError, NotFoundError
from hyperfence.model.kernel import describe, problems
from hyperfence.reconcile.engine import Compiled
from hyperfence.reconcile.firewall import describe_drift
from hyperfence.ruleset.compile import TABLES, vm_sid
from hyperfence.ruleset.ir import Ruleset, TableId
from hyperfence.ruleset.plan import plan_changes
from hyperfence.ruleset.readback import RuleKey, rule_counters
from hyperfence.services.ports import Kernel

NO_POLICY = "no policy stored yet: run `hyperfence policy apply FILE`"


def desired_state(kernel: Kernel) -> Compiled | None:
    """The policy compiled with every input the kernel side knows (None: no policy yet)."""
    return kernel.compiled()


def _required(kernel: Kernel) -> Compiled:
    compiled = desired_state(kernel)
    if compiled is None:
        raise NotFoundError(NO_POLICY)
    return compiled


@dataclass(frozen=True)
class KernelView:
    """What the kernel offers (`description`, one line) and why the stateful path cannot work (`broken`)."""

    description: str
    broken: tuple[str, ...]


def probe_kernel(kernel: Kernel) -> KernelView:
    """Probe the bridges' namespace and decide the kernel side's data plane from it; changes nothing in the
    kernel. `KernelError` when it cannot be probed."""
    try:
        caps = kernel_probe.probe(kernel.nft)
    except HyperfenceError as e:
        raise KernelError(f"could not probe the kernel: {e}") from None
    kernel.use_flavour(caps)
    return KernelView(describe(caps, kernel.flavour), tuple(problems(caps, kernel.netns, kernel.flavour)))


@dataclass(frozen=True)
class RulesetShown:
    kernel: KernelView
    desired: bool  # `ruleset` is what the policy compiles to; else what the kernel holds
    ruleset: Ruleset


def show_ruleset(kernel: Kernel, *, desired: bool) -> RulesetShown:
    """The desired ruleset (`desired`) or the kernel's, with what the kernel offers."""
    view = probe_kernel(kernel)
    ruleset = _required(kernel).ruleset if desired else kernel.firewall.read().ruleset
    return RulesetShown(view, desired, ruleset)


@dataclass(frozen=True)
class RulesetDiff:
    """How the kernel differs from the desired ruleset: the broken preconditions (the rules can be right and
    still not work), the differences as sentences, and the batch a reconcile would send."""

    broken: tuple[str, ...]
    differences: tuple[str, ...]
    commands: int
    summary: dict[str, int]

    @property
    def in_sync(self) -> bool:
        return not self.broken and not self.differences and not self.commands


def diff_ruleset(kernel: Kernel) -> RulesetDiff:
    broken = probe_kernel(kernel).broken  # also decides the flavour the desired state is compiled for
    compiled = _required(kernel)
    actual = kernel.firewall.read()
    plan = plan_changes(compiled.ruleset, actual)
    return RulesetDiff(
        broken=broken,
        differences=tuple(describe_drift(compiled.ruleset, actual.ruleset)),
        commands=len(plan.commands),
        summary=dict(plan.summary),
    )


def ruleset_stats(kernel: Kernel, *, by_vm: bool) -> list[dict[str, Any]]:
    """Packet and byte counters per policy rule (and VM, `by_vm`), read from the kernel (`stats_rows`)."""
    compiled = desired_state(kernel)
    sid_names = {} if compiled is None else {vm_sid(v.id): v.name for v in compiled.policy.vms}
    objs: list[Any] = []
    for t in TABLES:
        objs.extend(kernel.nft.list({"table": {"family": t.family, "name": t.name}}))
    return stats_rows(rule_counters(objs), sid_names, by_vm=by_vm)


def stats_rows(
    counters: dict[RuleKey, tuple[int, int]], sid_names: dict[str, str], *, by_vm: bool
) -> list[dict[str, Any]]:
    """Aggregate nft rule counters by policy rule (and VM): `rule:web#1` and `rule:web#2` count as `web`.
    The bridge table's decisions, and the connection caps' drops (`sys:ct-cap`: inet table, and bridge table
    under bridge_native)."""
    agg: dict[tuple[str, str, str], list[int]] = {}
    for (table, chain, comment), (packets, nbytes) in counters.items():
        if comment.endswith(":log"):
            continue
        sid, _, suffix = chain.partition("_")
        if table in (TableId("inet", "hyperfence"), TableId("bridge", "hyperfence")) and suffix == "cap_drop":
            direction = "both"  # the connection cap counts what the VM opens and what is opened to it
        elif table == TableId("bridge", "hyperfence"):
            direction = {"out": "egress", "in": "ingress", "guard": "guard"}.get(suffix, chain)
        else:
            continue
        vm = sid_names.get(sid, "-") if suffix else "-"
        rule = comment.removeprefix("rule:").split("#", 1)[0] if comment.startswith("rule:") else comment
        key = (rule, vm if by_vm else "", direction)
        acc = agg.setdefault(key, [0, 0])
        acc[0] += packets
        acc[1] += nbytes
    return [
        {"rule": k[0], "vm": k[1], "direction": k[2], "packets": v[0], "bytes": v[1]}
        for k, v in sorted(agg.items())
    ]
