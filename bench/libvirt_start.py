"""From starting a libvirt guest to its rules in the kernel, and to its agent's first heartbeat.

One lab `blv` (1 VM planned, no namespace VMs), the lab's own libvirtd (QEMU as root: lab only), the tiny
guest (`lab image`), and the real daemon (`hyperfence daemon --libvirt qemu:///system`, its own process). The
domain is defined once with an enrolled agent (virtio-serial); then, per repetition, from just before
`virDomainCreate` (what `virsh start` calls):

  - start call: until libvirt's start returns (the tap exists then);
  - rules: until the tap is in hyperfence's `out_ports` map in the kernel (the daemon saw the lifecycle
    event, read the domains, compiled and applied); before that the tap is an unknown port: nothing passes;
  - first heartbeat: until the daemon reports the VM's agent `ok` (the guest booted under TCG, no KVM here,
    and its agent sent a signed beat over virtio-serial).

Then the domain is destroyed and the next repetition starts. Run as root from the repository root:
`.venv/bin/python bench/libvirt_start.py [--reps 3]` (named so that it does not shadow the `libvirt` module) (~1 min).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import env_summary, log

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.daemon import request
from hyperfence.lab.domains import prepare_qemu_dir
from hyperfence.lab.image import build_image
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.qemu import URI, define_lab_guest, qemu_policy
from hyperfence.lab.topology import create_lab, destroy_lab
from hyperfence.reconcile.engine import Engine

REPO = Path(__file__).resolve().parent.parent


def tap_in_kernel(plan_netns: str, tap: str) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", plan_netns, "nft", "-j", "list", "map", "bridge", "hyperfence", "out_ports"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return f'"{tap}"' in out


def _prepare(plan: LabPlan, state: Path, inventory: LibvirtInventory) -> str:
    """The guest defined (stopped) with an enrolled agent; its UUID."""
    image = build_image()
    engine = Engine(netns=plan.host_netns, state_dir=str(state))
    try:
        engine.store_policy(qemu_policy(plan), source="bench/libvirt")
        info = define_lab_guest(inventory, plan, engine, "vm1", image, start=False)
        return info.uuid
    finally:
        engine.close()


def _start_daemon(plan: LabPlan, state: Path) -> subprocess.Popen[bytes]:
    log("starting the daemon with --libvirt")
    argv = [str(REPO / ".venv/bin/hyperfence"), "--netns", plan.host_netns, "--state-dir", str(state)]
    with open(state / "daemon.log", "wb") as err:
        daemon = subprocess.Popen([*argv, "daemon", "--libvirt", URI], stderr=err)
    deadline = time.monotonic() + 60
    while request(str(state), {"op": "agents"}) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    return daemon


def _one_start(
    plan: LabPlan, state: Path, inventory: LibvirtInventory, uuid: str
) -> tuple[float, float, float]:
    tap = plan.vms[0].port
    assert not tap_in_kernel(plan.host_netns, tap)
    t0, w0 = time.monotonic(), time.time()
    inventory.start(uuid)
    t_start = time.monotonic() - t0
    while not tap_in_kernel(plan.host_netns, tap):
        time.sleep(0.01)
    t_rules = time.monotonic() - t0
    while True:
        reply = request(str(state), {"op": "agents"}) or {}
        if any(r["vm"] == uuid and (r["last_seen"] or 0) > w0 for r in reply.get("agents", [])):
            break
        if time.monotonic() - t0 > 120:
            raise RuntimeError("no heartbeat within 120 s")
        time.sleep(0.05)
    t_beat = time.monotonic() - t0
    inventory.destroy(uuid)
    while tap_in_kernel(plan.host_netns, tap):
        time.sleep(0.05)
    return t_start, t_rules, t_beat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if running_libvirtd() is not None:
        print("a libvirtd is already running (one per machine): not touching it", file=sys.stderr)
        return 2
    plan = plan_lab("blv", 1)
    state = Path(tempfile.mkdtemp(prefix="hf-bench-libvirt-"))
    daemon: subprocess.Popen[bytes] | None = None
    inventory: LibvirtInventory | None = None
    rows: list[tuple[float, float, float]] = []
    try:
        create_lab(plan, only=0)
        ensure_libvirtd(plan, qemu_as_root=True)
        prepare_qemu_dir(plan)
        inventory = LibvirtInventory(URI)
        uuid = _prepare(plan, state, inventory)
        daemon = _start_daemon(plan, state)
        for rep in range(args.reps):
            rows.append(_one_start(plan, state, inventory, uuid))
            t_start, t_rules, t_beat = rows[-1]
            log(
                f"rep {rep + 1}: start {t_start:.2f} s, rules {t_rules:.2f} s, first heartbeat {t_beat:.1f} s"
            )
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(
            f"hyperfence libvirt benchmark ({env_summary()}); {args.reps} starts of a TCG guest (no KVM here)"
        )
        print(
            f"  start call (virDomainCreate, as virsh start): median {med[0]:.2f} s  {[round(r[0], 2) for r in rows]}"
        )
        print(
            f"  start -> the VM's rules in the kernel:         median {med[1]:.2f} s  {[round(r[1], 2) for r in rows]}"
        )
        print(
            f"  start -> first agent heartbeat:               median {med[2]:.1f} s  {[round(r[2], 1) for r in rows]}"
        )
        print("  before its rules are in, the tap is an unknown port: it gets nothing (fail closed)")
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=10)
        if inventory is not None:
            for d in inventory.domains():
                if d.name.startswith(f"hf-{plan.name}-"):
                    inventory.destroy(d.uuid)
                    inventory.undefine(d.uuid)
            inventory.close()
        stop_libvirtd(plan)
        destroy_lab(plan.name)


if __name__ == "__main__":
    sys.exit(main())
