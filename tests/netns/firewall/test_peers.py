"""Which addresses a rule's peers cover, against the real kernel, compared with `hyperfence can`: the host's
own addresses (`host` vs `outside`), DHCP's servers, and addresses no declared VM holds (unknown ports).

Every test asks both the kernel (real sockets in the lab's namespaces) and `hyperfence can` (the CLI, which
reads the host's addresses from the lab's host namespace as the daemon does) and checks that they agree."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from hyperfence.lab.session import LabSession
from tests.netns.firewall.daemon_process import start_daemon

pytestmark = pytest.mark.kernel

UNANSWERED = ("TIMEOUT", "UNREACHABLE")


def hf(lab: LabSession) -> list[str]:
    return [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]


def can(lab: LabSession, src: str, dst: str, *flow: str) -> tuple[bool, str]:
    """`hyperfence can SRC DST FLOW...` on the lab: (allowed, the answer's text)."""
    r = subprocess.run([*hf(lab), "can", src, dst, *flow], capture_output=True, check=False, timeout=60)
    assert r.returncode in (0, 1), r.stderr.decode()
    return r.returncode == 0, r.stdout.decode()


def udp_from_port(lab: LabSession, vm: str, sport: int, dst: str, dport: int, *, timeout: float = 1.5) -> str:
    """A datagram from `vm`'s source port `sport` (a DHCP client's 68) and the responder's answer: OK or
    TIMEOUT (or the error). From 68 it is what a client renewing its lease sends, a DHCPREQUEST naming the
    VM's own MAC as chaddr (the guard drops a DHCP request naming any other: the chaddr guard)."""
    payload = "b'hi'"
    if sport == 68:
        payload = "bytes([1, 1, 6, 0]) + bytes(24) + mac + bytes(10 + 192) + bytes([99, 130, 83, 99, 53, 1, 3, 255])"
    code = (
        "import socket\n"
        "mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {sport})); s.settimeout({timeout})\n"
        f"s.connect(({dst!r}, {dport}))\n"
        f"try:\n    s.send({payload}); print('OK' if s.recv(16).startswith(b'OK') else 'NODATA')\n"
        "except TimeoutError:\n    print('TIMEOUT')\n"
        "except OSError as e:\n    print('ERR', e.errno)\n"
    )
    r = lab.run(vm, [sys.executable, "-c", code], timeout=timeout + 15)
    return r.stdout.decode().strip() or r.stderr.decode()


def test_outside_does_not_cover_the_hosts_uplink_address_and_host_does(lab: LabSession) -> None:
    """The host's address on its uplink (10.78.0.1) is the host's: `outside` does not reach it, `host`
    does, and `can` says the same."""
    uplink, outside = str(lab.plan.uplink_ip), str(lab.plan.outside_ip)
    lab.serve("host", tcp=[22])
    lab.serve("outside", tcp=[22])
    lab.apply(
        [
            {"id": "out-ssh", "from": "vm:vm1", "to": "outside", "services": ["tcp/22"]},
            {"id": "host-ssh", "from": "vm:vm2", "to": "host", "services": ["tcp/22"]},
        ]
    )
    assert lab.tcp("vm1", outside, 22) == "OK"  # the control: `outside` reaches the outside
    assert lab.tcp("vm1", uplink, 22) in UNANSWERED  # ... and not the host's sshd on its uplink address
    assert lab.tcp("vm2", uplink, 22) == "OK"  # `host` covers every address of the host
    assert lab.tcp("vm2", "host", 22) == "OK"  # (its gateway address too)
    assert lab.tcp("vm2", outside, 22) in UNANSWERED
    allowed, text = can(lab, "vm1", uplink, "--port", "22/tcp")
    assert not allowed and "vm1 egress: deny by sys:default-deny" in text, text
    assert "the host's" in text, text  # the answer says whose address it is
    allowed, text = can(lab, "vm2", uplink, "--port", "22/tcp")
    assert allowed and "host-ssh" in text, text
    assert can(lab, "vm1", outside, "--port", "22/tcp")[0]


def _wait_for(what: str, check: Any, *, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


def test_the_daemon_learns_a_new_host_address_at_once(lab: LabSession) -> None:
    """An address added to the host later (here on its loopback) is the host's from then on: the daemon sees
    the kernel's address event and converges (its periodic resync is an hour away), so `outside` stops
    reaching it and `host` starts to; removing it takes it out of `host` again."""
    extra = "192.0.2.1"
    lab.serve("host", tcp=[22])
    lab.apply(
        [
            {"id": "out-ssh", "from": "vm:vm1", "to": "outside", "services": ["tcp/22"]},
            {"id": "host-ssh", "from": "vm:vm2", "to": "host", "services": ["tcp/22"]},
        ]
    )
    daemon, _ = start_daemon(lab)
    try:
        lab.run("host", ["ip", "addr", "add", f"{extra}/32", "dev", "lo"]).check_returncode()
        _wait_for("vm2 reaches the new host address", lambda: lab.tcp("vm2", extra, 22) == "OK")
        outcome = lab.tcp("vm1", extra, 22)
        assert outcome in UNANSWERED, outcome
        assert not can(lab, "vm1", extra, "--port", "22/tcp")[0]
        lab.run("host", ["ip", "addr", "del", f"{extra}/32", "dev", "lo"]).check_returncode()
        _wait_for("the address leaves `host`", lambda: not can(lab, "vm2", extra, "--port", "22/tcp")[0])
        listed = lab.run("host", ["nft", "list", "table", "bridge", "hyperfence"]).stdout.decode()
        _wait_for(
            "the kernel's sets forget it",
            lambda: (
                extra not in lab.run("host", ["nft", "list", "table", "bridge", "hyperfence"]).stdout.decode()
            ),
        )
        assert "10.78.0.1" in listed  # the uplink address stays in `host`
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_dhcp_talks_only_with_the_servers_the_rule_names(lab: LabSession) -> None:
    """`dhcp` to `host`: a lease from the host's server works, but UDP 68 -> 67 to another address (a
    server in the outside network) is dropped, so no answer comes back from it."""
    outside = str(lab.plan.outside_ip)
    lab.serve("outside", udp=[67])
    lab.apply(
        [
            {"id": "dhcp", "from": "vms", "to": "host", "services": ["dhcp"]},
            {"id": "ping", "from": "vms", "to": "host", "services": ["icmp"]},  # ARP with the gateway
        ]
    )
    assert lab.dhcp("vm1")  # the lease from the host's dnsmasq
    assert udp_from_port(lab, "vm1", 68, outside, 67) == "TIMEOUT"
    allowed, text = can(lab, "vm1", outside, "--port", "67/udp")
    assert not allowed, text
    assert can(lab, "vm1", "255.255.255.255", "--port", "67/udp")[0]  # the broadcast request
    # the control: a rule that does name that server lets the same exchange through
    lab.apply(
        [
            {"id": "dhcp", "from": "vms", "to": "host", "services": ["dhcp"]},
            {"id": "dhcp-out", "from": "vm:vm1", "to": outside, "services": ["dhcp"]},
        ]
    )
    assert udp_from_port(lab, "vm1", 68, outside, 67) == "OK"
    assert can(lab, "vm1", outside, "--port", "67/udp")[0]


def test_can_denies_what_only_an_unknown_port_could_hold(lab: LabSession) -> None:
    """vm2 is removed from the policy while its port stays on the bridge: the kernel drops everything on
    that port (`sys:unknown-port`), and `can` says so instead of "allowed"."""
    vm2 = str(lab.plan.vms[1].ip)
    lab.serve("vm2", tcp=[80])
    assert lab.engine is not None
    document = lab.document(
        [
            {"id": "web", "from": "vm:vm1", "to": "any", "services": ["tcp/80"]},
            {"id": "in", "from": "any", "to": "vm:vm3", "services": ["tcp/80", "icmp"]},
        ]
    )
    document["vms"] = [v for v in document["vms"] if v["name"] != "vm2"]
    lab.engine.store_policy(document, source="test")
    lab.engine.converge()
    assert lab.tcp("vm1", vm2, 80) in UNANSWERED
    allowed, text = can(lab, "vm1", vm2, "--port", "80/tcp")
    assert not allowed and "sys:unknown-port" in text, text
    assert lab.ping("vm2", "vm3")[0] == 0
    allowed, text = can(lab, vm2, "vm3", "--protocol", "icmp")
    assert not allowed and "sys:unknown-port" in text, text
    allowed, text = can(lab, vm2, "10.77.0.99", "--protocol", "icmp")
    assert not allowed and "sys:unknown-port" in text, text
    # the control: the same flow to a declared VM is allowed, by the kernel and by `can`
    lab.serve("vm3", tcp=[80])
    assert lab.tcp("vm1", "vm3", 80) == "OK"
    assert can(lab, "vm1", "vm3", "--port", "80/tcp")[0]
