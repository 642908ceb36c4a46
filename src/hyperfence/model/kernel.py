"""What the kernel of the bridges' namespace offers the data plane, which data plane ("flavour") runs, and
what that flavour needs.

hyperfence's stateful filtering (replies of an allowed flow pass; everything else is judged as new) needs
connection tracking for bridged frames, and a reject rule needs a way to answer the sender. Two flavours
build the same policy:

* `bridge_native`: the kernel has `nf_conntrack_bridge` and `nft_reject_bridge` (Debian's stock kernel, as
  modules): `ct state` and `reject` run in the bridge family itself. Nothing else is needed.
* `br_netfilter`: the bridge family has neither (this machine's kernel). br_netfilter hands bridged IPv4 to
  the inet hooks, where conntrack runs and an inet chain marks established flows for the bridge chains; the
  reject answers come from inet chains. That needs the `br_netfilter` module and the per-namespace sysctl
  `net.bridge.bridge-nf-call-iptables=1`: without either, every reply is judged as a new flow and dropped,
  and allowed connections between VMs time out.

`choose` picks bridge_native wherever the kernel offers it, br_netfilter elsewhere; a setting can force one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hyperfence.errors import InvalidInputError

CALL_IPTABLES = "net.bridge.bridge-nf-call-iptables"
FLAVOUR_ENV = "HYPERFENCE_FLAVOUR"  # the setting (auto, br_netfilter, bridge_native) for the CLI, lab, tests


class Flavour(StrEnum):
    BR_NETFILTER = "br_netfilter"
    BRIDGE_NATIVE = "bridge_native"


AUTO = "auto"


def parse_flavour(text: str | None, *, field: str = "flavour") -> Flavour | None:
    """The flavour setting: None for `auto` (or nothing), else the forced flavour. InvalidInputError naming
    the field and the value for anything else."""
    value = (text or "").strip().lower().replace("-", "_")
    if value in ("", AUTO):
        return None
    try:
        return Flavour(value)
    except ValueError:
        choices = ", ".join([AUTO, *(f.value for f in Flavour)])
        raise InvalidInputError(
            f"{field}: {text!r} is not a data plane flavour; expected one of {choices}"
        ) from None


@dataclass(frozen=True)
class Capabilities:
    bridge_conntrack: bool  # `ct state` in bridge-family chains (nf_conntrack_bridge)
    bridge_reject: bool  # `reject` in bridge-family prerouting chains (nft_reject_bridge)
    br_netfilter: bool  # bridged IPv4 can be handed to the inet hooks (the module is there)
    call_iptables: bool | None  # CALL_IPTABLES in the namespace; None without br_netfilter

    @property
    def bridge_native(self) -> bool:
        """Could the bridge family alone do stateful filtering and reject here?"""
        return self.bridge_conntrack and self.bridge_reject

    def as_dict(self) -> dict[str, object]:
        return {
            "bridge_conntrack": self.bridge_conntrack,
            "bridge_reject": self.bridge_reject,
            "br_netfilter": self.br_netfilter,
            "bridge_nf_call_iptables": self.call_iptables,
        }


def choose(caps: Capabilities, forced: Flavour | None) -> Flavour:
    """The flavour to build: the forced one, else bridge_native where the kernel offers it."""
    if forced is not None:
        return forced
    return Flavour.BRIDGE_NATIVE if caps.bridge_native else Flavour.BR_NETFILTER


def problems(caps: Capabilities, netns: str | None, flavour: Flavour = Flavour.BR_NETFILTER) -> list[str]:
    """What breaks the stateful path of `flavour`, each with what to do. [] when it holds."""
    where = f"namespace {netns}" if netns else "the host's namespace"
    if flavour is Flavour.BRIDGE_NATIVE:
        missing = [
            name
            for name, have in (
                ("nf_conntrack_bridge", caps.bridge_conntrack),
                ("nft_reject_bridge", caps.bridge_reject),
            )
            if not have
        ]
        if not missing:
            return []
        return [
            f"the bridge_native data plane needs {' and '.join(missing)} and the kernel has no "
            f"{'bridge conntrack' if not caps.bridge_conntrack else 'bridge reject'} ({where}): run "
            f"`modprobe {' '.join(missing)}`, or let the daemon choose (auto) or force br_netfilter "
            f"({FLAVOUR_ENV}=br_netfilter / --flavour br_netfilter)"
        ]
    if not caps.br_netfilter:
        return [
            f"br_netfilter is not loaded ({where}): bridged traffic never reaches conntrack, so the replies of "
            "allowed flows are judged as new and dropped. Run `modprobe br_netfilter` and make it permanent "
            "(`echo br_netfilter > /etc/modules-load.d/hyperfence.conf`); the daemon loads it when it can"
        ]
    if caps.call_iptables is not True:
        return [
            f"{CALL_IPTABLES} is 0 ({where}): bridged IPv4 skips conntrack, so the replies of allowed flows "
            f"are judged as new and dropped. Run `sysctl -w {CALL_IPTABLES}=1` (the daemon sets it and "
            "restores it when something turns it off; see docs/host.md)"
        ]
    return []


def describe(caps: Capabilities, flavour: Flavour = Flavour.BR_NETFILTER) -> str:
    """One line for people: which data plane runs and what the kernel offers."""

    def yes(flag: bool | None) -> str:
        return "yes" if flag else "no"

    call = "-" if caps.call_iptables is None else ("1" if caps.call_iptables else "0")
    return (
        f"data plane {flavour.value}; kernel: bridge conntrack {yes(caps.bridge_conntrack)}, bridge reject "
        f"{yes(caps.bridge_reject)}, br_netfilter {yes(caps.br_netfilter)} ({CALL_IPTABLES} {call})"
    )
