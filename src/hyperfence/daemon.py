"""`hyperfence daemon`: the composition root. Keeps the kernel holding the policy, forever.

* Reconcile loop: a new policy version is converged incrementally as soon as it is stored: the store's
  change feed (`PolicyRepository.wait_for_change`, on which the loop sleeps) wakes it, without polling, for
  a version put by this process or by another (`hyperfence policy apply`); `poll` is only the feed's safety
  net (the longest it sleeps without an event, FEED_TIMEOUT by default). A policy file is still checked by its mtime
  every `poll` seconds (FILE_POLL by default). Every `resync` seconds a full read of the kernel finds and
  repairs drift (a hand-run `nft flush ruleset`), which is recorded as an event.
* Drift watch (`reconcile/drift.py`): the kernel's nftables events; a commit by anyone else that touches
  hyperfence's tables asks for that full converge at once (repaired within milliseconds at a few VMs).
* Address watch (`reconcile/host_addresses.py`): the host's own addresses are an input like the policy
  (`host` covers them, `outside` leaves them out); an address event reads them again and converges.
* Bridge port watch (`reconcile/bridge_ports.py`): a network device (a NIC, a bond, a VLAN device) that
  joins a managed bridge without being declared as an uplink gets nothing and is reported (an event, a
  warning, `hyperfence status`); a policy version that would cut off a device the kernel lets through (at
  a fresh boot, every device) is applied with that device passed as a provisional uplink, reported the same
  way, until the policy declares it or it leaves the bridge.
* Control socket (`<state>/daemon.sock`, root only): `policy apply` asks the daemon to converge now and
  waits for the answer, so a one-rule change is applied by a process that already holds the kernel state.
* Kernel preconditions (`reconcile/preconditions.py`): br_netfilter and `bridge-nf-call-iptables=1` in the
  bridges' namespace, put in place at start (or the daemon refuses to start) and restored within 0.1 s when
  something turns them off; `status` says what the kernel offers and whether the stateful path holds.
* Traffic log: NFLOG events from the rules -> JSON lines in `<state>/traffic.jsonl`.
* Lease learner (`reconcile/leases.py`): VMs without declared addresses learn them from the DHCP leases their
  rules let them take; learned addresses are an input like the policy, stored, released when they end.
* The watches above and below are monitors (`reconcile/monitor.py`), one list of them in
  `reconcile/monitors.py`: `Daemon.run` starts each in order without naming any, so a new monitor is one
  class and one line in that list.
* Every long-running loop (control socket, reconcile, every monitor) runs under a `Supervisor`: a loop that
  fails is logged, recorded as a `loop-failed` event and restarted with backoff; the `status` op
  (`hyperfence status`) says which loops run and which are down. The store's change feed fails the
  reconcile loop when its watcher dies, so that is reported and restarted the same way.
* Stop (SIGTERM, SIGINT): `stop_event` is a `StopSignal`, and every loop wakes on it rather than finishing
  a sleep or a poll (`reconcile/supervisor.py`), so the process exits within tens of milliseconds (measured
  ~20 ms, `tests/netns/daemon/test_stop.py`); a loop that hangs is given up after JOIN_TIMEOUT and logged.

The kernel rules do not depend on this process: a crash or `kill -9` leaves them exactly as they were (fail
closed), and a restart that finds the kernel already right writes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any

from hyperfence.errors import (
    BugError,
    ConflictError,
    HyperfenceError,
    InvalidInputError,
    Problem,
    from_wire,
    prefixed,
    to_wire,
)
from hyperfence.model.kernel import Flavour
from hyperfence.model.text import printable
from hyperfence.reconcile.agents import AgentMonitor
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.inventory import InventoryWatcher
from hyperfence.reconcile.monitor import Monitor, Primed
from hyperfence.reconcile.monitors import MonitorOptions, monitors
from hyperfence.reconcile.preconditions import Preconditions
from hyperfence.reconcile.supervisor import StopSignal, Supervisor, on_stop, wake_fd
from hyperfence.services.edit import edit_from_wire, store_edit
from hyperfence.services.overlays import release, set_operator_overlay
from hyperfence.system.state_dir import write_private

log = logging.getLogger("hyperfence.daemon")

CONTROL_SOCKET = "daemon.sock"
MAX_REQUEST = 64 * 1024
MAX_CAUSES = 10  # reasons kept for one coalesced repair
AGENT_OPS = ("agents", "agents-reload", "release")
OVERLAY_OPS = ("overlay-set", "overlay-release")
CHECKPOINT_IDLE = 2.0  # seconds without a change before the store's write-ahead log is checkpointed
ACCEPT_TIMEOUT = 0.5  # how often the control loop looks at a plain `stop` Event (a StopSignal wakes it)
JOIN_TIMEOUT = 2.0  # how long a stop waits for the loops to finish
FILE_POLL = 0.2  # seconds between checks of a policy file's mtime (`--poll` unset)
FEED_TIMEOUT = 5.0  # the store's change feed: longest wait without an event (`--poll` unset)


class PrintableFormatter(logging.Formatter):
    """Log lines that VM- or user-chosen text cannot forge or garble: control characters in the message
    (a newline in a guest's process name, a terminal escape) are escaped. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def control_path(state_dir: str) -> str:
    return os.path.join(state_dir, CONTROL_SOCKET)


def request(state_dir: str, payload: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any] | None:
    """Ask a running daemon; None when no daemon is listening."""
    path = control_path(state_dir)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        result: dict[str, Any] = json.loads(buf)
        return result
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    finally:
        s.close()


class Daemon:
    def __init__(
        self,
        engine: Engine,
        *,
        poll: float | None = None,
        resync: float = 10.0,
        traffic_log: bool = True,
        agents: AgentMonitor | None = None,
        inventory: InventoryWatcher | None = None,
        watch_drift: bool = True,
        watch_addresses: bool = True,
        preconditions: Preconditions | None = None,
        learn_leases: bool = True,
        watch_ports: bool = True,
    ) -> None:
        """The flags and the `preconditions`, `inventory` and `agents` given pick the monitors from the one
        list (`reconcile/monitors.py`); they are kept in `self.monitors`, which `run` starts in order (one
        may be appended before `run`)."""
        self.engine = engine
        self.preconditions = preconditions
        self.agents = agents
        self.inventory = inventory
        # `poll`: a policy file's check period; with the store, the change feed's safety-net timeout
        self.poll = poll if poll is not None else (FILE_POLL if engine.policy_file else FEED_TIMEOUT)
        self.resync = resync
        self._last_refusal: str | None = None  # a refusal is logged and recorded once, not at every retry
        self.stop_event = StopSignal()
        self._wake = threading.Event()
        self._repair_causes: list[str] = []  # why a full converge was asked for (see `repair_now`)
        self._repair_lock = threading.Lock()
        self.supervisor = Supervisor(self.stop_event, on_failure=self._loop_failed)
        options = MonitorOptions(
            watch_drift=watch_drift,
            watch_addresses=watch_addresses,
            watch_ports=watch_ports,
            traffic_log=traffic_log,
            learn_leases=learn_leases,
            preconditions=preconditions,
            inventory=inventory,
            agents=agents,
        )
        self.monitors: list[Monitor] = monitors(engine, options, repair=self.repair_now)
        self.last_key: str | None = None
        # the policy version the last changing converge applied, and its answer (see `_dispatch`)
        self._last_applied: tuple[str, dict[str, Any]] | None = None
        # One converge at a time, its `_last_applied` set before the next starts: a request whose version the
        # loop applied an instant earlier finds it there.
        self._converging = threading.Lock()
        self._last_change: float | None = None  # monotonic time of the last applied change (None: none since
        # the last store checkpoint)

    # --- control socket ------------------------------------------------------------------------------

    def _serve(self, stop: threading.Event) -> None:
        path = control_path(self.engine.state_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(path)
            os.chmod(path, 0o600)
            srv.listen(16)
            srv.setblocking(False)
            wake = wake_fd(stop)
            fds = [srv.fileno()] if wake is None else [srv.fileno(), wake]
            while not stop.is_set():
                # the stop signal wakes this wait at once (a plain Event: within ACCEPT_TIMEOUT)
                if srv.fileno() not in select.select(fds, [], [], ACCEPT_TIMEOUT)[0]:
                    continue
                try:
                    conn, _ = srv.accept()
                except BlockingIOError:  # the client gave up in between
                    continue
                conn.setblocking(True)
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            srv.close()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                buf = b""
                while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf or b"{}")
                reply = self._dispatch(req if isinstance(req, dict) else {})
            except (ValueError, OSError, RecursionError) as e:
                reply = to_wire(InvalidInputError(f"bad request: {str(e)[:200]}"))
            except Exception as e:  # a bug: answered, logged, and this connection's thread ends cleanly
                log.exception("control request failed")
                reply = to_wire(BugError(f"internal error: {type(e).__name__}: {str(e)[:200]}"))
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")
            if reply.get("changed"):
                self._tidy(full=False)  # after the answer: `policy apply` does not wait for it

    def _dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request; a refusal is answered with its kind, message, problems and retry
        delay (`errors.to_wire`), which the client raises again (`errors.from_wire`)."""
        try:
            return self._answer(req)
        except HyperfenceError as e:
            return to_wire(e)

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "reconcile":
            # A caller that does not say which version it stored is answered for this converge only.
            return self._answer_for(req.get("policy"), self._converge(full=bool(req.get("full"))))
        if op == "status":
            return {"ok": True, **self.health()}
        if op == "policy-edit":
            return self._edit(req)
        if op in AGENT_OPS:
            return self._agent_op(op, req)
        if op in OVERLAY_OPS:
            return self._overlay_op(op, req)
        raise InvalidInputError(
            f"unknown op {op!r} (expected reconcile, status, policy-edit, {', '.join(AGENT_OPS + OVERLAY_OPS)})"
        )

    def _answer_for(self, key: object, reply: dict[str, Any]) -> dict[str, Any]:
        """The answer for the policy version `key` a caller stored: when the reconcile loop, woken by the
        store's change feed, applied it first (this converge changed nothing), what applying it changed."""
        applied = self._last_applied
        if reply.get("ok") and not reply.get("changed") and applied is not None and applied[0] == key:
            return applied[1]
        return reply

    def _edit(self, req: dict[str, Any]) -> dict[str, Any]:
        """One policy object written or removed (services/edit.py): validated against the policy this
        daemon holds, stored, then converged before the answer (the change is read as itself)."""
        source = req.get("source")
        stored = store_edit(
            edit_from_wire(req),
            kernel=self.engine,
            policies=self.engine.store,
            source=source[:500] if isinstance(source, str) and source else "policy-edit",
        )
        reply: dict[str, Any] = {
            "ok": True,
            "generation": stored.generation,
            "changes": len(stored.changes),
            "checked": stored.checked,
        }
        if stored.changes:
            applied = self._converge(full=False)
            if not applied.get("ok"):
                raise prefixed(
                    from_wire(applied), f"generation {stored.generation} stored, not applied yet: "
                )
            applied = self._answer_for(f"gen:{stored.generation}", applied)
            reply.update({k: applied[k] for k in ("summary", "ms", "kernel_ms", "policy") if k in applied})
        return reply

    def _overlay_op(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """The operator producer's requests (services/overlays.py): stored, then converged before the
        answer. A refusal keeps its kind (`to_wire`), so the CLI exits as it would without a daemon."""
        if op == "overlay-set":
            data = req.get("overlay")
            overlay, changed = set_operator_overlay(self.engine, data if isinstance(data, dict) else {})
            reply: dict[str, Any] = {"overlay": overlay.as_dict(), "changed": changed}
        else:
            reply = release(self.engine, req.get("vm"), req.get("producer"), self.agents)
        if reply["changed"]:
            applied = self._converge(full=False)
            if not applied.get("ok"):
                raise prefixed(from_wire(applied), "stored, not applied yet: ")
        return {"ok": True, **reply}

    def _agent_op(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        if self.agents is None:
            raise ConflictError("this daemon runs without the agent monitor")
        if op == "agents":
            rows = self.agents.snapshot()
            if self.inventory is not None:
                self.inventory.annotate(rows)
            for row in rows:
                row.setdefault("state", None)  # not a libvirt VM, or no libvirt inventory
            return {"ok": True, "agents": rows}
        if op == "agents-reload":
            self.agents.reload()
            return {"ok": True}
        vm = req.get("vm")
        if not isinstance(vm, str):
            raise InvalidInputError("release", [Problem("vm", f"{vm!r} is not a VM id (expected a string)")])
        return {"ok": True, **self.agents.release(vm)}

    def health(self) -> dict[str, Any]:
        """What `hyperfence status` shows: the policy applied, each loop's state, the agent channels, what
        the kernel offers and whether the stateful path holds, the network devices cut off for not being
        declared as uplinks and a refused policy version. Healthy: none of those is wrong."""
        down = self.supervisor.down()
        kernel = self.preconditions.status() if self.preconditions is not None else None
        undeclared = [d.as_dict() for d in self.engine.undeclared]
        provisional = [d.as_dict() for d in self.engine.provisional]
        refused = self.engine.refused
        return {
            "pid": os.getpid(),
            "policy": self.last_key,
            "healthy": not down
            and not (kernel and kernel["problems"])
            and not undeclared
            and not provisional
            and refused is None,
            "kernel": kernel,
            "down": down,
            "undeclared_devices": undeclared,
            "provisional_uplinks": provisional,
            "refused": refused,
            "loops": self.supervisor.status(),
            "agent_channels": dict(self.agents.channel_stats) if self.agents is not None else None,
            "kernel_record": self.engine.kernel_record(),
            "policy_reads": dict(self.engine.policy_reads),
            "vms": self.engine.chained(),
        }

    def _loop_failed(self, name: str, error: str, failures: int) -> None:
        self.engine.store.add_event("loop-failed", {"loop": name, "error": error, "failures": failures})

    # --- the loop -------------------------------------------------------------------------------------

    def repair_now(self, cause: str) -> None:
        """Ask the loop for a full converge (read the kernel, repair drift) as soon as it can. Calls that come
        while one runs are coalesced into one more. Safe from any thread."""
        with self._repair_lock:
            if len(self._repair_causes) < MAX_CAUSES:
                self._repair_causes.append(cause)
        self._nudge()

    def _take_repair_causes(self) -> list[str]:
        with self._repair_lock:
            causes, self._repair_causes = self._repair_causes, []
        return causes

    def _converge(self, *, full: bool, cause: str | None = None) -> dict[str, Any]:
        with self._converging:
            return self._converge_now(full=full, cause=cause)

    def _converge_now(self, *, full: bool, cause: str | None) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            compiled, result = self.engine.converge(full=full, cause=cause)
        except HyperfenceError as e:
            refusal = str(e) if isinstance(e, ConflictError) else None
            if refusal is None or refusal != self._last_refusal:
                log.error("converge failed: %s", e)
                self.engine.store.add_event("converge-failed", {"error": str(e)[:2000]})
            self._last_refusal = refusal
            # (`conflict`: what a client from before error kinds reads)
            return {**to_wire(e), "conflict": refusal is not None}
        self._last_refusal = None
        if compiled is None or result is None:
            return {"ok": True, "policy": None}
        self.last_key = compiled.key
        if result.changed or result.drift:  # a new policy generation and/or events were written
            self._last_change = time.monotonic()
        if result.drift:
            log.warning("drift repaired: %s", "; ".join(result.drift[:10]))
        if result.changed:
            log.info("applied %s: %s in %.1f ms", compiled.key, result.summary, result.seconds * 1000)
        reply = {
            "ok": True,
            "policy": compiled.key,
            "changed": result.changed,
            "drift": result.drift,
            "summary": result.summary,
            "ms": round((time.monotonic() - t0) * 1000, 3),  # all of it: load, compile, apply, verify
            "kernel_ms": round(result.seconds * 1000, 3),  # plan, apply and verify only
        }
        if result.changed:
            self._last_applied = (compiled.key, reply)
        return reply

    def run(self) -> None:
        """Start everything in this order, then wait for the stop: the control socket (it answers `status`
        while the rest starts); the monitors' `prime` (libvirt's VMs are in the first converge, never cut off
        by it); the first converge; the reconcile loop; every monitor of `self.monitors` in its order (after
        the first compile: the policy names the NFLOG groups and the managed bridges they watch)."""
        self.supervisor.start("control", self._serve)
        for monitor in self.monitors:
            if isinstance(monitor, Primed):
                monitor.prime()
        self._converge(full=True, cause="daemon start")
        self._tidy(full=True)
        self.supervisor.start("reconcile", self._reconcile)
        for monitor in self.monitors:
            self.supervisor.start(monitor.name, monitor.run)
        self.stop_event.wait()
        self._shutdown()

    def _nudge(self) -> None:
        """Wake the reconcile loop, whether it waits on `_wake` (a policy file) or on the store's change
        feed (which asks `_wake.is_set` when woken: the flag is set first, so no wake-up is lost)."""
        self._wake.set()
        self.engine.store.wake()

    def _wait_time(self, next_resync: float) -> float:
        """How long the reconcile loop may sleep when nothing wakes it: until the next resync, the idle
        checkpoint or an overlay's end is due, and at most `poll` (a policy file's check period; the store
        feed's safety net)."""
        now = time.monotonic()
        wait = min(next_resync - now, self.poll)
        ends = self.engine.next_overlay_end()  # an overlay whose time is up is released on time
        if ends is not None:
            wait = min(wait, ends - self.engine.clock() + 0.01)
        if self._last_change is not None:
            wait = min(wait, self._last_change + CHECKPOINT_IDLE - now)
        return max(wait, 0.0)

    def _reconcile(self, stop: threading.Event) -> None:
        """Converge when the policy changed and fully every `resync` s. The loop sleeps on the store's change
        feed, which returns as soon as a newer generation is committed (by anyone) or `_nudge` is called
        (`repair_now`, a stop); a policy file is checked every `poll` s."""
        next_resync = time.monotonic() + self.resync
        seen = 0  # the latest generation the feed reported
        forget = on_stop(stop, self._nudge)
        try:
            while not stop.is_set():
                if self.engine.policy_file:
                    self._wake.wait(self._wait_time(next_resync))
                else:
                    seen = max(
                        seen,
                        self.engine.store.wait_for_change(
                            seen, self._wait_time(next_resync), cancelled=self._wake.is_set
                        ),
                    )
                self._wake.clear()
                if stop.is_set():
                    break
                if self._look(next_resync=next_resync):
                    next_resync = time.monotonic() + self.resync
                self._checkpoint_when_idle()
        finally:
            forget()

    def _look(self, *, next_resync: float) -> bool:
        """After a wake-up: converge if the policy changed or a full converge is due (resync, repair
        causes); True when it was a full one."""
        causes = self._take_repair_causes()
        full = time.monotonic() >= next_resync or bool(causes)
        try:
            key = self.engine.policy_key()
            # A refused version is tried again by a full converge (resync, link change), not every wake-up.
            changed = key not in (self.last_key, self.engine.refused_key)
            changed = self.engine.expire_overlays() or changed  # an overlay's time is up
        except HyperfenceError as e:
            log.error("%s", e)
            changed = False
        if full or changed:
            reply = self._converge(full=full, cause="; ".join(causes) or "periodic resync")
            if full or reply.get("changed"):
                self._tidy(full=full)
        return full

    def _tidy(self, *, full: bool) -> None:
        """After a change, so none of it lands inside the next apply: freeze the objects that exist now (a
        1,000-VM policy is a few hundred thousand long-lived objects that every full garbage collection would
        otherwise walk again, +60 ms in the middle of an apply). Freezing is O(1); what it keeps from the
        cycle collector is released at the next full resync, which unfreezes and collects once."""
        with self.engine.lock:
            if full:
                gc.unfreeze()
                gc.collect()
            gc.freeze()

    def _checkpoint_when_idle(self) -> None:
        """Fold the store's write-ahead log into the database once no change came for a while. A checkpoint
        fsyncs, and on a busy disk an fsync can stall a concurrent `policy apply`'s write for hundreds of
        milliseconds (measured by bench/apply.py), so it never runs right after a change."""
        if self._last_change is None or time.monotonic() - self._last_change < CHECKPOINT_IDLE:
            return
        self._last_change = None
        try:
            self.engine.store.checkpoint()
        except HyperfenceError as e:
            log.warning("store checkpoint skipped: %s", e)

    def stop(self) -> None:
        self.stop_event.set()
        self._nudge()

    def _shutdown(self) -> None:
        """Every loop woke when `stop_event` was set; wait for them to finish (each closes what it opened:
        the control socket, the channels, the watches), at most JOIN_TIMEOUT in all."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control_path(self.engine.state_dir))
        self.supervisor.join(timeout=JOIN_TIMEOUT)
        for name in self.supervisor.running():
            log.warning("loop %s did not stop within %g s; exiting without it", name, JOIN_TIMEOUT)


def run_daemon(
    *,
    netns: str | None,
    state_dir: str,
    policy_file: str | None,
    poll: float | None,
    resync: float,
    libvirt: str | None = None,
    flavour: Flavour | None = None,
    local_only: bool = True,
) -> None:
    # A policy of 1,000 VMs is a few hundred thousand small objects: with the default thresholds a full
    # collection lands in the middle of an apply every few changes (+60 ms). Collect less often.
    gc.set_threshold(200_000, 50, 100)
    engine = Engine(
        netns=netns,
        state_dir=state_dir,
        policy_file=policy_file,
        flavour=flavour,
        provisional_uplinks=True,
        local_only=local_only,
    )
    preconditions = Preconditions(engine)
    try:
        preconditions.ensure()  # before anything is applied: refuse to start on a kernel that cannot work
    except BaseException:
        engine.close()
        raise
    inventory = InventoryWatcher(engine, libvirt) if libvirt else None
    # Created before the first converge: isolation recorded in the store is back in the overlay at once.
    monitor = AgentMonitor(engine, pause=inventory.pause if inventory else None)
    if inventory is not None:  # a VM that starts or is reset gets its boot grace, not a silence
        inventory.on_boot = monitor.vm_started
    daemon = Daemon(
        engine, poll=poll, resync=resync, agents=monitor, inventory=inventory, preconditions=preconditions
    )
    preconditions.on_change = daemon.repair_now  # a flavour switch is converged at once
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    write_private(os.path.join(state_dir, "daemon.pid"), str(os.getpid()))
    log.info(
        "hyperfence daemon pid %d, netns %s, state %s, policy %s",
        os.getpid(),
        netns or "(own)",
        state_dir,
        policy_file or "store",
    )
    try:
        daemon.run()
    finally:
        engine.close()
