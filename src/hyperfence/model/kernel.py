"""What the kernel of the bridges' namespace offers the data plane, and what the data plane in use needs.

hyperfence's stateful filtering (replies of an allowed flow pass; everything else is judged as new) needs
connection tracking for bridged frames. This kernel's bridge family has none, so today's data plane (the
`br_netfilter` flavour) has br_netfilter hand bridged IPv4 to the inet hooks, where conntrack runs and an inet
chain marks established flows for the bridge chains. That needs the `br_netfilter` module and the
per-namespace sysctl `net.bridge.bridge-nf-call-iptables=1`: without either, every reply is judged as a new
flow and dropped, and allowed connections between VMs time out. Kernels with `nf_conntrack_bridge` and
`nft_reject_bridge` (Debian's, as modules) could filter in the bridge family alone (`bridge_native`).
"""

from __future__ import annotations

from dataclasses import dataclass

CALL_IPTABLES = "net.bridge.bridge-nf-call-iptables"
FLAVOUR = "br_netfilter"  # the data plane hyperfence builds today


@dataclass(frozen=True)
class Capabilities:
    bridge_conntrack: bool  # `ct state` in bridge-family chains (nf_conntrack_bridge)
    bridge_reject: bool  # `reject` in bridge-family chains (nft_reject_bridge)
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
            "flavour": FLAVOUR,
        }


def problems(caps: Capabilities, netns: str | None) -> list[str]:
    """What breaks the stateful path of the flavour in use, each with what to do. [] when it holds."""
    where = f"namespace {netns}" if netns else "the host's namespace"
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


def describe(caps: Capabilities) -> str:
    """One line for people: what the kernel offers and which data plane runs."""

    def yes(flag: bool | None) -> str:
        return "yes" if flag else "no"

    call = "-" if caps.call_iptables is None else ("1" if caps.call_iptables else "0")
    return (
        f"data plane {FLAVOUR}; kernel: bridge conntrack {yes(caps.bridge_conntrack)}, bridge reject "
        f"{yes(caps.bridge_reject)}, br_netfilter {yes(caps.br_netfilter)} ({CALL_IPTABLES} {call})"
    )
