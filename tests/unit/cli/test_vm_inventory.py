"""The CLI sees the VMs the daemon discovered in libvirt (the last known inventory in the store), exactly as
the daemon compiles them: `can`, `vm events`, `vm release` and `vm list` know them with no daemon running
(nothing here reaches the kernel: nothing is held, so nothing converges)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from hyperfence.cli.main import app
from hyperfence.model.kernel import Flavour
from hyperfence.reconcile.engine import Engine

runner = CliRunner()
LAB = {"name": "lab", "bridge": "br0", "subnet": "10.77.0.0/22", "gateway": "10.77.0.1"}


def discovered(name: str, ip: str, n: int) -> dict[str, object]:
    return {
        "name": name,
        "id": f"uuid-{name}",
        "network": "lab",
        "port": f"vnet{n}",
        "mac": f"52:54:00:00:00:0{n}",
        "ips": [ip],
        "labels": {},
    }


def daemon_was_here(state: Path) -> None:
    """What a `daemon --libvirt` leaves in the store: a policy naming no VM (they come from libvirt, one
    rule: web1 may ping web2) and the two VMs it read from libvirt, with an event of web2."""
    engine = Engine(
        netns=None, state_dir=str(state), read_addresses=lambda _ns: (), flavour=Flavour.BR_NETFILTER
    )
    try:
        rule = {"id": "echo", "from": "vm:web1", "to": "vm:web2", "protocol": "icmp"}
        doc = {"networks": [LAB], "vms": [], "rules": [rule], "settings": {"inventory": "libvirt"}}
        engine.store_policy(doc, source="test")
        engine.set_discovered((discovered("web1", "10.77.0.11", 1), discovered("web2", "10.77.0.12", 2)))
        engine.store.add_event("agent-hello", {"agent": "0.1"}, vm="uuid-web2")  # no domain name in it
    finally:
        engine.close()


def cli(state: Path, *args: str) -> tuple[int, str]:
    r = runner.invoke(app, ["--state-dir", str(state), "--flavour", "br_netfilter", *args])
    return r.exit_code, r.output


def test_can_answers_for_discovered_vms_as_the_daemon_compiles_them(tmp_path: Path) -> None:
    daemon_was_here(tmp_path)
    code, output = cli(tmp_path, "can", "10.77.0.11", "10.77.0.12", "--protocol", "icmp")
    assert code == 0 and "allowed by echo" in output, output
    code, output = cli(tmp_path, "can", "web2", "web1", "--protocol", "icmp")
    assert code == 1 and "denied" in output, output  # the rule is one way


def test_vm_events_and_release_take_a_discovered_vms_name(tmp_path: Path) -> None:
    daemon_was_here(tmp_path)
    code, output = cli(tmp_path, "vm", "events", "web2")
    assert code == 0 and "agent-hello" in output, output
    code, output = cli(tmp_path, "vm", "release", "web1")
    assert (code, output.strip()) == (0, "web1: nothing to release"), output
