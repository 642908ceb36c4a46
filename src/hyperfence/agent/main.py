"""The agent's loop and command line.

    hyperfence-agent --config FILE     run: hello, a beat every interval, bye on SIGTERM/SIGINT
    hyperfence-agent --once            one sample (res + events of a first interval) as JSON on stdout
    hyperfence-agent --version

Messages (see wire.py for the frame): hello {agent, python, interval, boot, pid}; beat {res, events, dropped,
dropped_total}; bye {reason}. `dropped` counts frames the backlog dropped since the previous beat,
`dropped_total` since the agent started (so a lost beat does not lose the count).

Clock reads live here only (`SystemClock`); everything else gets times passed in, and tests drive `Agent`
with a fake clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Protocol

from hyperfence import wire
from hyperfence.agent import AGENT_VERSION
from hyperfence.agent.channel import Channel, Transport, make_transport
from hyperfence.agent.collect import Collector
from hyperfence.agent.config import Config, ConfigError, load_config
from hyperfence.agent.sockets import Sock, SocketTable
from hyperfence.agent.watch import Watcher, cap_events

log = logging.getLogger("hyperfence.agent")
ERROR_EVERY = 60.0  # seconds between two collector_error events of the same collector
BYE_GRACE = 2.0  # seconds spent delivering the bye (and what is queued) at stop
SEQ_RESERVE = 600_000  # the state file holds a bound this far above the last seq: one write per ~10 min


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (the message's informational `t` and the seq)."""

    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Wait until `event` is set or `seconds` passed; True if it is set."""


class SystemClock:
    def now(self) -> float:
        return time.time()  # noqa: TID251 - the agent's one wall-clock read (the seq is milliseconds of it)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))


class SeqStore:
    """Sequence numbers that never repeat across restarts. Without a state file they rely on the clock
    (`wire.next_seq`: milliseconds). With one, the file holds a bound above every seq used; it is rewritten
    (atomically, fsynced) BEFORE a seq beyond the bound is used, to seq + SEQ_RESERVE, so a restart starts
    above it even if the clock went back, and the file is written about once per ten minutes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.last = 0
        self.high = 0
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    value = json.load(f)["seq"]
                if not isinstance(value, int):
                    raise TypeError("seq is not an integer")
                self.last = self.high = value
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("state file %s unreadable (%s); seqs rely on the clock", path, e)

    def next(self, now: float) -> int:
        seq = wire.next_seq(self.last, now)
        if self.path and seq > self.high:
            self._save(seq + SEQ_RESERVE)
        self.last = seq
        return seq

    def _save(self, high: int) -> None:
        assert self.path is not None  # noqa: S101 - callers check
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "seq": high}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.high = high
        except OSError as e:
            log.warning(
                "cannot write state file %s (%s); a restart may reuse seqs if the clock goes back",
                self.path,
                e,
            )
            self.high = high  # warn once per reserve, not every beat


