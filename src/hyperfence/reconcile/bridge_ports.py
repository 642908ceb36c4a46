"""Notice a network device that joins a managed bridge while the daemon runs.

The policy declares the bridge ports that lead to a physical network (`networks[].uplinks`); any other
network device on a managed bridge gets nothing (fail closed), which for a NIC the host reaches its network
through cuts the host off. Applying a policy that forgets one is refused (`Engine.converge`); one that joins
later is reported loudly instead: `BridgePortWatcher.run(stop)` listens to the link events of the bridges'
namespace and, on any (a port added or removed, a device created), reads the bridges' ports again
(`Engine.refresh_devices`): a new undeclared device is an `undeclared-device` event, a warning in the daemon's
log and a line of `hyperfence status`. It stays without traffic until the operator declares it. Level-
triggered like the address watch (events are not parsed; a burst is one read); opening the watch reads once;
the daemon's supervisor restarts it with backoff, and every full resync reads the ports too (the safety net).

A declared VM whose port joins a bridge gets its chains at once (a converge; until it lands, the guard drops
what an unknown port sends: fail closed), and a VM whose port leaves loses them (`Engine.local_only`: only
the VMs on this host's bridges get chains).

While a new policy version is refused (it would cut a device off; one-shot engines only), each link change
asks for a full converge (`on_change`): taking the device off the bridge lifts the refusal at once. The
daemon passes such a device as a provisional uplink instead (`Engine.converge`); when it leaves its bridge,
a converge takes it out of the ruleset at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hyperfence.adapters.bridge_ports import LinkWatch
from hyperfence.errors import HyperfenceError
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.host_addresses import Watch
from hyperfence.reconcile.supervisor import wake_fd

log = logging.getLogger("hyperfence.ports")

READ_TIMEOUT = 0.5  # how often the loop looks at `stop` while nothing happens


class BridgePortWatcher:
    name = "ports"  # a monitor (reconcile/monitor.py)

    def __init__(
        self,
        engine: Engine,
        *,
        on_change: Callable[[str], None],
        open_watch: Callable[[], Watch] | None = None,
    ) -> None:
        self.engine = engine
        self.on_change = on_change
        self.open_watch: Callable[[], Watch] = open_watch or (lambda: LinkWatch(engine.netns))

    def run(self, stop: threading.Event) -> None:
        watch = self.open_watch()
        try:
            self.refresh()
            wake = wake_fd(stop)  # the daemon's stop ends a wait at once
            while not stop.is_set():
                if watch.wait(READ_TIMEOUT, wake=wake):
                    self.refresh()
        finally:
            watch.close()

    def refresh(self) -> None:
        """Read the bridges' ports and report what changed; converge when a declared VM's port came or went
        (it gets its chains here, or they go: `Engine.local_only`); while a policy version is refused, ask
        for a full converge (the refusal may be over)."""
        self.engine.refresh_devices()
        if self.engine.local_stale:
            try:
                self.engine.converge(cause="a VM's port joined or left a bridge")
            except HyperfenceError as e:  # the next link event or full resync tries again
                log.error("converge after a VM's port joined or left a bridge failed: %s", e)
        if self.engine.refused_key is not None:
            self.on_change("the bridges' ports changed while a policy version is refused")
        elif self.engine.provisional_stale:
            self.on_change("a provisional uplink left its bridge")
