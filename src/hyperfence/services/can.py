"""The what-if use case: would the compiled policy let one endpoint open a flow to another?"""

from __future__ import annotations

from collections.abc import Callable

from hyperfence.errors import InvalidInputError, NotFoundError
from hyperfence.model.kernel import Flavour
from hyperfence.policy.whatif import Answer, Flow, can
from hyperfence.services.ports import Kernel


def check_flow(kernel: Kernel, src: str, dst: str, flow: Flow, *, flavour: Callable[[], Flavour]) -> Answer:
    """The verdict for `flow` from `src` to `dst` (VM names or ids, or IPv4 addresses) as the current policy
    compiles it (with the discovered VMs, learned addresses and every producer's overlays), on the data
    plane `flavour()` names (asked only once there is a policy), with the deciding rule. `NotFoundError`
    without a policy, or for a VM that has no address yet; `InvalidInputError` for an endpoint that is
    neither a VM nor an address."""
    compiled = kernel.compiled()
    if compiled is None:
        raise NotFoundError("no policy stored yet: run `hyperfence policy apply FILE`")
    for name in (src, dst):  # a VM that learns its addresses has none before its first lease
        vm = next((v for v in compiled.policy.vms if name in (v.name, v.id)), None)
        if vm is not None and not vm.ips:
            raise NotFoundError(
                f"VM {vm.name} has no address yet: it learns its addresses from DHCP "
                "(`hyperfence vm list` shows them once it has a lease)"
            )
    try:
        return can(compiled.resolved, src, dst, flow, flavour=flavour())
    except ValueError:
        raise InvalidInputError(f"{src!r} or {dst!r} is neither a VM name nor an IPv4 address") from None
