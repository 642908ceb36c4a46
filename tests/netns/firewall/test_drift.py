"""Drift is repaired within half a second: the real daemon process, real `nft` commands run by hand in the
lab's host namespace, real packets. The daemon runs with `--resync 60`, so its periodic full resync cannot be
what repairs anything here: only the nftables event watch (reconcile/drift.py) can."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hyperfence.lab import topology
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.compile import vm_sid

pytestmark = pytest.mark.kernel

PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
UDP_2_1 = {"id": "udp5000", "from": "vm:vm2", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}
WATCHING = "watching nftables events"
REPAIRING = "changed hyperfence's tables: repairing"


class DaemonProcess:
    """`hyperfence daemon --resync 60` for the lab, its log in a file."""

    def __init__(self, lab: LabSession) -> None:
        self.lab = lab
        self.hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns]
        self.hf += ["--state-dir", lab.state_dir]
        self.log_path = os.path.join(lab.state_dir, "daemon.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.hf, "daemon", "--resync", "60"], stdout=subprocess.DEVNULL, stderr=self._log
        )
        try:
            deadline = time.monotonic() + 30
            # Ready: its first converge is done and the watch is subscribed.
            while WATCHING not in self.log():
                assert self.proc.poll() is None, self.log()
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        time.sleep(0.3)  # the full check the watch asks for when it starts (finds nothing, writes nothing)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon(lab: LabSession) -> Iterator[DaemonProcess]:
    lab.apply([PING_1_2])
    d = DaemonProcess(lab)
    try:
        yield d
    finally:
        d.stop()


def flood_ping(
    lab: LabSession, src: str, dst: str, *, during: Any = None, count: int = 300
) -> tuple[int, int]:
    """(sent, replies) of `count` pings at 100 per second from `src` to `dst`; `during()` runs 0.5 s in."""
    p = topology.popen_in_vm(
        lab.plan,
        src,
        ["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", lab.ip(dst)],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        if during is not None:
            during()
        out, _ = p.communicate(timeout=count * 0.01 + 20)
    finally:
        topology.stop_process(p)
    text = out.decode(errors="replace")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def hand(lab: LabSession, *argv: str) -> None:
    """An administrator's `nft` command in the bridges' namespace."""
    r = lab.run("host", ["nft", *argv])
    assert r.returncode == 0, r.stderr


def drift_events(lab: LabSession) -> list[dict[str, Any]]:
    assert lab.engine is not None
    return lab.engine.store.events(kind="drift-repaired")


def test_hand_flush_under_a_100pps_ping_lets_at_most_half_a_second_through(
    lab: LabSession,
) -> None:
    lab.apply([PING_1_2])  # vm1 -> vm2 only: vm3 may not reach vm2
    # The control, without the daemon: the flush opens vm3 -> vm2 and this ping gets replies at 100/s.
    sent, replies = flood_ping(lab, "vm3", "vm2", during=lambda: hand(lab, "flush", "ruleset"), count=150)
    assert sent == 150 and replies >= 90, (sent, replies)
    control = replies
    assert lab.engine is not None
    lab.engine.converge(full=True)
    assert lab.ping("vm3", "vm2")[0] == 0
    before = len(drift_events(lab))

    d = DaemonProcess(lab)
    try:
        t0 = time.monotonic()
        sent, replies = flood_ping(lab, "vm3", "vm2", during=lambda: hand(lab, "flush", "ruleset"))
        elapsed = time.monotonic() - t0
        print(f"control: {control} of 150 replies without the daemon; with it: {replies} of {sent}")
        assert sent == 300, sent  # the ping ran at 100 per second throughout
        assert replies <= 50, f"{replies} of {sent} pings at 100/s got through: open for ~{replies * 10} ms"
        assert elapsed < 30  # far below the daemon's 60 s resync
        events = drift_events(lab)[before:]
        assert len(events) == 1, events
        assert "table bridge hyperfence is missing" in events[0]["drift"]
        assert re.search(r"generation \d+ by process \d+ \(nft\)", events[0]["cause"]), events[0]
        assert REPAIRING in d.log()
        # the whole policy is back, not just the drop
        assert lab.ping("vm1", "vm2")[0] == 2
        assert lab.ping("vm3", "vm2")[0] == 0
    finally:
        d.stop()


def wait_for(pred: Any, *, timeout: float) -> float:
    """Seconds until `pred()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"not repaired within {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - t0


def listing(lab: LabSession, *what: str) -> list[dict[str, Any]]:
    r = lab.run("host", ["nft", "-j", "-a", "list", *what])
    if r.returncode != 0:
        return []
    objs: list[dict[str, Any]] = json.loads(r.stdout)["nftables"]
    return objs


def rule_handles(lab: LabSession, chain: str) -> dict[str, int]:
    return {
        o["rule"].get("comment", ""): o["rule"]["handle"]
        for o in listing(lab, "chain", "bridge", "hyperfence", chain)
        if "rule" in o
    }


def set_elements(lab: LabSession, kind: str, name: str) -> list[Any]:
    for o in listing(lab, kind, "bridge", "hyperfence", name):
        if kind in o:
            elems: list[Any] = o[kind].get("elem", [])
            return elems
    return []


def test_a_deleted_rule_chain_content_or_set_element_is_repaired_promptly(
    lab: LabSession, daemon: DaemonProcess
) -> None:
    assert lab.engine is not None and lab.engine.current is not None
    vm2 = next(v for v in lab.engine.current.policy.vms if v.name == "vm2")
    chain = f"{vm_sid(vm2.id)}_in"
    full = rule_handles(lab, chain)
    assert "rule:ping#1" in full

    # one rule, by handle
    hand(lab, "delete", "rule", "bridge", "hyperfence", chain, "handle", str(full["rule:ping#1"]))
    took_rule = wait_for(lambda: "rule:ping#1" in rule_handles(lab, chain), timeout=1.0)
    # a whole chain's rules
    hand(lab, "flush", "chain", "bridge", "hyperfence", chain)
    took_chain = wait_for(lambda: set(rule_handles(lab, chain)) == set(full), timeout=1.0)
    # one element of the port map: vm2's ingress dispatch
    ports = set_elements(lab, "map", "in_ports")
    vm2_port = next(e for e in ports if chain in json.dumps(e))
    hand(lab, "delete", "element", "bridge", "hyperfence", "in_ports", "{", f'"{vm2_port[0]}"', "}")
    took_elem = wait_for(lambda: len(set_elements(lab, "map", "in_ports")) == len(ports), timeout=1.0)
    print(f"repaired in: rule {took_rule:.3f} s, chain {took_chain:.3f} s, element {took_elem:.3f} s")

    # The event is written after the repaired batch is in the kernel: wait for the last one to land.
    wait_for(lambda: len(drift_events(lab)) >= 3, timeout=2.0)
    events = drift_events(lab)
    drift = [line for e in events for line in e["drift"]]
    assert f"chain {chain}: 1 rule(s) missing, 0 unexpected" in drift, drift
    assert any(line.startswith(f"chain {chain}: ") and "missing" in line for line in drift)
    assert "map in_ports: 1 element(s) missing, 0 unexpected" in drift, drift
    assert len(events) == 3, events
    assert all("(nft)" in e["cause"] for e in events)
    assert lab.ping("vm1", "vm2")[0] == 2
    assert lab.ping("vm3", "vm2")[0] == 0


def test_the_daemons_own_applies_start_no_repair(lab: LabSession, daemon: DaemonProcess) -> None:
    monitor_out = open(os.path.join(lab.state_dir, "monitor.txt"), "wb")  # noqa: SIM115
    monitor = topology.popen_in_host(lab.plan, ["nft", "monitor"], stdout=monitor_out)
    try:
        time.sleep(0.3)
        log_before = daemon.log()
        policy_file = os.path.join(lab.state_dir, "changed.json")
        with open(policy_file, "w", encoding="utf-8") as f:
            json.dump(lab.document([PING_1_2, UDP_2_1]), f)
        r = subprocess.run([*daemon.hf, "policy", "apply", policy_file], capture_output=True, check=False)
        assert r.returncode == 0 and b"applied by the daemon" in r.stdout, r
        time.sleep(1.0)  # a repair the apply had wrongly started would have run by now
    finally:
        topology.stop_process(monitor)
        monitor_out.close()
    with open(monitor_out.name, encoding="utf-8") as f:
        generations = [line for line in f if line.startswith("# new generation")]
    assert len(generations) == 1, generations  # the apply itself, and nothing after it
    new_log = daemon.log()[len(log_before) :]
    assert "repairing" not in new_log, new_log
    assert drift_events(lab) == []
    # the control: a foreign change right after is repaired (so the watch was listening all along)
    hand(lab, "flush", "ruleset")
    wait_for(lambda: bool(drift_events(lab)), timeout=2.0)
    assert REPAIRING in daemon.log()
