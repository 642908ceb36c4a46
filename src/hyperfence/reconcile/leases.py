"""Learn the addresses of VMs that take them from DHCP (`Vm.learns`), and release them.

`LeaseLearner.run(stop)` reads the NFLOG group `settings.learn_group` in the bridges' namespace. The kernel
logs there only (`ruleset/compile.py`): the DHCP answers a learning VM's ingress rules accept from a server
its `dhcp` rules name (the first packet of a flow right before the rule that accepts it, a renewal's answer
before the established shortcut), and what such a VM sends to a server's port. Each frame is decoded with
bounds (`codec/bootp.py`) and judged (`policy/leases.py`): a DHCPACK for the VM's MAC teaches its address
until the lease ends; a DHCPRELEASE from the VM or a DHCPNAK to it gives addresses back. Every change is
stored (leases survive a daemon restart until they end), recorded as an event of the VM (`lease-learned`,
`lease-released`, `lease-expired`, `lease-ignored`), handed to the engine as an input next to the policy
(`Engine.set_leases`) and converged. An address that goes away also loses its connections (conntrack).

`LibvirtLeases` is the second source, libvirt's lease lists, read by the inventory watcher at each of its
reads (`--libvirt`). Both write the same learned addresses, one read-modify-write at a time (`engine.lock`).

Level-triggered where it can be: every round also drops leases that ended (`GRACE_SECONDS` after their end)
and leases of VMs that left the policy or now declare their addresses, whatever frames came.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from hyperfence.adapters.conntrack import forget_flows
from hyperfence.adapters.nflog import NflogReader
from hyperfence.codec.bootp import MalformedDhcpError, parse_dhcp
from hyperfence.codec.libvirt_xml import NetworkLeases
from hyperfence.codec.nflog import NflogPacket
from hyperfence.errors import HyperfenceError
from hyperfence.model.lease import Lease, LeaseSource
from hyperfence.model.policy import Policy, Settings, Vm
from hyperfence.policy.leases import (
    Ignored,
    Learned,
    LeaseSync,
    Released,
    expire,
    from_libvirt,
    lease_problem,
    next_expiry,
    read_message,
    with_lease,
    without,
)
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.supervisor import wake_fd
from hyperfence.ruleset.compile import LOG_PREFIX, vm_sid

log = logging.getLogger("hyperfence.leases")

LEARN_COPY = 1500  # bytes copied of each logged frame: a whole DHCP message (the options are at its end)
READ_TIMEOUT = 0.5  # the longest wait for frames before the round looks at expiry and `stop`

Event = tuple[str, str | None, dict[str, Any]]


class Reader(Protocol):
    group: int

    def read(self, timeout: float | None, *, wake: int | None = None) -> list[NflogPacket]: ...
    def close(self) -> None: ...


def when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class LeaseLearner:
    name = "leases"  # a monitor (reconcile/monitor.py)

    def __init__(
        self,
        engine: Engine,
        *,
        open_reader: Callable[[int], Reader] | None = None,
        cut_flows: Callable[[Iterable[Any]], int] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = engine.clock
        self.open_reader: Callable[[int], Reader] = open_reader or (
            lambda group: NflogReader(group, netns=engine.netns, copy_range=LEARN_COPY)
        )
        self.cut_flows: Callable[[Iterable[Any]], int] = cut_flows or (
            lambda ips: forget_flows(engine.netns, ips)
        )
        self.malformed = 0  # frames that were not one well-formed DHCP message
        self._present: dict[str, str] | None = None  # learning VM id -> its MAC, as the last round saw them

    def run(self, stop: threading.Event) -> None:
        reader = self.open_reader(self._group())
        wake = wake_fd(stop)  # the daemon's stop ends a read at once
        try:
            self.tick()
            while not stop.is_set():
                if reader.group != self._group():  # the policy moved the learn group
                    reader.close()
                    reader = self.open_reader(self._group())
                self.handle(reader.read(self._timeout(), wake=wake))
                self.tick()
        finally:
            reader.close()

    def _group(self) -> int:
        compiled = self.engine.current
        return compiled.policy.settings.learn_group if compiled is not None else Settings().learn_group

    def _timeout(self) -> float:
        due = next_expiry(self.engine.leases)
        return READ_TIMEOUT if due is None else max(0.0, min(READ_TIMEOUT, due - self.clock()))

    # --- frames ---------------------------------------------------------------------------------------

    def handle(self, packets: list[NflogPacket]) -> bool:
        """Learn from (or release by) the logged frames; True when the learned addresses changed."""
        if not packets:
            return False
        with self.engine.lock:  # one read-modify-write of the leases at a time (libvirt's lists too)
            return self._handle(packets)

    def _handle(self, packets: list[NflogPacket]) -> bool:
        compiled = self.engine.current
        if compiled is None:
            return False
        policy = compiled.policy
        learners = {vm_sid(vm.id): vm for vm in policy.vms if vm.learns}
        leases = self.engine.leases
        events: list[Event] = []
        released: list[Lease] = []
        now = self.clock()
        for pkt in packets:
            parts = pkt.prefix.split(":", 4)
            if len(parts) != 5 or parts[0] != LOG_PREFIX or parts[3] != "learn":
                continue
            vm = learners.get(parts[1])
            if vm is None:  # a frame logged under a policy that had this VM learn; it no longer does
                continue
            try:
                msg = parse_dhcp(pkt.payload)
            except MalformedDhcpError as e:
                self.malformed += 1
                log.warning("VM %s: a DHCP frame that cannot be read: %s", vm.name, e)
                continue
            outcome = read_message(vm, msg, inbound=parts[2] == "in", now=now)
            match outcome:
                case Learned(lease):
                    leases = self._learned(policy, vm, leases, lease, events)
                case Released(vm_id, ip, reason):
                    gone = [le for le in leases if le.vm == vm_id and (ip is None or le.ip == ip)]
                    leases = without(leases, vm_id, ip)
                    released.extend(gone)
                    events.extend(
                        ("lease-released", vm_id, {"ip": str(le.ip), "reason": reason}) for le in gone
                    )
                case Ignored(reason):
                    log.debug("VM %s: %s", vm.name, reason)
        return self._commit(leases, events, released)

    def _learned(
        self, policy: Policy, vm: Vm, leases: tuple[Lease, ...], lease: Lease, events: list[Event]
    ) -> tuple[Lease, ...]:
        problem = lease_problem(policy, lease)
        if problem is not None:
            log.warning("VM %s: DHCPACK for %s ignored: %s", vm.name, lease.ip, problem)
            events.append(("lease-ignored", vm.id, {"ip": str(lease.ip), "reason": problem}))
            return leases
        renewed = any(le.vm == lease.vm and le.ip == lease.ip for le in leases)
        events.append(
            (
                "lease-learned",
                vm.id,
                {
                    "ip": str(lease.ip),
                    "expires": when(lease.expires),
                    "seconds": round(lease.expires - lease.learned),
                    "server": None if lease.server is None else str(lease.server),
                    "renewed": renewed,
                },
            )
        )
        return with_lease(leases, lease)

    # --- time and the VMs -----------------------------------------------------------------------------

    def tick(self) -> bool:
        """Drop the leases that ended and those of VMs that left (or now declare their addresses); True when
        the learned addresses changed."""
        with self.engine.lock:  # one read-modify-write of the leases at a time (libvirt's lists too)
            return self._tick()

    def _tick(self) -> bool:
        leases, ended = expire(self.engine.leases, self.clock())
        events: list[Event] = [
            ("lease-expired", le.vm, {"ip": str(le.ip), "ended": when(le.expires)}) for le in ended
        ]
        released = list(ended)
        compiled = self.engine.current
        if compiled is not None:
            present = {vm.id: vm.mac for vm in compiled.policy.vms if vm.learns}
            if self._present is not None:
                for le in leases:
                    if le.vm in self._present and present.get(le.vm) != le.mac:
                        reason = "the VM was removed" if le.vm not in present else "the VM changed"
                        events.append(("lease-released", le.vm, {"ip": str(le.ip), "reason": reason}))
                        released.append(le)
                leases = tuple(le for le in leases if le not in released)
            self._present = present
        return self._commit(leases, events, released)

    def _commit(self, leases: tuple[Lease, ...], events: list[Event], released: list[Lease]) -> bool:
        return commit(self.engine, leases, events, released, self.cut_flows)


def commit(
    engine: Engine,
    leases: tuple[Lease, ...],
    events: list[Event],
    released: list[Lease],
    cut_flows: Callable[[Iterable[Any]], int],
) -> bool:
    """Record `events`, and if the learned addresses changed to `leases`: store them, converge, then cut the
    connections of the addresses that went away. True when they changed. The caller holds `engine.lock`
    from reading `engine.leases` to here (two sources write them: the DHCP learner and libvirt's lists)."""
    if events:
        engine.store.add_events(events)
        for kind, vm, data in events:
            log.info("%s %s: %s", kind, vm, data)
    if not engine.set_leases(leases):
        return False
    engine.store.save_leases(leases)
    try:
        engine.converge()
    except HyperfenceError as e:
        log.error("converge after a lease change failed: %s", e)
    gone = {le.ip for le in released} - {le.ip for le in leases}
    if gone:
        try:
            cut_flows(gone)
        except HyperfenceError as e:
            log.warning("connections of released addresses not cut: %s", e)
    return True


MAX_REPORTED = 1024  # ignored libvirt leases remembered as reported (so each is reported once)


class LibvirtLeases:
    """libvirt's lease lists (`virNetworkGetDHCPLeases` of every active network) as a second source of
    learned addresses, read level-triggered by the inventory watcher (`reconcile/inventory.py`) at each of
    its reads: `sync()` reads them (`read`, bounded and checked in `adapters/libvirt.py`), brings the learned
    addresses in step (`policy/leases.from_libvirt`: which source wins, what is released) and commits like
    the DHCP learner (store, events, converge, cut flows). While libvirt cannot be read, nothing changes."""

    def __init__(
        self,
        engine: Engine,
        read: Callable[[], NetworkLeases],
        *,
        cut_flows: Callable[[Iterable[Any]], int] | None = None,
    ) -> None:
        self.engine = engine
        self.read = read
        self.cut_flows: Callable[[Iterable[Any]], int] = cut_flows or (
            lambda ips: forget_flows(engine.netns, ips)
        )
        self.refused = 0  # lease entries refused (malformed), over all reads
        self._reported: set[tuple[str, str, str]] = set()  # (vm, ip, reason) of ignored leases reported

    def sync(self) -> bool:
        """One read; True when the learned addresses changed."""
        try:
            found = self.read()
        except HyperfenceError as e:
            log.warning("libvirt's lease lists cannot be read (learned addresses kept): %s", e)
            return False
        if found.refused:
            self.refused += len(found.refused)
            log.warning(
                "libvirt lease entries refused: %d (%s)", len(found.refused), "; ".join(found.refused[:3])
            )
        if not found.complete:
            log.warning(
                "libvirt's lease lists were read only in part (a bound was reached): nothing released"
            )
        with self.engine.lock:
            compiled = self.engine.current
            if compiled is None:
                return False
            result = from_libvirt(
                compiled.policy,
                self.engine.leases,
                found.leases,
                complete=found.complete,
                now=self.clock(),
            )
            events = self._events(result)
            return commit(
                self.engine, result.leases, events, [le for le, _ in result.released], self.cut_flows
            )

    def clock(self) -> float:
        return self.engine.clock()

    def _events(self, result: LeaseSync) -> list[Event]:
        events: list[Event] = [
            (
                "lease-learned",
                le.vm,
                {
                    "ip": str(le.ip),
                    "expires": when(le.expires),
                    "seconds": round(le.expires - le.learned),
                    "server": None,
                    "renewed": renewed,
                    "source": LeaseSource.LIBVIRT.value,
                },
            )
            for le, renewed in result.learned
        ]
        events.extend(
            ("lease-released", le.vm, {"ip": str(le.ip), "reason": why, "source": LeaseSource.LIBVIRT.value})
            for le, why in result.released
        )
        reported = set()
        for le, why in result.ignored:
            key = (le.vm, str(le.ip), why)
            reported.add(key)
            if key not in self._reported:
                log.warning("VM %s: libvirt's lease of %s ignored: %s", le.vm, le.ip, why)
                events.append(
                    ("lease-ignored", le.vm, {"ip": str(le.ip), "reason": why, "source": "libvirt"})
                )
        self._reported = reported if len(reported) <= MAX_REPORTED else set()
        return events
