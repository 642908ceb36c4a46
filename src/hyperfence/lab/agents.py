"""Real agents in the lab's VMs: enrolment, the zipapp, and one agent process per VM namespace.

Two ways to own the processes:

* `LabAgents` (tests, the demo): the agents are children of this process (``topology.popen_in_vm``), stopped
  and reaped by it, and by ``destroy_lab`` if the caller forgets.
* `start_detached` / `stop_detached` (``hyperfence lab up`` / ``lab down``): the CLI exits while the agents
  run on, so their PIDs and command lines are recorded in ``<lab run dir>/agents.json``; `stop_detached`
  only signals a PID whose command line is still the recorded one (a recycled PID is left alone). An agent
  stopped this way stays a zombie of PID 1 here (it does not reap orphans); it holds no resources.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, BinaryIO

from hyperfence.agent.build import build_zipapp
from hyperfence.lab import records, topology
from hyperfence.lab.plan import LabPlan
from hyperfence.lab.policy import lab_policy
from hyperfence.model.policy import Vm
from hyperfence.policy.parse import parse_policy
from hyperfence.reconcile.agents import channels_dir, enroll
from hyperfence.reconcile.engine import Engine
from hyperfence.system.state_dir import DIR_MODE, make_dirs, open_private, write_private

PYTHON = "/usr/bin/python3"  # the guest's interpreter: Debian's, not the host's virtualenv


def lab_vms(plan: LabPlan) -> list[Vm]:
    return list(parse_policy(lab_policy(plan)).vms)


def prepare(engine: Engine, plan: LabPlan, *, interval: float = 1.0) -> dict[str, Path]:
    """Enrol every lab VM that has no agent key yet, write its config, build the zipapp. VM name -> config."""
    enrolled = engine.store.agents()
    cdir = Path(channels_dir(engine.state_dir))
    make_dirs(cdir, mode=DIR_MODE)
    out: dict[str, Path] = {}
    for vm in lab_vms(plan):
        path = cdir / f"{vm.name}.json"
        if vm.id not in enrolled or not path.exists():
            _, config = enroll(engine, vm, "unix", interval=interval)
            config["state"] = str(cdir / f"{vm.name}.seq")
            write_private(path, json.dumps(config, indent=1))
        out[vm.name] = path
    build_zipapp(zipapp_path(engine)).chmod(0o700)  # in the private state directory: no access for others
    return out


def zipapp_path(engine: Engine) -> Path:
    return Path(channels_dir(engine.state_dir)) / "hyperfence-agent.pyz"


def _open_log(engine: Engine, vm: str) -> BinaryIO:
    """The agent's output file, appended to; 0600 like everything in the state directory."""
    path = Path(channels_dir(engine.state_dir)) / f"{vm}.log"
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab")


def agent_argv(engine: Engine, config: Path) -> list[str]:
    return [PYTHON, str(zipapp_path(engine)), "--config", str(config)]


class LabAgents:
    """Agents as children of this process."""

    def __init__(self, engine: Engine, plan: LabPlan, *, interval: float = 1.0) -> None:
        self.engine = engine
        self.plan = plan
        self.configs = prepare(engine, plan, interval=interval)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, vm: str) -> None:
        self.stop(vm)
        log = _open_log(self.engine, vm)
        try:
            self.procs[vm] = topology.popen_in_vm(
                self.plan, vm, agent_argv(self.engine, self.configs[vm]), stdout=log, stderr=log
            )
        finally:
            log.close()

    def start_all(self) -> None:
        for vm in self.configs:
            self.start(vm)

    def kill(self, vm: str) -> None:
        """SIGKILL: the agent dies without a goodbye, as a crashed or killed agent would."""
        proc = self.procs.get(vm)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop(self, vm: str) -> None:
        proc = self.procs.pop(vm, None)
        if proc is not None:
            topology.stop_process(proc)

    def close(self) -> None:
        for vm in list(self.procs):
            self.stop(vm)


# --- detached agents (`hyperfence lab up`) ---------------------------------------------------------------


def _record_path(plan: LabPlan) -> Path:
    return records.state_dir(plan.name) / "agents.json"


def start_detached(engine: Engine, plan: LabPlan) -> dict[str, int]:
    """Start an agent in every VM namespace that has no live one; VM name -> PID."""
    configs = prepare(engine, plan)
    record = _read_record(plan)
    for vm, config in configs.items():
        have = record.get(vm)
        if have is not None and _alive(have["pid"], have["argv"]):
            continue
        argv = ["ip", "netns", "exec", plan.vm(vm).netns, *agent_argv(engine, config)]
        log = _open_log(engine, vm)
        with log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        record[vm] = {"pid": proc.pid, "argv": argv}
    _write_record(plan, record)
    return {vm: int(r["pid"]) for vm, r in record.items()}


def stop_detached(plan: LabPlan) -> int:
    """Stop the recorded agents of the lab; how many were running."""
    record = _read_record(plan)
    stopped = 0
    for r in record.values():
        pid, argv = int(r["pid"]), list(r["argv"])
        if _alive(pid, argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            stopped += 1
    deadline = time.monotonic() + 3
    for r in record.values():
        while _alive(int(r["pid"]), list(r["argv"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(int(r["pid"]), list(r["argv"])):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(r["pid"]), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        _record_path(plan).unlink()
    return stopped


def _alive(pid: int, argv: list[str]) -> bool:
    """Running (not a zombie) and still the command we started (`ip netns exec` execs the agent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    agent_part = [a.encode() for a in argv[argv.index(PYTHON) :]] if PYTHON in argv else []
    return bool(agent_part) and cmdline[: len(agent_part)] == agent_part


def _read_record(plan: LabPlan) -> dict[str, Any]:
    try:
        data = json.loads(_record_path(plan).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(plan: LabPlan, record: dict[str, Any]) -> None:
    path = _record_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
