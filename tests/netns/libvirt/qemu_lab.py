"""What the real-guest tests share: a lab whose VM ports are for libvirt/QEMU guests, and the HTTP probe
they run from the lab's host namespace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.lab.libvirtd import running_libvirtd
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.qemu import down_qemu
from hyperfence.lab.topology import create_lab, destroy_lab, run_in_host
from hyperfence.reconcile.engine import Engine

# `python3 -c PROBE IP`: one HTTP request to IP:8080; prints the answer's first bytes or "FAIL <why>".
PROBE = (
    "import socket,sys;s=socket.socket();s.settimeout(float(sys.argv[2]))\n"
    "try:\n s.connect((sys.argv[1],8080));s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n');print(s.recv(12).decode())\n"
    "except OSError as e: print('FAIL', e)"
)


def http_probe(plan: LabPlan, ip: str, *, timeout: float) -> str:
    """What the lab's host gets from a guest's port 8080 (see PROBE)."""
    argv = ["python3", "-c", PROBE, ip, str(timeout)]
    return run_in_host(plan, argv, timeout=15).stdout.decode().strip()


@contextlib.contextmanager
def qemu_lab(name: str, vms: int, tmp_path: Path) -> Iterator[tuple[LabPlan, Engine]]:
    """A lab (its namespaces and bridge, no netns VMs) for `vms` guests and an engine on it; the guests and
    libvirtd are stopped and the lab destroyed afterwards. Skips when a libvirtd that the tests did not
    start runs (one per machine: never touch it)."""
    if running_libvirtd() is not None:
        pytest.skip("a libvirtd this test did not start is running (one per machine): not touching it")
    plan = plan_lab(name, vms)
    engine = Engine(netns=plan.host_netns, state_dir=str(tmp_path / "state"))
    try:
        create_lab(plan, only=0)
        yield plan, engine
    finally:
        try:
            down_qemu(plan)
        finally:
            engine.close()
            destroy_lab(plan.name)
