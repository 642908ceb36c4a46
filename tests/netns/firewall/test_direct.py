"""Rule changes straight to nf_tables (reconcile/firewall.py `_direct`): a plan that only deletes and
appends rules is encoded by libnftables in a private namespace and committed as one netlink batch, skipping
libnftables' cache of the whole ruleset. Real kernel, lab namespaces: the kernel must then hold exactly what
a full read expects, commits stay the engine's own, and anything else still goes through libnftables."""

from __future__ import annotations

import threading
import time

import pytest

from hyperfence.lab.session import LabSession
from hyperfence.reconcile.drift import DriftWatcher
from hyperfence.ruleset.compile import TABLES, vm_sid

pytestmark = pytest.mark.kernel

PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
UDP = {"id": "udp", "from": "vm:vm2", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}
PORTS = {"id": "web", "from": "vm:vm3", "to": "vm:vm2", "protocol": "tcp", "ports": [80, 443, "8000-8080"]}


def _exact(lab: LabSession) -> None:
    """A full read of the kernel (the record forgotten) finds nothing to change and no drift."""
    assert lab.engine is not None
    lab.engine.firewall.record = None
    _, result = lab.engine.converge(full=True)
    assert result is not None and not result.changed and result.drift == []


def test_a_rule_change_goes_straight_to_nf_tables_and_the_kernel_holds_it_exactly(lab: LabSession) -> None:
    lab.apply([PING_1_2, UDP])
    assert lab.engine is not None
    fw = lab.engine.firewall
    before = fw.direct_applies
    lab.apply([PING_1_2, {**UDP, "ports": [5001]}])
    assert fw.direct_applies == before + 1
    _exact(lab)
    assert lab.ping("vm1", "vm2")[0] == 2
    assert lab.ping("vm3", "vm2")[0] == 0
    # the vm's other rules, a rule taken out, one put back: each a direct change, each exact
    lab.apply([UDP])
    assert fw.direct_applies == before + 2
    assert lab.ping("vm1", "vm2")[0] == 0
    lab.apply([PING_1_2, UDP])
    assert fw.direct_applies == before + 3
    assert lab.ping("vm1", "vm2")[0] == 2
    _exact(lab)


def test_what_needs_new_sets_or_anonymous_sets_goes_through_libnftables(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.engine is not None
    fw = lab.engine.firewall
    before = fw.direct_applies
    lab.apply([PING_1_2, PORTS])  # vm3 as a new peer of vm2: a new set; several ports: an anonymous set
    assert fw.direct_applies == before
    _exact(lab)
    lab.apply([PING_1_2, {**PORTS, "ports": [80, 443, 8443]}])  # only the anonymous set changes
    assert fw.direct_applies == before
    _exact(lab)


def test_a_refused_direct_batch_changes_nothing_and_the_change_still_lands(lab: LabSession) -> None:
    lab.apply([PING_1_2, UDP])
    assert lab.engine is not None and lab.engine.current is not None
    fw = lab.engine.firewall
    before = fw.direct_applies
    # by hand, the rules the next plan deletes by handle are gone: nf_tables refuses the direct batch whole
    vm1 = next(v for v in lab.engine.current.policy.vms if v.name == "vm1")
    lab.run(
        "host", ["nft", "flush", "chain", "bridge", "hyperfence", f"{vm_sid(vm1.id)}_in"]
    ).check_returncode()
    result = lab.apply([PING_1_2, {**UDP, "ports": [5002]}])
    assert result is not None and result.changed
    assert fw.direct_applies == before  # refused, then read and applied through libnftables
    _exact(lab)
    assert lab.ping("vm1", "vm2")[0] == 2


def test_direct_commits_are_the_engine_s_own_for_the_drift_watch(lab: LabSession) -> None:
    lab.apply([PING_1_2, UDP])
    assert lab.engine is not None
    causes: list[str] = []
    stop = threading.Event()
    watcher = DriftWatcher(
        netns=lab.plan.host_netns,
        tables=[(t.family, t.name) for t in TABLES],
        is_own=lab.engine.owns_commit,
        repair=causes.append,
    )
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not causes and time.monotonic() < deadline:
            time.sleep(0.02)
        before = lab.engine.firewall.direct_applies
        lab.apply([PING_1_2, {**UDP, "ports": [5003]}])
        assert lab.engine.firewall.direct_applies == before + 1
        time.sleep(1.0)
        assert len(causes) == 1, causes  # only the watch's start: our direct commit is not drift
        # the control: a commit by someone else to our tables is seen
        lab.run("host", ["nft", "add", "chain", "bridge", "hyperfence", "hfstray"]).check_returncode()
        while len(causes) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.02)
        assert "changed hyperfence's tables" in causes[-1]
    finally:
        stop.set()
        thread.join(timeout=5)
