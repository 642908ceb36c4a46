"""The VMs whose chains this host holds (pure): those whose port is on one of its managed bridges.

nf_tables validates a whole table at the commit of any rule with a verdict or a set lookup, so a change's
kernel time grows with the chains the table holds (docs/design.md, Known limits). A VM whose port is not on
this host's bridges sends and receives nothing here: its chains would be dead weight. Its addresses stay in
the address sets of the rules that name it (they come from the whole policy's resolve), so the VMs that are
here still filter what they exchange with it; only its own chains and its entries in the port maps are left
out. A port that joins a bridge gets its chains at the converge the port watch then asks for; until then the
guard drops what it sends (an unknown port), as for any port hyperfence does not know yet (fail closed).

This is what the host agents of OpenStack and NSX do: a host programs the ports it has. It is what makes a
change's kernel cost follow the VMs of this host, not every VM the policy declares (bench/apply.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from hyperfence.errors import InvalidInputError
from hyperfence.model.policy import Vm
from hyperfence.policy.memo import Recent
from hyperfence.policy.resolve import Resolved

CHAINS_ENV = "HYPERFENCE_CHAINS"  # the setting (local, declared) for the CLI, the daemon, the lab, tests
CHAINS = ("local", "declared")


def parse_chains(text: str | None, *, field: str = "--chains") -> bool:
    """The chains setting: True for `local` (or nothing: the default), False for `declared` (every declared
    VM gets chains). InvalidInputError naming the field and the value for anything else."""
    value = (text or "local").strip().lower()
    if value not in CHAINS:
        raise InvalidInputError(
            f"{field}: {text!r} is not a chains setting; expected one of {', '.join(CHAINS)}"
        )
    return value == "local"


def with_local(resolved: Resolved, ports: Iterable[tuple[str, str]] | None) -> Resolved:
    """`resolved` with only the VMs whose port is one of `ports` (the managed bridges' ports as read from
    the kernel, (bridge, port) each; a port counts on any managed bridge, as the ruleset's dispatch does);
    all of them when `ports` is None (not read: compile every declared VM, as before). The VMs kept are the
    very objects of `resolved` (the compiler's cache keys on them), and the policy it holds declares only
    them (what the compiler's base chains depend on: a port that comes or goes changes them).

    The size of this host's ports, not of the policy: the VMs are found by port through a map kept while
    the policy's VMs are the same objects (a change of rules keeps them)."""
    if ports is None:
        return resolved
    present = {port for _, port in ports}  # (the ruleset dispatches by port name on every managed bridge)
    if len(resolved.vms) == len(resolved.policy.vms):  # (in the policy's order: resolve_policy)
        by_port = _positions(resolved.policy.vms)
        at = sorted(i for port in present for i in by_port.get(port, ()))
        vms = tuple(resolved.vms[i] for i in at)
    else:
        vms = tuple(vp for vp in resolved.vms if vp.vm.port in present)
    if len(vms) == len(resolved.vms):
        return resolved
    # (which VMs changed since the resolve's `base` no longer maps onto these: the compiler looks at each)
    policy = dataclasses.replace(resolved.policy, vms=tuple(vp.vm for vp in vms))
    return dataclasses.replace(resolved, policy=policy, vms=vms, base=None, changed=None)


# The last policy's VMs -> the positions of each port among them.
_BY_PORT: Recent[tuple[Vm, ...], dict[str, tuple[int, ...]]] = Recent(1)


def _positions(vms: tuple[Vm, ...]) -> dict[str, tuple[int, ...]]:
    """Port -> the positions of the VMs of `vms` with that port."""
    by_port = _BY_PORT.get(vms)
    if by_port is None:
        found: dict[str, list[int]] = {}
        for i, vm in enumerate(vms):
            found.setdefault(vm.port, []).append(i)
        by_port = {port: tuple(at) for port, at in found.items()}
        _BY_PORT.put(vms, by_port)
    return by_port
