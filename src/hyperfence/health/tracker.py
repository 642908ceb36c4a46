"""Per-VM agent state on the host: what each agent said, what was refused, and what to do about silence.

Pure: time comes in as `now` (host clock, seconds since the epoch); nothing here does I/O. The monitor
(`reconcile/agents.py`) feeds it frames from the channels and carries out its decisions.

Trust: identity comes from the channel (the caller says which VM's channel a frame came in on); the frame
must verify with that VM's key and name that VM; its seq must be above the last accepted one. Every refusal
is counted per VM and reason. A VM's messages beyond a token bucket are counted as `flood` and dropped before
their MAC is even computed, so one VM cannot eat the receiver. Nothing a VM sends can change another VM's
state: every method takes the channel's VM id.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from hyperfence import wire
from hyperfence.model.policy import Heartbeat, Release, SilenceAction

REASONS = (
    "accepted",
    "forged",
    "replayed",
    "malformed",
    "oversized",
    "version",
    "flood",
    "truncated",
    "error",  # processing the message failed unexpectedly (a bug): dropped, counted, logged
)
MAX_EVENTS_PER_MESSAGE = 50
MAX_METRICS = 64
SAMPLES_KEPT = 60  # in memory per VM: a minute at 1 s
RELEASE_AFTER_BEATS = 2  # consecutive accepted messages before an automatic release


@dataclass
class AgentRecord:
    """What is kept in the store per enrolled VM (survives a daemon restart)."""

    vm: str  # the VM id
    key: bytes
    channel: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0
    last_seen: float | None = None  # host time of the last accepted message
    agent: str | None = None  # agent version, from its hello
    isolated: str | None = None  # why it is isolated (None: it is not)
    isolated_since: float | None = None
    released_at: float | None = None  # last manual release: silence is counted from here


@dataclass(frozen=True, slots=True)
class Sample:
    """One resource report, compact: the metric names are shared with the VM's previous sample when they
    are the same (they almost always are), the values are one array of doubles (~0.5 KB for 40 metrics,
    against ~4 KB as a dict: 500 VMs x 60 samples stay ~15 MB)."""

    t: float
    names: tuple[str, ...]
    values: array[float]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values, strict=True))


@dataclass
class Live:
    """What is kept in memory only."""

    counts: Counter[str] = field(default_factory=Counter)
    tokens: float = 0.0
    tokens_at: float = 0.0
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    good: int = 0  # consecutive accepted messages
    alerted: bool = False  # an alert was raised for the current silence


@dataclass(frozen=True)
class Ingested:
    reason: str  # one of REASONS
    detail: str = ""
    kind: str | None = None  # hello | beat | bye when accepted
    events: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.reason == "accepted"


@dataclass(frozen=True)
class Decision:
    vm: str
    action: str  # isolate | pause | alert | release
    reason: str


class Tracker:
    def __init__(
        self,
        records: dict[str, AgentRecord],
        *,
        started: float,
        startup_grace: float = 15.0,
        rate: float = 20.0,
        burst: float = 700.0,
    ) -> None:
        """`records` by VM id (enrolled VMs). `startup_grace`: after `started`, no VM is called silent until
        its agent had time to reconnect. `rate`/`burst`: messages per second a VM may send (a reconnecting
        agent flushes its backlog, up to ~600 messages, at once)."""
        self.records = records
        self.live: dict[str, Live] = {vm: Live(tokens=burst, tokens_at=started) for vm in records}
        self.started = started
        self.startup_grace = startup_grace
        self.rate = rate
        self.burst = burst
        self.unsaved: set[str] = set()  # VMs whose last_seq advanced since `take_unsaved`
        # When each VM last started or was reset, as the hypervisor reported it (see `vm_started`). In memory
        # only: a restarted daemon has its startup grace instead.
        self.booted: dict[str, float] = {}

    # --- input ------------------------------------------------------------------------------------

    def ingest(self, vm: str, frame: bytes, now: float) -> Ingested:
        """One frame (without its length prefix) from VM `vm`'s channel. Everything is checked and computed
        before any state changes, so a refused frame changes nothing but its VM's counts."""
        rec = self.records.get(vm)
        if rec is None:
            return Ingested("forged", f"no agent is enrolled for VM {vm!r}")
        live = self.live[vm]
        if not self._take_token(live, now):
            return self._count(vm, Ingested("flood", f"more than {self.rate:g} messages/s"))
        try:
            body = wire.verify(rec.key, frame, vm)
        except wire.WireError as e:
            return self._count(vm, Ingested(e.reason, e.detail))
        seq = body["seq"]
        if seq <= rec.last_seq:
            return self._count(vm, Ingested("replayed", f"seq {seq} is not above {rec.last_seq}"))
        kind, data = body["kind"], body["data"]
        agent = data.get("agent") if kind == "hello" else None
        events = _events(data.get("events")) if kind == "beat" else ()
        metrics = _metrics(data.get("res")) if kind == "beat" else None
        rec.last_seq = seq
        rec.last_seen = now
        self.unsaved.add(vm)
        live.good += 1
        live.alerted = False
        if isinstance(agent, str):
            rec.agent = agent[:40]
        if metrics:
            names = tuple(metrics)
            if live.samples and live.samples[-1].names == names:
                names = live.samples[-1].names
            live.samples.append(Sample(now, names, array("d", metrics.values())))
        return self._count(vm, Ingested("accepted", kind=kind, events=events, metrics=metrics))

    def verify_claim(self, vm: str, frame: bytes) -> bool:
        """Does `frame` prove that its sender holds `vm`'s key, and is it fresh (MAC, body, seq above the last
        accepted one)? Changes nothing: a connection becomes a VM's channel only on a True, and a stranger's
        claim must not touch the VM's counts, budget or run of good beats."""
        rec = self.records.get(vm)
        if rec is None:
            return False
        try:
            body = wire.verify(rec.key, frame, vm)
        except wire.WireError:
            return False
        return bool(body["seq"] > rec.last_seq)

    def take_unsaved(self) -> dict[str, int]:
        """The sequence numbers accepted since the last call (VM id -> last seq): the caller makes them
        durable before anything that follows from those frames leaves this process."""
        out = {vm: self.records[vm].last_seq for vm in self.unsaved if vm in self.records}
        self.unsaved.clear()
        return out

    def refuse(self, vm: str, reason: str, detail: str) -> Ingested:
        """A refusal found by the channel itself (an oversized length, a frame cut by a closed channel)."""
        return self._count(vm, Ingested(reason, detail))

    def _count(self, vm: str, result: Ingested) -> Ingested:
        live = self.live.get(vm)
        if live is not None:
            live.counts[result.reason] += 1
            if not result.ok:
                live.good = 0
        return result

    def _take_token(self, live: Live, now: float) -> bool:
        live.tokens = min(self.burst, live.tokens + max(0.0, now - live.tokens_at) * self.rate)
        live.tokens_at = now
        if live.tokens < 1.0:
            return False
        live.tokens -= 1.0
        return True

    # --- state ------------------------------------------------------------------------------------

    def enroll(self, rec: AgentRecord, now: float) -> None:
        self.records[rec.vm] = rec
        self.live[rec.vm] = Live(tokens=self.burst, tokens_at=now)

    def vm_started(self, vm: str, now: float) -> None:
        """VM `vm` started, or was reset, at `now`: it was not silent while it was off. Until its agent's
        first message after `now`, its silence is counted from the end of its heartbeat policy's
        `boot_grace`. Also for VMs without an agent (yet): an enrolment may follow."""
        self.booted[vm] = now
        live = self.live.get(vm)
        if live is not None:
            live.good = 0
            live.alerted = False

    def is_booting(self, vm: str) -> bool:
        """Has `vm` started (or been reset) since its agent's last message?"""
        booted = self.booted.get(vm)
        last_seen = self.records[vm].last_seen
        return booted is not None and (last_seen is None or last_seen < booted)

    def quiet_for(self, vm: str, hb: Heartbeat, now: float) -> float:
        """Seconds of silence that count: since the last message, a manual release, the end of the startup
        grace, or, while the VM has not spoken since it last started, the end of its boot grace; whichever
        is latest."""
        rec = self.records[vm]
        since = [rec.last_seen, rec.released_at, self.started + self.startup_grace]
        if self.is_booting(vm):
            since.append(self.booted[vm] + hb.boot_grace)
        return max(0.0, now - max(x for x in since if x is not None))

    def status(self, vm: str, hb: Heartbeat, now: float) -> str:
        """ok | late (a beat is overdue) | silent (`misses` beats missed) | booting (started or reset, its
        agent not heard since, not silent yet) | never (not seen yet, in grace)."""
        rec = self.records[vm]
        quiet = self.quiet_for(vm, hb, now)
        if quiet > hb.silent_after:
            return "silent"
        if self.is_booting(vm):
            return "booting"
        if rec.last_seen is None:
            return "never"
        return "late" if now - rec.last_seen > hb.interval * 1.5 else "ok"

    def decide(self, heartbeats: dict[str, Heartbeat], now: float) -> list[Decision]:
        """What to do now, for every enrolled VM with a heartbeat policy (VMs not in `heartbeats` are not in
        the current policy: left alone). Level-triggered: an isolated VM is not isolated again."""
        out: list[Decision] = []
        for vm, hb in sorted(heartbeats.items()):
            if vm not in self.records:
                continue
            rec, live, status = self.records[vm], self.live[vm], self.status(vm, hb, now)
            if status == "silent":
                quiet = self.quiet_for(vm, hb, now)
                if self.is_booting(vm):
                    up = math.floor(now - self.booted[vm])
                    seen = f"not heard since the VM started {up} s ago (boot grace {hb.boot_grace:g} s)"
                else:
                    seen = "never seen" if rec.last_seen is None else f"silent for {math.floor(quiet)} s"
                why = f"agent {seen} (policy {hb.id}: {hb.misses} x {hb.interval:g} s)"
                if hb.action is SilenceAction.ALERT:
                    if not live.alerted:
                        live.alerted = True
                        out.append(Decision(vm, "alert", why))
                elif rec.isolated is None:
                    out.append(Decision(vm, hb.action.value, why))
            elif (
                rec.isolated is not None
                and hb.release is Release.AUTO
                and status == "ok"
                and live.good >= RELEASE_AFTER_BEATS
            ):
                out.append(Decision(vm, "release", f"agent beats again ({live.good} in a row)"))
        return out

    def isolate(self, vm: str, reason: str, now: float) -> None:
        rec = self.records[vm]
        rec.isolated, rec.isolated_since = reason, now
        self.live[vm].good = 0

    def release(self, vm: str, now: float, *, manual: bool) -> None:
        rec = self.records[vm]
        rec.isolated, rec.isolated_since = None, None
        if manual:
            rec.released_at = now

    def isolated(self) -> frozenset[str]:
        return frozenset(vm for vm, rec in self.records.items() if rec.isolated is not None)