def read_boot_id(root: str = "/") -> str:
    try:
        with open(os.path.join(root, "proc/sys/kernel/random/boot_id"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class Agent:
    """hello, then `beat()` every interval, then bye. Owns the collectors, the watcher and the channel."""

    def __init__(self, config: Config, *, clock: Clock, transport: Transport, root: str = "/") -> None:
        self.config = config
        self.clock = clock
        self.root = root
        self.collector = Collector(root)
        self.sockets = SocketTable(root)
        self.watcher = Watcher(root=root, auth_logs=config.auth_logs)
        self.channel = Channel(
            transport,
            backlog=config.backlog,
            monotonic=clock.monotonic,
            send_timeout=min(5.0, max(1.0, config.interval)),
        )
        self.seqs = SeqStore(config.state)
        self.stop = threading.Event()
        self.stop_reason = "stopped"
        self.beats = 0
        self._error_at: dict[str, float] = {}
        self._carry: list[dict[str, Any]] = []

    def run(self) -> None:
        """Until `stop` is set (a signal handler sets it)."""
        self.hello()
        interval = self.config.interval
        next_at = self.clock.monotonic() + interval
        while not self.stop.is_set():
            if self.clock.wait(self.stop, next_at - self.clock.monotonic()):
                break
            now = self.clock.monotonic()
            next_at += interval
            if next_at <= now:  # fell behind (a stalled send, a suspended guest): skip, do not burst
                next_at = now + interval
            try:
                self.beat()
            except Exception as e:  # never die in the loop; the next beat tries again
                log.error("beat failed: %s: %s", type(e).__name__, e)
        self.bye(self.stop_reason)

    def hello(self) -> None:
        """Baselines first (so the first beat has real deltas, and what changes during its interval is
        already news), then the hello; the existing listeners go out in the first beat, flagged initial."""
        self.collector.prime(now=self.clock.monotonic())
        try:
            sockets: list[Sock] | None = self.sockets.read()
        except Exception:  # reported by the first beat, which reads them again
            sockets = None
        self._carry = self.sample_events(sockets)
        data = {
            "agent": AGENT_VERSION,
            "python": ".".join(str(v) for v in sys.version_info[:3]),
            "interval": self.config.interval,
            "boot": read_boot_id(self.root),
            "pid": os.getpid(),
        }
        self.send("hello", data)
        log.info(
            "started: vm %s, channel %s, every %gs",
            self.config.vm,
            self.channel.transport.name,
            self.config.interval,
        )

    def beat(self) -> None:
        res, events = self.sample()
        dropped = self.channel.take_dropped()
        data = {"res": res, "events": events, "dropped": dropped, "dropped_total": self.channel.dropped_total}
        self.send("beat", data)
        self.beats += 1

    def sample(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(res, events) for one interval; a collector that fails is left out and reported as an event."""
        errors: list[tuple[str, str]] = []
        sockets: list[Sock] | None = None
        try:
            sockets = self.sockets.read()
        except Exception as e:
            errors.append(("sockets", f"{type(e).__name__}: {e}"[:200]))
        res, more = self.collector.sample(now=self.clock.monotonic(), sockets=sockets)
        errors.extend(more)
        events, self._carry = [*self._carry, *self.sample_events(sockets, errors)], []
        now = self.clock.monotonic()
        for what, error in errors:
            last = self._error_at.get(what)
            if last is None or now - last >= ERROR_EVERY:
                self._error_at[what] = now
                events.insert(0, {"type": "collector_error", "what": what, "error": error})
        return res, cap_events(events)

    def sample_events(
        self, sockets: list[Sock] | None, errors: list[tuple[str, str]] | None = None
    ) -> list[dict[str, Any]]:
        try:
            return self.watcher.events(sockets if sockets is not None else [])
        except Exception as e:
            if errors is not None:
                errors.append(("watch", f"{type(e).__name__}: {e}"[:200]))
            return []

    def bye(self, reason: str) -> None:
        try:
            self.send("bye", {"reason": reason})
            end = self.clock.monotonic() + BYE_GRACE
            never = threading.Event()
            while self.channel.queue:
                now = self.clock.monotonic()
                if now >= end:
                    break
                self.clock.wait(never, min(end - now, max(0.05, self.channel.retry_at - now)))
                self.channel.flush()
            if self.channel.queue:
                log.warning("stopping with %d message(s) undelivered", len(self.channel.queue))
        finally:
            self.channel.close()
            self.watcher.close()
            log.info("stopped (%s)", reason)

    def send(self, kind: str, data: dict[str, Any]) -> None:
        now = self.clock.now()
        body = wire.message(self.config.vm, self.seqs.next(now), kind, data, now)
        try:
            frame = wire.encode(self.config.key, body)
        except wire.WireError as e:  # a beat too big for a frame: send what fits
            log.error("%s not sent: %s", kind, e)
            events = data.get("events", [])
            small = {"res": {}, "events": [{"type": "dropped", "count": len(events)}], "dropped": 0}
            frame = wire.encode(self.config.key, {**body, "data": small})
        self.channel.push(frame)
        self.channel.flush()


def sample_once(*, root: str = "/", settle: float = 0.2) -> dict[str, Any]:
    """One sample as `--once` prints it: the deltas cover `settle` seconds; events are the first interval's
    (every listener, flagged initial)."""
    collector, watcher, table = Collector(root), Watcher(root=root), SocketTable(root)
    collector.prime(now=time.monotonic())
    time.sleep(settle)
    sockets = table.read()
    res, errors = collector.sample(now=time.monotonic(), sockets=sockets)
    events = watcher.events(sockets)
    events += [{"type": "collector_error", "what": w, "error": e} for w, e in errors]
    return {"res": res, "events": events}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperfence-agent", description="hyperfence guest agent")
    parser.add_argument("--config", help="the JSON config written by `hyperfence vm enroll VM`")
    parser.add_argument("--once", action="store_true", help="print one sample as JSON and exit")
    parser.add_argument("--version", action="store_true", help="print the agent's version and exit")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="hyperfence-agent: %(levelname)s %(message)s"
    )
    if args.version:
        print(AGENT_VERSION)
        return 0
    if args.once:
        json.dump(sample_once(), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    if not args.config:
        parser.error("--config FILE is required (or --once / --version)")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"hyperfence-agent: {e}", file=sys.stderr)
        return 2
    agent = Agent(config, clock=SystemClock(), transport=make_transport(config.channel))

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop_reason = signal.Signals(signum).name
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0
