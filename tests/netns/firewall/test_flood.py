"""Flood limits against the real kernel: a UDP flood where every datagram is a new flow (a new source port
each time) is cut to the limit; without the limit it all arrives.

The flood is a small Python sender, not hping3: hping3 sometimes died here with a glibc heap assertion
(SIGABRT) in the middle of a flood, which made this test flaky."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from hyperfence.adapters.nflog import NflogPacket, NflogReader
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.build import log_prefix
from hyperfence.ruleset.compile import vm_sid
from tests.netns.firewall.test_firewall import counter

pytestmark = pytest.mark.kernel

UDP_1_2 = {"id": "udp", "from": "vm:vm1", "to": "vm:vm2", "protocol": "udp", "ports": [5000]}
WEB_1_2 = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "ports": [80]}
SENT = 300
# argv: address, count. Datagram i leaves from source port 20000 + i, at one per millisecond.
FLOOD = """
import socket, sys, time
addr, count = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
for i in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 20000 + i))
        s.sendto(b"x" * 18, (addr, 5000))
    time.sleep(max(0.0, t0 + (i + 1) * 0.001 - time.monotonic()))
"""


@pytest.fixture
def lab_vms() -> int:
    return 2


def apply(lab: LabSession, limits: list[dict[str, Any]], *, settings: dict[str, Any] | None = None) -> None:
    assert lab.engine is not None
    doc = lab.document([UDP_1_2, WEB_1_2])
    doc["limits"] = limits
    if settings is not None:
        doc["settings"] = settings
    lab.engine.store_policy(doc, source="test")
    lab.engine.converge()


def flood(lab: LabSession) -> None:
    """SENT UDP datagrams at ~1,000 a second from vm1 to vm2:5000, each from a new source port."""
    r = lab.run("vm1", [sys.executable, "-c", FLOOD, lab.ip("vm2"), str(SENT)])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("direction", "chain"), [("in", "_in"), ("out", "_out")])
def test_a_new_flow_flood_is_cut_to_the_limit(lab: LabSession, direction: str, chain: str) -> None:
    target = "vm:vm2" if direction == "in" else "vm:vm1"
    apply(lab, [])
    flood(lab)
    unlimited = counter(lab, "_in", "rule:udp#1")
    assert unlimited >= SENT * 0.95  # the control: without a limit the flood arrives

    apply(lab, [{"id": "f", "vms": target, "direction": direction, "new_flows": 20, "burst": 20}])
    before = counter(lab, "_in", "rule:udp#1")
    flood(lab)
    passed = counter(lab, "_in", "rule:udp#1") - before
    dropped = counter(lab, chain, "sys:flood:f")
    # ~0.3 s at 1,000/s: the burst of 20 plus 20/s; generous bounds for a slow machine
    print(f"flood {direction}: passed {passed}, dropped {dropped}, unlimited {unlimited}")
    assert 10 <= passed <= 80, passed
    assert dropped >= SENT - 80, dropped
    assert passed + dropped >= SENT * 0.95
    # A new connection under the limit is still let through once the flood stops.
    lab.serve("vm2", tcp=[80])
    assert lab.tcp("vm1", "vm2", 80) == "OK"


def read_until_quiet(reader: NflogReader, *, quiet: float = 0.5, timeout: float = 10.0) -> list[NflogPacket]:
    """What the reader gets until nothing more came for `quiet` seconds (or `timeout` in all)."""
    got: list[NflogPacket] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        more = reader.read(quiet)
        if not more:
            break
        got.extend(more)
    return got


def test_dropped_flood_is_logged_within_the_log_rate(lab: LabSession) -> None:
    """The flood's drops are logged (NFLOG records with the flood rule's prefix), but no faster than the
    policy's log rate allows: its burst, then `log_rate` a second."""
    log_rate, log_burst = 5, 10
    apply(
        lab,
        [{"id": "f", "vms": "vm:vm2", "direction": "in", "new_flows": 5, "burst": 5}],
        settings={"log_rate": log_rate, "log_burst": log_burst},
    )
    assert lab.engine is not None and lab.engine.current is not None
    policy = lab.engine.current.policy
    vm2 = next(v.id for v in policy.vms if v.name == "vm2")
    prefix = log_prefix(vm_sid(vm2), "in", "flood", "sys:flood:f")
    t0 = time.monotonic()
    with NflogReader(policy.settings.nflog_group, netns=lab.plan.host_netns) as reader:
        flood(lab)
        packets = read_until_quiet(reader)
        assert reader.dropped_overruns == 0 and reader.malformed == 0
    seconds = time.monotonic() - t0  # every record was logged within this window
    # The limit also drops (and logs) whatever else reaches vm2 outside an established flow while it is over
    # (seen here at times: the bridge's own IPv6 multicast listener reports to ff02::16). All of it shares
    # the rule's log rate; the flood's own records must be among it.
    logged = [p for p in packets if p.prefix == prefix]
    from_flood = [p for p in logged if (p.src, p.dst, p.dport) == (lab.ip("vm1"), lab.ip("vm2"), 5000)]
    dropped = counter(lab, "_in", "sys:flood:f")
    print(
        f"flood log: {len(from_flood)} of {len(logged)} records from the flood; {dropped} dropped; {seconds:.2f} s"
    )
    assert dropped >= SENT - 60, dropped
    assert from_flood, logged
    assert len(logged) <= log_burst + log_rate * seconds + 1, (len(logged), seconds)
