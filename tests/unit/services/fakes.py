"""A stand-in for the kernel side (`services.ports.Kernel`, which `Engine` implements) over the in-memory
store of `hyperfence.testing` and a model of nftables (`tests/unit/ruleset/fake_kernel.py`): the policy
is compiled from the store's latest generation as the engine does, and a converge plans against the model
and applies to it."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from hyperfence.model.kernel import Capabilities, Flavour
from hyperfence.model.lease import Lease
from hyperfence.model.overlay import Merged, Overlay, merge_overlays
from hyperfence.model.policy import AddressRange, Policy
from hyperfence.model.ports import BridgePort
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.reconcile.engine import Compiled
from hyperfence.reconcile.firewall import ConvergeResult
from hyperfence.ruleset.compile import compile_ruleset
from hyperfence.ruleset.ir import Ruleset
from hyperfence.ruleset.plan import plan_changes
from hyperfence.ruleset.readback import Actual
from hyperfence.testing import FakeStore
from tests.unit.ruleset.fake_kernel import FakeKernel

T = TypeVar("T")


class FakeNft:
    """Dry runs are recorded and answered with `refuse` (None: accepted); listings come from `listing`."""

    def __init__(self) -> None:
        self.model = FakeKernel(Ruleset((), (), (), ()), {})
        self.refuse: str | None = None
        self.checked: list[dict[str, Any]] = []
        self.listing: list[Any] = []

    def check(self, batch: dict[str, Any]) -> str | None:
        self.checked.append(batch)
        return self.refuse

    def in_netns(self, fn: Callable[[], T]) -> T:
        return fn()

    def list(self, what: dict[str, Any]) -> list[Any]:
        table = what["table"]
        return [
            o
            for o in self.listing
            if "rule" in o and (o["rule"]["family"], o["rule"]["table"]) == (table["family"], table["name"])
        ]


class FakeFirewall:
    """What the kernel holds: after a converge, as `reconcile/firewall.py` keeps it once verified, the
    desired ruleset itself with the model's handles (a test changes `actual` to make drift)."""

    def __init__(self, nft: FakeNft) -> None:
        self.nft = nft
        self.actual = Actual.empty()

    def read(self) -> Actual:
        return self.actual


class FakeEngine:
    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store or FakeStore()
        self.netns: str | None = None
        self.flavour = Flavour.BR_NETFILTER
        self.nft = FakeNft()
        self.firewall = FakeFirewall(self.nft)
        self.converges: list[bool] = []  # `full` of each converge
        self.caps: list[Capabilities] = []
        self.discovered: tuple[dict[str, Any], ...] = ()
        self.leases: tuple[Lease, ...] = ()
        self.overlays: tuple[Overlay, ...] = ()

    def merged_overlays(self) -> Merged:
        return merge_overlays(self.overlays, 0.0)

    def compiled(self) -> Compiled | None:
        stored = self.store.get_policy()
        if stored is None:
            return None
        policy = parse_policy(stored.document, source=stored.source)
        resolved = resolve_policy(policy)
        ruleset = compile_ruleset(resolved, flavour=self.flavour)
        return Compiled(f"gen:{stored.generation}", policy, resolved, ruleset, flavour=self.flavour)

    def known_host_addresses(self) -> tuple[AddressRange, ...]:
        return ()

    def ports_for(self, policy: Policy) -> frozenset[tuple[str, str]] | None:
        return None  # every declared VM gets chains

    def use_flavour(self, caps: Capabilities) -> bool:
        self.caps.append(caps)
        return False

    def converge(
        self, *, full: bool = False, cause: str | None = None
    ) -> tuple[Compiled | None, ConvergeResult | None]:
        self.converges.append(full)
        compiled = self.compiled()
        if compiled is None:
            return None, None
        t0 = time.monotonic()
        plan = plan_changes(compiled.ruleset, self.firewall.read())
        self.nft.model.apply(plan.commands)
        self.firewall.actual = Actual(compiled.ruleset, self.nft.model.handles())
        return compiled, ConvergeResult(
            changed=not plan.empty,
            summary=plan.summary,
            commands=len(plan.commands),
            seconds=time.monotonic() - t0,
        )


def ports_reader(*found: BridgePort) -> Callable[..., tuple[BridgePort, ...]]:
    """A bridge port reader (`reconcile.engine.PortReader`) that finds `found`, less the known ports (or
    those by their name alone: `list_known`)."""

    def read(
        netns: str | None, bridges: Iterable[str], *, known: Collection[str] = (), list_known: bool = False
    ) -> tuple[BridgePort, ...]:
        wanted = set(bridges)
        return tuple(
            (BridgePort(p.bridge, p.name) if p.name in known else p)
            for p in found
            if p.bridge in wanted and (list_known or p.name not in known)
        )

    return read


def no_ports_read(
    netns: str | None, bridges: Iterable[str], *, known: Collection[str] = (), list_known: bool = False
) -> tuple[BridgePort, ...]:
    raise AssertionError("the bridges' ports were read")
