"""A lab with hyperfence on it: the lab's namespaces, an engine bound to its host namespace, and real
traffic tools (ping, TCP/UDP probes, a DHCP client). Used by the demo, the tests and the benchmarks.

`LabSession` is a context manager: on exit it stops what it started and (unless `keep=True`) destroys the
lab, even when the body raised.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from hyperfence.errors import BugError
from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan, plan_lab, validate_lab_name
from hyperfence.lab.policy import lab_policy
from hyperfence.model.kernel import FLAVOUR_ENV, parse_flavour
from hyperfence.policy.local import CHAINS_ENV, parse_chains
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.firewall import ConvergeResult
from hyperfence.system.state_dir import DIR_MODE, make_dirs, write_private

STATE_ROOT = "/var/lib/hyperfence/labs"
PROBE = [sys.executable, "-m", "hyperfence.lab.probe"]
OWNED_MARK = ".made-by-lab-up"  # in a lab's state directory that `lab up` created (`lab down` removes it)


def lab_state_dir(name: str) -> Path:
    """Where hyperfence keeps lab `name`'s state (store, agent keys, traffic log): what `--lab NAME` uses."""
    return Path(STATE_ROOT) / validate_lab_name(name)


def claim_state_dir(name: str) -> Path:
    """Lab `name`'s state directory, created (0700) if it is missing; a directory created here is marked
    as the lab's own, so that `remove_state_dir` removes it and nothing it did not make."""
    path = lab_state_dir(name)
    if not path.exists():
        make_dirs(path, mode=DIR_MODE)
        write_private(path / OWNED_MARK, f"state of lab {name}, made by `hyperfence lab up`\n")
    return path


def remove_state_dir(name: str) -> bool:
    """Remove lab `name`'s state directory if `claim_state_dir` made it (its mark is in it); False when
    there is none or it is not the lab's (made by something else: a daemon or an older hyperfence)."""
    path = lab_state_dir(name)
    if not (path / OWNED_MARK).is_file() or path.is_symlink():
        return False
    shutil.rmtree(path)
    return True


class LabSession:
    def __init__(
        self,
        name: str = "lab",
        vms: int = 3,
        *,
        keep: bool = False,
        state_dir: str | None = None,
        labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.plan: LabPlan = plan_lab(name, vms)
        self.keep = keep
        self.labels = labels
        self.state_dir = state_dir or os.path.join(STATE_ROOT, name)
        self._servers: list[subprocess.Popen[bytes]] = []
        self.engine: Engine | None = None

    def __enter__(self) -> LabSession:
        try:
            topology.create_lab(self.plan)
            self.engine = Engine(
                netns=self.plan.host_netns,
                state_dir=self.state_dir,
                flavour=parse_flavour(os.environ.get(FLAVOUR_ENV), field=FLAVOUR_ENV),
                local_only=parse_chains(os.environ.get(CHAINS_ENV), field=CHAINS_ENV),
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for p in self._servers:
            topology.stop_process(p)
        self._servers.clear()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if not self.keep:
            topology.destroy_lab(self.plan.name)

    # --- policy ---------------------------------------------------------------------------------------

    def document(
        self, rules: Sequence[dict[str, Any]] = (), *, ipsets: dict[str, list[str]] | None = None
    ) -> dict[str, Any]:
        doc = lab_policy(self.plan, rules, labels=self.labels)
        if ipsets:
            doc["ipsets"] = ipsets
        return doc

    def apply(
        self,
        rules: Sequence[dict[str, Any]] = (),
        *,
        full: bool = False,
        ipsets: dict[str, list[str]] | None = None,
    ) -> ConvergeResult:
        """Validate a policy with these rules, store it as a new generation and converge the kernel to it."""
        if self.engine is None:
            raise BugError("LabSession.apply outside its `with` block")
        self.engine.store_policy(self.document(rules, ipsets=ipsets), source="lab")
        _, result = self.engine.converge(full=full)
        if result is None:
            raise BugError("converge returned no result right after storing a policy")
        return result

    # --- traffic --------------------------------------------------------------------------------------

    def ip(self, vm: str) -> str:
        if vm == "outside":
            return str(self.plan.outside_ip)
        if vm in ("host", "gateway"):
            return str(self.plan.gateway)
        return str(self.plan.vm(vm).ip)

    def run(
        self, where: str, argv: Sequence[str], *, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        if where == "outside":
            return topology.run_in_outside(self.plan, argv, timeout=timeout)
        if where == "host":
            return topology.run_in_host(self.plan, argv, timeout=timeout)
        return topology.run_in_vm(self.plan, where, argv, timeout=timeout)

    def ping(self, src: str, dst: str, *, count: int = 2, wait: float = 1.0) -> tuple[int, str]:
        """(replies received, ping's output). `dst` is a VM name, outside, host or an address."""
        target = dst if dst[0].isdigit() else self.ip(dst)
        r = self.run(
            src,
            ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait), target],
            timeout=count * wait + 10,
        )
        text = r.stdout.decode(errors="replace")
        m = re.search(r"(\d+) received", text)
        return (int(m.group(1)) if m else 0), text

    def tcp(self, src: str, dst: str, port: int, *, timeout: float = 1.5) -> str:
        target = dst if dst[0].isdigit() else self.ip(dst)
        r = self.run(src, [*PROBE, "tcp", target, str(port), str(timeout)], timeout=timeout + 15)
        return r.stdout.decode().split(" ")[0].strip() or "ERR"

    def udp(self, src: str, dst: str, port: int, *, timeout: float = 1.5) -> str:
        target = dst if dst[0].isdigit() else self.ip(dst)
        r = self.run(src, [*PROBE, "udp", target, str(port), str(timeout)], timeout=timeout + 15)
        return r.stdout.decode().split(" ")[0].strip() or "ERR"

    def dhcp(self, vm: str, *, tries: int = 2) -> bool:
        """Does a real DHCP client (busybox udhcpc) in `vm` get a lease? Does not change the VM's address."""
        r = self.run(
            vm,
            [
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-f",
                "-t",
                str(tries),
                "-T",
                "1",
                "-s",
                "/bin/true",
            ],
            timeout=tries * 3 + 10,
        )
        return r.returncode == 0

    def serve(self, where: str, *, tcp: Sequence[int] = (), udp: Sequence[int] = ()) -> None:
        """Start TCP/UDP responders ("OK") in `where` (a VM, outside or host); stopped on close."""
        argv = [*PROBE, "serve", ",".join(map(str, tcp)), ",".join(map(str, udp))]
        if where == "outside":
            p = topology.popen_in_outside(self.plan, argv, stdout=subprocess.PIPE)
        elif where == "host":
            p = topology.popen_in_host(self.plan, argv, stdout=subprocess.PIPE)
        else:
            p = topology.popen_in_vm(self.plan, where, argv, stdout=subprocess.PIPE)
        line = p.stdout.readline() if p.stdout is not None else b""
        if not line.startswith(b"ready"):
            topology.stop_process(p)
            raise RuntimeError(f"probe server in {where} did not start")
        self._servers.append(p)
