"""The agent monitor: channels -> tracker -> decisions -> quarantine in the kernel, events in the store.

Runs in the daemon (one thread). Every round: read what the channels have (`Hub.poll`), make the sequence
numbers just accepted durable, then decide per VM from its heartbeat policy (`Tracker.decide`) and carry the
decisions out: isolate = the heartbeat producer's isolate overlay on the VM (model/overlay.py: other
producers' overlays are its own business) and the firewall converges; pause = the hypervisor pauses the VM
where one is known (`pause` callback), else isolate; alert = an event; release = the heartbeat producer
drops its overlay (an operator's isolation of the same VM stays).

Replay protection survives a crash: the last accepted seq of every VM that sent something is written to the
store (one transaction) in the round that accepted it, before any decision follows from those frames, so a
frame accepted before a crash is refused as replayed after it. The rest of the records (last seen,
isolation) and the events are saved every few seconds and on stop. Refused frames are counted per VM and
reason and logged at most once per VM and reason per LOG_EVERY seconds; an unexpected error while
processing a frame is counted as `error` and never ends the loop.

Everything that changes the channels (enrolments, the TLS endpoint of a new policy) is done on the monitor's
own thread, at the start of a round: the channels are not thread-safe.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from hyperfence import wire
from hyperfence.adapters.agent_channels import Hub
from hyperfence.adapters.tls import ensure_certificates, server_context
from hyperfence.errors import HyperfenceError, InvalidInputError, NotFoundError
from hyperfence.health.heartbeat import heartbeat_for
from hyperfence.health.tracker import AgentRecord, Decision, Ingested, Tracker
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.model.policy import Heartbeat, Vm
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.supervisor import wake_fd
from hyperfence.ruleset.compile import vm_sid
from hyperfence.system.netns import NetnsThread

log = logging.getLogger("hyperfence.agents")

SAVE_EVERY = 5.0
LOG_EVERY = 10.0
EVENTS_PER_MINUTE = 60  # security events stored per VM and minute; the rest is counted
ROUND = 0.2
ENDPOINT_RETRY = 10.0
PRODUCER = "heartbeat"  # the overlay producer this monitor is

Pause = Callable[[str], bool]  # VM id -> paused?


def channels_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "agents")


def new_key() -> bytes:
    return secrets.token_bytes(32)


class AgentMonitor:
    name = "agents"  # a monitor (reconcile/monitor.py)

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        startup_grace: float = 15.0,
        pause: Pause | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.pause = pause
        self.lock = threading.Lock()
        self.tracker = Tracker(engine.store.agents(), started=clock(), startup_grace=startup_grace)
        # Isolation survives a restart: the overlay is in place before the daemon's first converge (the
        # engine read every producer's overlays from the store; this agrees with the agents' records).
        self._overlays_pending = False
        self._set_overlays()
        self.hub = self._new_hub()
        self._resync_channels = threading.Event()
        self._endpoint: tuple[Any, int] | None = None  # the endpoint of the policy last seen
        self._endpoint_open = False
        self._endpoint_retry = 0.0
        self.channel_stats: dict[str, Any] = {}  # a copy made by the monitor's thread, for other threads
        self._events: list[tuple[str, str | None, dict[str, Any]]] = []
        self._event_budget: Counter[str] = Counter()
        self._budget_minute = 0
        self._logged: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._last_save = clock()
        self._minute_samples: dict[str, dict[str, float]] = {}
        # (the VMs, the enrolled VMs, their heartbeats, VM names by id, the heartbeat entries)
        self._hb_cache: (
            tuple[tuple[Vm, ...], frozenset[str], dict[str, Heartbeat], dict[str, str], tuple[Heartbeat, ...]]
            | None
        ) = None
        self._wake: int | None = None  # the stop signal's descriptor while `run` runs (ends a round's wait)

    # --- the loop -------------------------------------------------------------------------------------

    def _new_hub(self) -> Hub:
        return Hub(self._on_frame, self._on_refused, self._claim, now=self.clock)

    def run(self, stop: threading.Event) -> None:
        """Until `stop`; may be called again after it raised (a supervisor restarting it): each run opens
        the channels afresh."""
        self._endpoint, self._endpoint_open = None, False
        self._wake = wake_fd(stop)
        self.hub.sync(self._specs())
        try:
            while not stop.is_set():
                self.round()
        finally:
            self.save()
            self.hub.close()
            self.hub = self._new_hub()

    def round(self, timeout: float | None = None) -> None:
        """One round; its wait for the channels lasts `timeout` seconds (default ROUND) or until `run`'s
        stop signal is set."""
        if self._resync_channels.is_set():
            self._resync_channels.clear()
            self.hub.sync(self._specs())
        self._follow_endpoint()
        self.hub.poll(ROUND if timeout is None else timeout, wake=self._wake)
        self._save_seqs()
        self.channel_stats = {
            "claimed": self.hub.claimed,
            "refused": dict(self.hub.refused),
            "endpoint": f"{self._endpoint[0]}:{self._endpoint[1]}"
            if self._endpoint and self._endpoint_open
            else None,
        }
        if self._overlays_pending:
            self._apply_quarantine()
        now = self.clock()
        with self.lock:
            decisions = self.tracker.decide(self.heartbeats(), now)
        for d in decisions:
            self._carry_out(d, now)
        if now - self._last_save >= SAVE_EVERY:
            self.save()

    def _save_seqs(self) -> None:
        """Make the seqs accepted in this round durable before anything follows from their frames. If the
        store is busy they stay in memory (replay protection holds while this process lives) and the next
        round tries again."""
        with self.lock:
            seqs = self.tracker.take_unsaved()
        if not seqs:
            return
        try:
            self.engine.store.save_seqs(seqs)
        except HyperfenceError as e:
            log.warning("agent sequence numbers not saved (retried next round): %s", e)
            with self.lock:
                self.tracker.unsaved.update(seqs)

    def _follow_endpoint(self) -> None:
        """The TCP+TLS endpoint where the current policy puts it (`settings.agent_endpoint`), in the
        namespace of the bridges (where the VMs reach it): opened when a policy names one, moved when it
        changes, closed when it goes; an endpoint that could not be opened is tried again every
        ENDPOINT_RETRY seconds. Checked every round (cheap: an attribute read and a compare)."""
        compiled = self.engine.current
        want = compiled.policy.settings.agent_endpoint if compiled else None
        now = self.clock()
        if want == self._endpoint and (want is None or self._endpoint_open or now < self._endpoint_retry):
            return
        if want != self._endpoint and self._endpoint is not None:
            self.hub.close_tls()
            log.info("agents over TLS: endpoint %s:%d closed", self._endpoint[0], self._endpoint[1])
            if want is None:
                self._event("agent-endpoint", None, {"endpoint": None})
        self._endpoint, self._endpoint_open = want, False
        if want is None:
            return
        addr, port = want
        self._endpoint_retry = now + ENDPOINT_RETRY
        try:
            ensure_certificates(self.engine.state_dir, addr)
            context = server_context(self.engine.state_dir)
            ns = NetnsThread(self.engine.netns, name="hyperfence-agent-tls")
            try:
                sock = ns.call(lambda: socket.create_server((str(addr), port), backlog=64))
            finally:
                ns.close()
        except (OSError, ValueError) as e:
            log.error(
                "agent endpoint %s:%d: cannot listen (retried in %g s): %s", addr, port, ENDPOINT_RETRY, e
            )
            self._event("agent-endpoint", None, {"endpoint": f"{addr}:{port}", "error": str(e)[:200]})
            return
        self.hub.listen_tls(sock, context)
        self._endpoint_open = True
        log.info("agents over TLS: listening on %s:%d", addr, port)
        self._event("agent-endpoint", None, {"endpoint": f"{addr}:{port}"})

    def heartbeats(self) -> dict[str, Heartbeat]:
        """The heartbeat policy of every enrolled VM in the current policy (computed once per set of VMs,
        heartbeat entries and enrolled VMs: this runs every round; a change of rules keeps the first two, the
        very objects, so a one-rule change at 10,000 VMs does not make it pass over them all again)."""
        compiled = self.engine.current
        if compiled is None:
            return {}
        enrolled = frozenset(self.tracker.records)
        cache = self._hb_cache
        policy = compiled.policy
        if (
            cache is None
            or cache[0] is not policy.vms
            or cache[4] is not policy.heartbeats
            or cache[1] != enrolled
        ):
            hbs = {
                vm.id: heartbeat_for(compiled.policy, vm)
                for vm in compiled.policy.vms
                if vm.id in self.tracker.records
            }
            cache = self._hb_cache = (
                policy.vms,
                enrolled,
                hbs,
                {v.id: v.name for v in policy.vms},
                policy.heartbeats,
            )
        return cache[2]

    # --- input ------------------------------------------------------------------------------------------

    def _claim(self, vm: str | None, frame: bytes) -> str | None:
        """The VM a new connection's first frame is verified for (see `Hub`): the listener's VM for a unix
        channel; for TLS, one of the VMs the frame names that is enrolled with a TLS channel."""
        with self.lock:
            if vm is not None:
                rec = self.tracker.records.get(vm)
                ok = rec is not None and rec.channel.get("type") == "unix"
                return vm if ok and self.tracker.verify_claim(vm, frame) else None
            for named in wire.named_vms(frame):
                rec = self.tracker.records.get(named)
                tls = rec is not None and rec.channel.get("type") == "tls"
                if tls and self.tracker.verify_claim(named, frame):
                    return named
        return None

    def _on_frame(self, vm: str, frame: bytes) -> None:
        now = self.clock()
        try:
            with self.lock:
                result = self.tracker.ingest(vm, frame, now)
            if result.ok:
                self._accepted(vm, result, now)
            else:
                self._refused(vm, result)
        except Exception as e:  # a bug: this frame is lost, the receiver is not
            log.exception("agent channel of VM %s: a message could not be processed", self._name(vm))
            self._on_refused(vm, "error", f"{type(e).__name__} while processing a message")

    def _on_refused(self, vm: str, reason: str, detail: str) -> None:
        with self.lock:
            result = self.tracker.refuse(vm, reason, detail)
        self._refused(vm, result)

    def _refused(self, vm: str, result: Ingested) -> None:
        key = (vm, result.reason)
        now = self.clock()
        if now - self._logged.get(key, 0.0) < LOG_EVERY:
            self._suppressed[key] += 1
            return
        more = self._suppressed.pop(key, 0)
        self._logged[key] = now
        log.warning(
            "agent channel of VM %s: dropped a %s message: %s%s",
            self._name(vm),
            result.reason,
            result.detail,
            f" (and {more} more of this kind in the last {LOG_EVERY:g} s)" if more else "",
        )

    def _accepted(self, vm: str, result: Ingested, now: float) -> None:
        minute = int(now // 60)
        if minute != self._budget_minute:
            self._budget_minute, self._event_budget = minute, Counter()
        if result.kind in ("hello", "bye"):
            self._event(f"agent-{result.kind}", vm, {})
        for ev in result.events:
            self._event_budget[vm] += 1
            if self._event_budget[vm] <= EVENTS_PER_MINUTE:
                self._event(f"agent:{ev['type']}"[:40], vm, ev)
            elif self._event_budget[vm] == EVENTS_PER_MINUTE + 1:
                self._event("agent-events-dropped", vm, {"limit_per_minute": EVENTS_PER_MINUTE})
        if result.metrics:
            self._minute_samples[vm] = result.metrics

    def _event(self, kind: str, vm: str | None, data: dict[str, Any]) -> None:
        with self.lock:
            self._events.append((kind, vm, data))

    # --- actions ------------------------------------------------------------------------------------------

    def _carry_out(self, d: Decision, now: float) -> None:
        name = self._name(d.vm)
        if d.action == "alert":
            log.warning("VM %s: %s", name, d.reason)
            self._event("agent-silent", d.vm, {"reason": d.reason, "action": "alert"})
            return
        if d.action == "release":
            with self.lock:
                self.tracker.release(d.vm, now, manual=False)
            log.info("VM %s released: %s", name, d.reason)
            self._event("released", d.vm, {"reason": d.reason, "by": "auto"})
            self._apply_quarantine()
            return
        how = "isolated"
        if d.action == "pause":
            if self.pause is not None and self.pause(d.vm):
                how = "paused and isolated"
            else:
                how = "isolated (no hypervisor to pause it)"
        with self.lock:
            self.tracker.isolate(d.vm, d.reason, now)
        log.warning("VM %s %s: %s", name, how, d.reason)
        self._event("isolated", d.vm, {"reason": d.reason, "action": d.action, "how": how})
        self._apply_quarantine()

    def heartbeat_overlays(self) -> tuple[Overlay, ...]:
        """This producer's overlays: an isolation for every VM the tracker holds isolated."""
        with self.lock:
            return tuple(
                Overlay(
                    producer=PRODUCER,
                    vm=vm,
                    kind=OverlayKind.ISOLATE,
                    reason=rec.isolated or "heartbeat",
                    since=rec.isolated_since if rec.isolated_since is not None else self.clock(),
                )
                for vm, rec in sorted(self.tracker.records.items())
                if rec.isolated is not None
            )

    def _set_overlays(self) -> bool:
        """Hand the heartbeat producer's overlays to the engine; True when the merge changed. A store error
        leaves them pending: every round tries again."""
        try:
            changed = self.engine.set_overlays(PRODUCER, self.heartbeat_overlays())
        except HyperfenceError as e:
            log.error("heartbeat isolation not stored (retried next round): %s", e)
            self._overlays_pending = True
            return False
        self._overlays_pending = False
        return changed

    def _apply_quarantine(self) -> None:
        if self._set_overlays():
            try:
                self.engine.converge()
            except HyperfenceError as e:  # the next round or the daemon's resync retries
                log.error("could not apply the quarantine: %s", e)
        self.save()

    # --- operator requests (control socket) -------------------------------------------------------------

    def release(self, vm: str) -> dict[str, Any]:
        now = self.clock()
        with self.lock:
            rec = self.tracker.records.get(vm)
            if rec is None:
                raise NotFoundError(f"no agent is enrolled for VM {vm!r}: see `hyperfence vm list`")
            was = rec.isolated
            self.tracker.release(vm, now, manual=True)
        self._event("released", vm, {"by": "operator", "was": was})
        self._apply_quarantine()
        return {"released": was is not None}

    def vm_started(self, vm: str) -> None:
        """The hypervisor started or reset VM `vm` just now (the inventory says so, from any thread): its
        silence counts from the end of its boot grace until its agent speaks (`Tracker.vm_started`). Called
        before the VM joins the policy, so no round sees it running without it."""
        now = self.clock()
        with self.lock:
            self.tracker.vm_started(vm, now)
            enrolled = vm in self.tracker.records
        if enrolled:
            log.info("VM %s started: its agent has the heartbeat policy's boot grace", self._name(vm))

    def reload(self) -> None:
        """Enrolments changed in the store: new keys and channels (live state of others is kept)."""
        stored = self.engine.store.agents()
        now = self.clock()
        with self.lock:
            for vm, rec in stored.items():
                have = self.tracker.records.get(vm)
                if have is None or have.key != rec.key or have.channel != rec.channel:
                    self.tracker.enroll(rec, now)
        self._resync_channels.set()  # the channels follow on the monitor's thread

    def snapshot(self) -> list[dict[str, Any]]:
        """Per enrolled VM: status, last seen, sequence, agent version, counts, isolation, latest metrics."""
        now = self.clock()
        hbs = self.heartbeats()
        with self.lock:
            out = []
            for vm, rec in sorted(self.tracker.records.items()):
                hb = hbs.get(vm)
                live = self.tracker.live[vm]
                out.append(
                    {
                        "vm": vm,
                        "name": self._name(vm),
                        "status": self.tracker.status(vm, hb, now) if hb else "not in policy",
                        "last_seen": rec.last_seen,
                        "seq": rec.last_seq,
                        "agent": rec.agent,
                        "isolated": rec.isolated,
                        "isolated_since": rec.isolated_since,
                        "heartbeat": None if hb is None else {"id": hb.id, "action": hb.action.value},
                        "counts": dict(live.counts),
                        "metrics": live.samples[-1].as_dict() if live.samples else {},
                        "channel": rec.channel,
                    }
                )
            return out

    # --- persistence -----------------------------------------------------------------------------------

    def save(self) -> None:
        now = self.clock()
        self._last_save = now
        with self.lock:
            records = list(self.tracker.records.values())
            events, self._events = self._events, []
            samples, self._minute_samples = self._minute_samples, {}
        try:
            self.engine.store.save_agents(records)
            if events:
                self.engine.store.add_events(events)
            if samples:
                minute = int(now // 60)
                self.engine.store.add_samples([(vm, minute, m) for vm, m in samples.items()])
        except HyperfenceError as e:
            log.warning("agent state not saved (retried in %g s): %s", SAVE_EVERY, e)
            with self.lock:
                self._events = events + self._events

    def _specs(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {vm: rec.channel for vm, rec in self.tracker.records.items()}

    def _name(self, vm: str) -> str:
        self.heartbeats()  # refreshes the name table with the policy
        return self._hb_cache[3].get(vm, vm) if self._hb_cache is not None else vm


VIRTIO_PORT_NAME = "org.hyperfence.agent.0"


def enroll(
    engine: Engine, vm: Vm, kind: str, *, interval: float, host_path: str | None = None
) -> tuple[AgentRecord, dict[str, Any]]:
    """A new key for `vm` in the store (replacing any earlier one), and the agent's config for it.

    `kind`: "unix" (the host listens on a unix socket the agent connects to: lab VMs, processes on this
    filesystem) or "virtio" (libvirt guests: QEMU's end of the VM's virtio-serial port, which the host
    connects to; the agent opens the port by name). `host_path`: the unix socket's path when it is not
    hyperfence's choice (a domain's `<channel>` source)."""
    sock = host_path or os.path.join(channels_dir(engine.state_dir), f"{vm_sid(vm.id)}.sock")
    if kind == "unix":
        host: dict[str, Any] = {"type": "unix", "path": sock}
        guest: dict[str, Any] = {"type": "unix", "path": sock}
    elif kind == "virtio":
        host = {"type": "virtio", "path": sock}
        guest = {"type": "virtio", "name": VIRTIO_PORT_NAME}
    elif kind == "tls":
        compiled = engine.current or engine.compiled()
        endpoint = compiled.policy.settings.agent_endpoint if compiled else None
        if endpoint is None:
            raise InvalidInputError(
                "channel tls needs settings.agent_endpoint (ADDRESS:PORT) in the policy: the address the "
                "VMs reach the host at"
            )
        addr, port = endpoint
        ca = ensure_certificates(engine.state_dir, addr) / "ca.pem"
        host = {"type": "tls"}
        guest = {"type": "tls", "host": str(addr), "port": port, "ca": str(ca), "server_name": str(addr)}
    else:
        raise InvalidInputError(f"channel {kind!r} is not supported (expected unix, virtio or tls)")
    rec = AgentRecord(vm=vm.id, key=new_key(), channel=host)
    engine.store.enroll_agent(rec)
    config = {"version": 1, "vm": vm.id, "key": rec.key.hex(), "interval": interval, "channel": guest}
    return rec, config
