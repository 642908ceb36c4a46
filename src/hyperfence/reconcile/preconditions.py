"""Pick the data plane flavour and keep its kernel preconditions in place (model/kernel.py says which and
why), and say so loudly when they cannot be.

* The flavour: bridge_native wherever the kernel offers bridge conntrack and bridge reject, br_netfilter
  elsewhere, unless the engine's setting forces one (`Engine.use_flavour`). bridge_native needs nothing
  more: br_netfilter is neither loaded nor its sysctl watched. Every re-probe decides again; a change is
  converged at once (`on_change`), as one atomic batch like every change.

* At daemon start, `ensure()` probes the bridges' namespace. br_netfilter missing: `modprobe br_netfilter`;
  still missing, the daemon refuses to start with what to do (a firewall whose allowed connections all time
  out is worse than none that says so). The sysctl off: it is turned on, with a warning and an event.
* While the daemon runs, `tick()` reads the sysctl every `interval` (0.1 s: one small file read in the
  namespace; no kernel event reports a sysctl write) and probes everything again every `reprobe` seconds. A
  precondition that disappears (someone ran `sysctl -w ...=0`, a tuning script, a container runtime) is
  drift like a deleted rule: restored at once (`precondition-repaired` event, warning), or, when it cannot
  be, reported (`precondition-broken` event once per episode, an error in the log, and `status()` says the
  stateful path is broken, which turns the daemon's health red). Never a silent "in sync".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hyperfence.adapters import kernel_probe
from hyperfence.adapters.nft import Nft
from hyperfence.errors import HyperfenceError, KernelError
from hyperfence.model.kernel import CALL_IPTABLES, Capabilities, Flavour, describe, problems
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.monitor import Ticking

log = logging.getLogger("hyperfence.kernel")

INTERVAL = 0.1
REPROBE = 10.0


class Preconditions:
    """The kernel's preconditions, kept in place: a periodic monitor (`reconcile/monitor.py`, `Ticker`)."""

    name = "kernel"

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = INTERVAL,
        reprobe: float = REPROBE,
        probe: Callable[[Nft], Capabilities] = kernel_probe.probe,
        read: Callable[[Nft], bool | None] = kernel_probe.read_call_iptables,
        fix: Callable[[Nft], None] = kernel_probe.set_call_iptables,
        load: Callable[[], str | None] = kernel_probe.load_br_netfilter,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_change = on_change  # the daemon's `repair_now`: converge after a flavour switch
        self.interval = interval
        self.reprobe = reprobe
        self._probe, self._read, self._fix, self._load = probe, read, fix, load
        self._lock = threading.Lock()
        self.caps: Capabilities | None = None
        self.broken: list[str] = []  # what breaks the stateful path now, with what to do
        self.repairs = 0
        self.last_repair: float | None = None  # wall clock
        self._next_probe: float | None = None  # monotonic time of the next full probe (set at the first tick)

    # --- start ---------------------------------------------------------------------------------------

    def ensure(self) -> Capabilities:
        """Probe and put the preconditions in place. KernelError (with what to do) when they cannot be."""
        caps = self._probe(self.engine.nft)
        self.engine.use_flavour(caps)
        if self.engine.flavour is Flavour.BRIDGE_NATIVE:
            self._set(caps)
            if self.broken:  # forced on a kernel without it: refuse to start, like a missing br_netfilter
                raise KernelError(self.broken[0])
            log.info("%s", describe(caps, Flavour.BRIDGE_NATIVE))
            return caps
        if not caps.br_netfilter:
            why = self._load()
            caps = self._probe(self.engine.nft)
            if not caps.br_netfilter:
                raise KernelError(
                    f"{problems(caps, self.engine.netns)[0]} (modprobe br_netfilter: {why or 'loaded'}, "
                    "but the namespace still has no /proc/sys/net/bridge)"
                )
            log.warning("loaded the br_netfilter module: stateful filtering of bridged traffic needs it")
            self.engine.store.add_event(
                "precondition-repaired", {"what": "br_netfilter", "was": "not loaded"}
            )
        if caps.call_iptables is not True:
            self._repair_sysctl()
            caps = self._probe(self.engine.nft)
        self._set(caps)
        log.info("%s", describe(caps, self.engine.flavour))
        return caps

    # --- while running -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """`tick` every `interval` seconds until `stop` (what the daemon runs, through `Ticking`)."""
        Ticking(self).run(stop)

    def tick(self) -> None:
        """One round: re-probe when `reprobe` seconds passed, read the sysctl and restore it if it is off."""
        now = time.monotonic()
        if self._next_probe is None:
            self._next_probe = now + self.reprobe
        elif now >= self._next_probe:
            self._next_probe = now + self.reprobe
            self._set(self._probe(self.engine.nft))
        if self.engine.flavour is Flavour.BRIDGE_NATIVE:  # no sysctl to watch
            return
        if self._read(self.engine.nft) is True:
            if self.broken:
                self._set(self._probe(self.engine.nft))
            return
        try:
            self._repair_sysctl()
        except KernelError as e:
            self._report_broken(str(e))
            return
        self._set(self._probe(self.engine.nft))

    def _repair_sysctl(self) -> None:
        was = self._read(self.engine.nft)
        if was is None:
            raise KernelError(problems(Capabilities(False, False, False, None), self.engine.netns)[0])
        self._fix(self.engine.nft)
        if self._read(self.engine.nft) is not True:
            raise KernelError(f"{CALL_IPTABLES}=1 was written but reads back as 0")
        with self._lock:
            self.repairs += 1
            self.last_repair = time.time()
        where = self.engine.netns or "the host's namespace"
        log.warning(
            "%s was 0 in %s: set it back to 1 (without it the replies of allowed flows between VMs are dropped)",
            CALL_IPTABLES,
            where,
        )
        self.engine.store.add_event("precondition-repaired", {"what": CALL_IPTABLES, "was": "0"})

    def _report_broken(self, error: str) -> None:
        first = not self.broken
        with self._lock:
            self.broken = [error]
        if first:
            log.error("the stateful path is broken: %s", error)
            self.engine.store.add_event("precondition-broken", {"error": error[:1000]})

    def _set(self, caps: Capabilities) -> None:
        if self.engine.use_flavour(caps) and self.on_change is not None:
            self.on_change(f"data plane {self.engine.flavour.value}")
        found = problems(caps, self.engine.netns, self.engine.flavour)
        if found and not self.broken:
            self._report_broken(found[0])
        with self._lock:
            self.caps = caps
            self.broken = found

    def status(self) -> dict[str, Any]:
        """For the daemon's `status`: the capabilities, whether the stateful path holds, the repairs."""
        with self._lock:
            caps = self.caps
            flavour = self.engine.flavour if caps is not None else None
            return {
                **(caps.as_dict() if caps is not None else {}),
                "flavour": flavour.value if flavour is not None else None,
                "summary": describe(caps, flavour) if caps is not None and flavour is not None else None,
                "stateful": "broken" if self.broken else ("ok" if caps is not None else "unknown"),
                "problems": list(self.broken),
                "repairs": self.repairs,
                "last_repair": self.last_repair,
            }


def check(engine: Engine) -> tuple[Capabilities, list[str]]:
    """For the CLI (`ruleset show`, `ruleset diff`): probe, decide the engine's flavour, change nothing in
    the kernel."""
    try:
        caps = kernel_probe.probe(engine.nft)
    except HyperfenceError as e:
        raise KernelError(f"could not probe the kernel: {e}") from None
    engine.use_flavour(caps)
    return caps, problems(caps, engine.netns, engine.flavour)
