"""What the use cases need from the world beyond the repository ports (`hyperfence/ports.py`).

Kernel   the compiled policy and the kernel that holds it: `reconcile/engine.py:Engine` is one
Ask      one request to a running daemon's control socket (`daemon.py:request`): its reply, or None
         when no daemon listens
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hyperfence.adapters.kernel_probe import NftContext
from hyperfence.model.kernel import Capabilities, Flavour
from hyperfence.model.lease import Lease
from hyperfence.model.overlay import Merged
from hyperfence.model.policy import AddressRange, Policy
from hyperfence.reconcile.engine import Compiled
from hyperfence.reconcile.firewall import ConvergeResult
from hyperfence.ruleset.readback import Actual

Ask = Callable[[dict[str, Any]], dict[str, Any] | None]


class KernelNft(NftContext, Protocol):
    """The nftables context in the bridges' namespace: dry runs (`check`), listings with counters."""

    def list(self, what: dict[str, Any]) -> list[Any]: ...


class FirewallReader(Protocol):
    def read(self) -> Actual:
        """What hyperfence's tables hold now."""
        ...


class Kernel(Protocol):
    """The compiled policy and the kernel that holds it (`Engine`)."""

    @property
    def netns(self) -> str | None:
        """The bridges' network namespace (None: this process's)."""
        ...

    @property
    def flavour(self) -> Flavour:
        """The data plane built (probed on first need)."""
        ...

    @property
    def nft(self) -> KernelNft: ...

    @property
    def firewall(self) -> FirewallReader: ...

    def compiled(self) -> Compiled | None:
        """The current policy compiled with every input the engine knows (None: no policy yet)."""
        ...

    def known_host_addresses(self) -> tuple[AddressRange, ...]: ...

    def ports_for(self, policy: Policy) -> frozenset[tuple[str, str]] | None:
        """The bridges' ports (bridge, port) that `policy`'s VMs get chains by (`policy/local.py`); None:
        every declared VM gets chains."""
        ...

    @property
    def discovered(self) -> tuple[dict[str, Any], ...]:
        """The VMs last discovered from the hypervisor, as `vms` items (the stored inventory)."""
        ...

    @property
    def leases(self) -> tuple[Lease, ...]:
        """The addresses learned from DHCP leases."""
        ...

    def merged_overlays(self) -> Merged:
        """Every producer's overlays, merged as of now."""
        ...

    def use_flavour(self, caps: Capabilities) -> bool: ...

    def converge(
        self, *, full: bool = False, cause: str | None = None
    ) -> tuple[Compiled | None, ConvergeResult | None]:
        """Make the kernel hold the current policy (one atomic batch)."""
        ...
