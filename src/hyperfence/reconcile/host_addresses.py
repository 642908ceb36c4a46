"""Keep `host` and `outside` in step with the host's own addresses.

The host's addresses are an input next to the policy (like the VMs discovered from libvirt): the policy
names only the gateways, the kernel knows the rest (the uplink's address, loopback, an address added later).
`HostAddressWatcher.run(stop)` listens to the kernel's IPv4 address and route events in the bridges'
namespace; any event makes it read the addresses again (`Engine.refresh_host_addresses`) and converge when
they changed, so a new address of the host is out of every VM's `outside` within milliseconds. The watch is
level-triggered: events are not parsed, a burst of them is one read. Opening the watch reads once too (what
changed while nobody watched). If the watch fails, the daemon's supervisor restarts it with backoff; the
periodic full resync reads the addresses as well, as the safety net.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from hyperfence.adapters.host_addresses import AddressWatch
from hyperfence.errors import HyperfenceError
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.supervisor import wake_fd

log = logging.getLogger("hyperfence.addresses")

READ_TIMEOUT = 0.5  # how often the loop looks at a plain `stop` Event while nothing happens


class Watch(Protocol):
    def wait(self, timeout: float, *, wake: int | None = None) -> bool: ...
    def close(self) -> None: ...


class HostAddressWatcher:
    name = "addresses"  # a monitor (reconcile/monitor.py)

    def __init__(self, engine: Engine, *, open_watch: Callable[[], Watch] | None = None) -> None:
        self.engine = engine
        self.open_watch: Callable[[], Watch] = open_watch or (lambda: AddressWatch(engine.netns))

    def run(self, stop: threading.Event) -> None:
        watch = self.open_watch()
        try:
            self.refresh()
            wake = wake_fd(stop)
            while not stop.is_set():
                if watch.wait(READ_TIMEOUT, wake=wake):
                    self.refresh()
        finally:
            watch.close()

    def refresh(self) -> bool:
        """Read the host's addresses and converge if they changed; True when they did."""
        if not self.engine.refresh_host_addresses():
            return False
        try:
            self.engine.converge()
        except HyperfenceError as e:
            log.error("converge after the host's addresses changed failed: %s", e)
        return True
