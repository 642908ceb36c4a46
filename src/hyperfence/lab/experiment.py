"""The papers' experiment (004 §VII, Figs. 5-6), step by step, on a lab with real packets.

`run_experiment` drives a `LabSession` through the steps and returns what it observed next to what the
paper (and hyperfence's policy) says should happen. The demo narrates it; a test asserts every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hyperfence.lab.session import LabSession


@dataclass(frozen=True)
class Observation:
    step: str
    check: str
    expected: str
    got: str

    @property
    def ok(self) -> bool:
        return self.expected == self.got


def _blocked(result: str) -> str:
    """A connect that times out or finds no ARP answer (host unreachable) was blocked."""
    return "blocked" if result in ("TIMEOUT", "UNREACHABLE") else result


def _yes(b: bool) -> str:
    return "yes" if b else "no"


DHCP_RULE: dict[str, Any] = {"id": "dhcp", "from": "vms", "to": "host", "services": ["dhcp"]}


def steps() -> list[tuple[str, list[dict[str, Any]]]]:
    """(title, rules) of each step; each step's policy replaces the previous one."""
    allow_icmp = {"id": "icmp-vm1-vm2", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp", "log": True}
    deny_icmp = {**allow_icmp, "id": "icmp-vm1-vm2-denied", "action": "deny"}
    web = {
        "id": "web-from-vm1",
        "from": "vm:vm1",
        "to": "vm:vm2",
        "protocol": "tcp",
        "ports": [80],
        "log": True,
    }
    web_vm3_out = {"id": "vm3-web-out", "from": "vm:vm3", "to": "any", "protocol": "tcp", "ports": [80]}
    outside_https = {
        "id": "https-from-outside",
        "from": "outside",
        "to": "vm:vm2",
        "protocol": "tcp",
        "ports": [443],
    }
    return [
        ("1. Every VM protected, no rules: everything is blocked", []),
        ("2. Allow DHCP from the host: VMs get a lease", [DHCP_RULE]),
        ("3. Allow ICMP vm1 -> vm2 (paper Fig. 5)", [allow_icmp]),
        ("4. Deny it (paper Fig. 6)", [deny_icmp]),
        ("5. Allow TCP 80 to vm2 from vm1 only", [web, web_vm3_out]),
        ("6. Outside users reach only what is allowed", [web, web_vm3_out, outside_https]),
    ]


def run_experiment(s: LabSession, say: Callable[[str], None] = lambda _: None) -> list[Observation]:
    obs: list[Observation] = []

    def check(step: str, what: str, expected: str, got: str) -> None:
        o = Observation(step, what, expected, got)
        obs.append(o)
        say(f"   {'✔' if o.ok else '✘'} {what}: {got}" + ("" if o.ok else f"   (expected {expected})"))

    s.serve("vm2", tcp=[80, 443])
    s.serve("outside", tcp=[8080])
    plan = steps()
    for title, rules in plan:
        say(f"\n{title}")
        result = s.apply(rules)
        say(f"   applied: {result.summary or 'no change'} in {result.seconds * 1000:.1f} ms")
        n = title.split(".")[0]
        if n == "1":
            check(n, "vm1 asks for a DHCP lease", "no", _yes(s.dhcp("vm1")))
            check(n, "vm1 pings vm2", "0 replies", f"{s.ping('vm1', 'vm2')[0]} replies")
            check(n, "vm1 pings its gateway", "0 replies", f"{s.ping('vm1', 'host')[0]} replies")
            check(n, "vm3 connects to vm2:80", "blocked", _blocked(s.tcp("vm3", "vm2", 80)))
        elif n == "2":
            check(n, "vm1 asks for a DHCP lease", "yes", _yes(s.dhcp("vm1")))
            check(n, "vm1 pings vm2", "0 replies", f"{s.ping('vm1', 'vm2')[0]} replies")
        elif n == "3":
            check(n, "vm1 pings vm2", "3 replies", f"{s.ping('vm1', 'vm2', count=3)[0]} replies")
            check(
                n, "vm2 pings vm1 (not allowed that way)", "0 replies", f"{s.ping('vm2', 'vm1')[0]} replies"
            )
            check(n, "vm3 pings vm2", "0 replies", f"{s.ping('vm3', 'vm2')[0]} replies")
        elif n == "4":
            check(n, "vm1 pings vm2", "0 replies", f"{s.ping('vm1', 'vm2')[0]} replies")
        elif n == "5":
            check(n, "vm1 connects to vm2:80", "OK", s.tcp("vm1", "vm2", 80))
            check(n, "vm3 connects to vm2:80", "blocked", _blocked(s.tcp("vm3", "vm2", 80)))
            check(n, "vm1 connects to vm2:443", "blocked", _blocked(s.tcp("vm1", "vm2", 443)))
        elif n == "6":
            check(n, "outside connects to vm2:443", "OK", s.tcp("outside", "vm2", 443))
            check(n, "outside connects to vm2:80", "blocked", _blocked(s.tcp("outside", "vm2", 80)))
            check(n, "outside pings vm1", "0 replies", f"{s.ping('outside', 'vm1')[0]} replies")
            check(n, "vm1 reaches the outside", "blocked", _blocked(s.tcp("vm1", "outside", 8080)))
    return obs