def _events(raw: Any) -> tuple[dict[str, Any], ...]:
    """The guest's security events, bounded: at most MAX_EVENTS_PER_MESSAGE small flat objects."""
    if not isinstance(raw, list):
        return ()
    out: list[dict[str, Any]] = []
    for item in raw[:MAX_EVENTS_PER_MESSAGE]:
        if isinstance(item, dict) and isinstance(item.get("type"), str):
            out.append(
                {
                    str(k)[:40]: v if isinstance(v, int | float | bool) or v is None else str(v)[:200]
                    for k, v in list(item.items())[:16]
                }
            )
    if len(raw) > MAX_EVENTS_PER_MESSAGE:
        out.append({"type": "truncated", "count": len(raw) - MAX_EVENTS_PER_MESSAGE})
    return tuple(out)


def _metrics(raw: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numbers from the guest's resource report, flattened (`net.eth0.rx_bytes`), at most MAX_METRICS."""
    out: dict[str, float] = {}
    if not isinstance(raw, dict) or depth > 2:
        return out
    for k, v in raw.items():
        if len(out) >= MAX_METRICS:
            break
        name = f"{prefix}{str(k)[:32]}"
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out[name] = float(v)
        elif isinstance(v, dict):
            for sub, val in _metrics(v, name + ".", depth + 1).items():
                if len(out) >= MAX_METRICS:
                    break
                out[sub] = val
    return out
