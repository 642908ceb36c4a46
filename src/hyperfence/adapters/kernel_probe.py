"""Probe what the kernel of the bridges' namespace offers (model/kernel.py says why it matters), and put
br_netfilter's preconditions in place.

Bridge-family conntrack and reject are asked of the kernel itself: a dry-run batch (`nft --check`) with a
`ct state` rule, and one with a `reject` rule, in a bridge table that is never created (the kernel validates
the transaction and aborts it: nothing changes, no nftables event). On a kernel that has them as modules the
kernel loads them on that request. br_netfilter shows as `/proc/sys/net/bridge/` in the namespace.

The reject probe's chain hooks **prerouting**: `nft_reject_bridge` takes reject only in prerouting and input
chains (Debian's 6.1 kernel answers "Operation not supported" for forward, output and postrouting, seen in
the host-root guest, docs/hostroot.md), so a probe on the forward hook said "no bridge reject" on a kernel
that has it. A bridge-native reject must sit where the sender's frame enters (prerouting).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from hyperfence.errors import KernelError
from hyperfence.model.kernel import CALL_IPTABLES, Capabilities

T = TypeVar("T")

SYSCTL_PATH = "/proc/sys/" + CALL_IPTABLES.replace(".", "/")
PROBE_TABLE = "hyperfence_probe"  # never created: only ever in dry-run batches


class NftContext(Protocol):
    """What the probe needs of an nftables context in the bridges' namespace (adapters/nft.py `Nft`)."""

    def check(self, batch: dict[str, Any]) -> str | None: ...

    def in_netns(self, fn: Callable[[], T]) -> T: ...


def _dry_run(stmt: dict[str, Any], *, hook: str = "forward") -> dict[str, Any]:
    table = {"family": "bridge", "name": PROBE_TABLE}
    chain = {"family": "bridge", "table": PROBE_TABLE, "name": "probe"}
    hooked = {**chain, "type": "filter", "hook": hook, "prio": 0, "policy": "accept"}
    return {
        "nftables": [
            {"add": {"table": table}},
            {"add": {"chain": hooked}},
            {"add": {"rule": {"family": "bridge", "table": PROBE_TABLE, "chain": "probe", "expr": [stmt]}}},
        ]
    }


CT_ESTABLISHED = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established"]}}
REJECT = {"reject": None}
ACCEPT = {"accept": None}  # the control: a batch any kernel takes


def read_call_iptables(nft: NftContext) -> bool | None:
    """The sysctl in nft's namespace: None when br_netfilter is not there at all."""

    def read() -> bool | None:
        try:
            with open(SYSCTL_PATH, encoding="ascii") as f:
                return f.read().strip() == "1"
        except FileNotFoundError:
            return None

    return nft.in_netns(read)


def set_call_iptables(nft: NftContext) -> None:
    """Turn the sysctl on in nft's namespace. KernelError (with what to do) when it cannot be written."""

    def write() -> None:
        with open(SYSCTL_PATH, "w", encoding="ascii") as f:
            f.write("1\n")

    try:
        nft.in_netns(write)
    except OSError as e:
        raise KernelError(
            f"could not set {CALL_IPTABLES}=1 ({e.strerror}): run `sysctl -w {CALL_IPTABLES}=1` as root in "
            "the bridges' namespace"
        ) from None


def load_br_netfilter() -> str | None:
    """`modprobe br_netfilter` (the module is host-wide). None when it loaded, else why not."""
    try:
        done = subprocess.run(
            ["modprobe", "br_netfilter"], check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit status {done.returncode}")


def probe(nft: NftContext) -> Capabilities:
    control = nft.check(_dry_run(ACCEPT))
    if control is not None:  # then a refused ct or reject rule would say nothing about the kernel
        raise KernelError(f"the kernel refused the probe's control batch (nothing was changed): {control}")
    call = read_call_iptables(nft)
    return Capabilities(
        bridge_conntrack=nft.check(_dry_run(CT_ESTABLISHED)) is None,
        bridge_reject=nft.check(_dry_run(REJECT, hook="prerouting")) is None,
        br_netfilter=call is not None,
        call_iptables=call,
    )
