"""VMs from libvirt: domains on managed bridges become policy VMs, kept in step by lifecycle events.

Level-triggered: any event (started, stopped, defined, undefined, NIC added or removed, reset, metadata
changed, a reconnect's `resync`) and a periodic timer make the watcher read every domain again and hand the
engine the VMs it found (`Engine.set_discovered`); the engine converges only when they changed. While libvirt
cannot be read, the last known VMs stay (the kernel keeps their rules). A tap that appears before its VM's
rules are in the kernel is an unknown port on the bridge, and unknown ports get nothing: starting a VM is
fail-closed, whether or not the daemon is running.

The same reads (every event, every `resync` seconds) read libvirt's lease lists (`virNetworkGetDHCPLeases`
of every active network): the addresses of VMs that learn them (no `ips`) can come from there as from their
DHCP exchange (`LibvirtLeases`, docs/policy.md). A network started or stopped is an event too.

Starts and resets are told to `on_boot` (the agent monitor: a VM that was off was not silent, its heartbeat
clock starts with it). A start is seen level-triggered, as a running domain whose libvirt id changed since
the last read (every start gets a new id), before the VM joins the policy; a reset keeps the id, so it
comes from libvirt's reboot event. A running VM whose metadata loses its addresses drops out of the firewall
(its tap gets nothing): that is reported loudly, a warning and an `address-lost` event on the VM.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hyperfence.adapters.libvirt import LibvirtEvents, LibvirtInventory
from hyperfence.codec.libvirt_xml import DomainEvent, DomainInfo, DomainNic, NetworkLeases, VmAction
from hyperfence.errors import HyperfenceError
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.leases import LibvirtLeases
from hyperfence.reconcile.supervisor import on_stop

log = logging.getLogger("hyperfence.inventory")

RESYNC_EVERY = 30.0
_WAKE = DomainEvent("", "", "wake", "")  # put into the queue when the daemon stops


def vm_docs(domains: Iterable[DomainInfo], bridges: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    """Policy `vms` items for the running domains with an interface on a managed bridge (bridge -> network
    name). The first such interface is the VM's port; its id is the domain's UUID."""
    out: list[dict[str, Any]] = []
    for d in domains:
        if not d.is_active:
            continue
        nic = next((n for n in d.interfaces if n.tap and n.bridge in bridges), None)
        if nic is None or nic.bridge is None or nic.tap is None:
            continue
        out.append(
            {
                "name": d.name,
                "id": d.uuid,
                "network": bridges[nic.bridge],
                "port": nic.tap,
                "mac": nic.mac,
                # No address known: the VM learns its addresses from its DHCP leases (`Vm.learns`).
                **({"ips": list(d.ips)} if d.ips else {}),
                "labels": dict(d.labels),  # every label, none reserved (the lab's `lab` and `vm` too)
            }
        )
    return tuple(sorted(out, key=lambda v: str(v["id"])))


def unprotected_nics(
    domains: Iterable[DomainInfo], bridges: Mapping[str, str]
) -> tuple[tuple[DomainInfo, DomainNic], ...]:
    """The NICs on managed bridges that are not a VM's port: every one after a running domain's first. They are
    unknown ports on the bridge, so they get nothing (fail closed); the watcher reports each once."""
    out: list[tuple[DomainInfo, DomainNic]] = []
    for d in domains:
        if not d.is_active:
            continue
        managed = [n for n in d.interfaces if n.tap and n.bridge in bridges]
        out.extend((d, nic) for nic in managed[1:])
    return tuple(out)


def started_domains(before: Mapping[str, int | None], domains: Iterable[DomainInfo]) -> list[DomainInfo]:
    """The running domains that started since the read that gave `before` (UUID -> libvirt id): their id
    is new (every start gets one), or they were not there at all."""
    return [d for d in domains if d.domain_id is not None and before.get(d.uuid) != d.domain_id]


def guarded(domains: Iterable[DomainInfo], bridges: Mapping[str, str]) -> dict[str, DomainInfo]:
    """The running domains with an interface on a managed bridge (the ones that are, or want to be, VMs)."""
    return {
        d.uuid: d for d in domains if d.is_active and any(n.tap and n.bridge in bridges for n in d.interfaces)
    }


def lost_addresses(
    before: Mapping[str, DomainInfo], domains: Iterable[DomainInfo], bridges: Mapping[str, str]
) -> list[tuple[DomainInfo, tuple[str, ...]]]:
    """The running domains on a managed bridge that had addresses in their metadata at the last read
    (`before`, from `guarded`) and have none now, with the addresses they had."""
    out = []
    for uuid, d in guarded(domains, bridges).items():
        was = before.get(uuid)
        if was is not None and was.ips and not d.ips:
            out.append((d, was.ips))
    return out


def managed_bridges(engine: Engine) -> dict[str, str]:
    compiled = engine.current
    if compiled is None:
        return {}
    return {n.bridge: n.name for n in compiled.policy.networks}


class InventoryWatcher:
    name = "inventory"  # a monitor (reconcile/monitor.py)

    def __init__(self, engine: Engine, uri: str = "qemu:///system", *, resync: float = RESYNC_EVERY) -> None:
        self.engine = engine
        self.uri = uri
        self.resync = resync  # seconds between reads when no event comes
        self.inventory = LibvirtInventory(uri, on_action=self._record)
        # libvirt's lease lists, read with every read of the domains (VMs that learn their addresses)
        self.leases = LibvirtLeases(engine, self._network_leases)
        self.events: queue.Queue[DomainEvent] = queue.Queue()
        self.domains: list[DomainInfo] = []
        self._reported: set[tuple[str, str]] = set()  # (uuid, mac) of unprotected NICs already reported
        self.on_boot: Callable[[str], None] | None = None  # told each VM id that started or was reset
        # libvirt's id of each domain at the last read (None before the first read)
        self._ids: dict[str, int | None] | None = None
        self._guarded: dict[str, DomainInfo] = {}  # running domains on managed bridges at the last read

    def run(self, stop: threading.Event) -> None:
        watcher = LibvirtEvents(self.uri, on_event=self.events.put)
        forget = on_stop(stop, lambda: self.events.put(_WAKE))  # ends the wait below at once
        watcher.start()
        try:
            self.refresh()
            while not stop.is_set():
                burst: list[DomainEvent] = []
                try:
                    burst.append(self.events.get(timeout=self.resync))
                    while not self.events.empty():  # a burst of events is one re-read
                        burst.append(self.events.get_nowait())
                except queue.Empty:
                    pass
                if stop.is_set():
                    break
                burst = [ev for ev in burst if ev is not _WAKE]
                for ev in burst:
                    log.info("libvirt: %s %s (%s)", ev.kind, ev.name, ev.detail)
                    if ev.kind == "reset":  # no level to read it from: the guest keeps running, same id
                        self._boot(ev.uuid, ev.name, "reset")
                self.refresh()
        finally:
            forget()
            watcher.close()
            self.inventory.close()

    def _network_leases(self) -> NetworkLeases:
        return self.inventory.network_leases()  # looked up at each read: the inventory can be replaced

    def _boot(self, uuid: str, name: str, how: str) -> None:
        log.info("libvirt: %s %s: its heartbeat clock starts now", name, how)
        if self.on_boot is not None:
            self.on_boot(uuid)

    def prime(self) -> None:
        """Read libvirt's VMs once before the daemon's first converge, without converging: a daemon that
        restarts must not converge the kernel to a policy without them (their taps would get nothing until
        the inventory's first read). Best effort: no policy yet, or libvirt unreadable, leaves it to `run`."""
        try:
            self.engine.compiled()  # the managed bridges come from the policy
        except HyperfenceError as e:
            log.warning("libvirt VMs not read before the first converge: %s", e)
            return
        self._read()

    def refresh(self) -> bool:
        """Read every domain and converge if the VMs changed; False when libvirt could not be read."""
        changed = self._read()
        if changed is None:
            return False
        if changed:
            try:
                self.engine.converge()
            except HyperfenceError as e:
                log.error("converge after an inventory change failed: %s", e)
            for why in self.engine.skipped:
                log.warning("%s", why)
        self._report_unprotected(unprotected_nics(self.domains, managed_bridges(self.engine)))
        self.leases.sync()  # after the VMs: a lease counts for the VMs the policy has now
        return True

    def _read(self) -> bool | None:
        """Read every domain into the engine's discovered VMs; True when they changed, None when libvirt
        could not be read (the last known VMs stay).

        Domains that started since the last read are told to `on_boot` first, before they join the
        policy (the first read tells nothing: what ran before the daemon started has its startup grace)."""
        try:
            self.domains = self.inventory.domains()
        except HyperfenceError as e:
            log.warning("libvirt %s cannot be read (keeping the last known VMs): %s", self.uri, e)
            return None
        if self._ids is not None:
            for d in started_domains(self._ids, self.domains):
                self._boot(d.uuid, d.name, "started")
        self._ids = {d.uuid: d.domain_id for d in self.domains}
        bridges = managed_bridges(self.engine)
        self._report_lost_addresses(lost_addresses(self._guarded, self.domains, bridges))
        self._guarded = guarded(self.domains, bridges)
        return self.engine.set_discovered(vm_docs(self.domains, bridges))

    def _report_lost_addresses(self, lost: list[tuple[DomainInfo, tuple[str, ...]]]) -> None:
        """A warning and an `address-lost` event per running VM whose metadata no longer has an address."""
        for d, was in lost:
            message = (
                f"{d.name}: its hyperfence metadata lists no address any more (had {', '.join(was)}): it is out "
                "of the firewall and its tap gets nothing until an <ip> is back; change labels with "
                "`hyperfence vm label`, which keeps the addresses (docs/libvirt.md)"
            )
            log.warning("%s", message)
            try:
                self.engine.store.add_event(
                    "address-lost", {"domain": d.name, "was": list(was), "message": message}, vm=d.uuid
                )
            except HyperfenceError as e:
                log.warning("event not recorded: %s", e)

    def annotate(self, rows: list[dict[str, Any]]) -> None:
        """Add libvirt's view to the agent monitor's rows (`AgentMonitor.snapshot`), in place: the domain's
        `state` (running, paused, shutoff, ...; None for a VM libvirt does not know), its name where the
        policy has none (a shut-off domain is not in the policy), and `vm not running` as the status of an
        enrolled VM whose domain is not running (rather than `not in policy`)."""
        domains = {d.uuid: d for d in self.domains}
        for row in rows:
            d = domains.get(row["vm"])
            row["state"] = None if d is None else d.state
            if d is None:
                continue
            if row.get("name") == row["vm"]:
                row["name"] = d.name
            if not d.is_active and row.get("status") == "not in policy":
                row["status"] = "vm not running"

    def _report_unprotected(self, nics: tuple[tuple[DomainInfo, DomainNic], ...]) -> None:
        """One `nic-unprotected` event (and warning) per extra NIC, when it appears."""
        keys = set()
        for d, nic in nics:
            key = (d.uuid, nic.mac)
            keys.add(key)
            if key in self._reported:
                continue
            message = (
                f"{d.name}: NIC {nic.mac} (tap {nic.tap}) on managed bridge {nic.bridge} gets no traffic: "
                "hyperfence protects one NIC per VM, the first on a managed bridge; move this NIC to an "
                "unmanaged bridge or remove it"
            )
            log.warning("%s", message)
            try:
                self.engine.store.add_event(
                    "nic-unprotected",
                    {
                        "domain": d.name,
                        "mac": nic.mac,
                        "tap": nic.tap,
                        "bridge": nic.bridge,
                        "message": message,
                    },
                    vm=d.uuid,
                )
            except HyperfenceError as e:
                log.warning("event not recorded: %s", e)
        self._reported = keys

    def _record(self, action: VmAction) -> None:
        """Every VM action through libvirt is an event of that VM."""
        try:
            self.engine.store.add_event(
                f"vm-{action.action}",
                {"outcome": action.outcome, "message": action.message, "domain": action.name},
                vm=action.uuid,
            )
        except HyperfenceError as e:
            log.warning("VM action %s on %s not recorded: %s", action.action, action.name, e)

    def pause(self, vm_id: str) -> bool:
        """For the agent monitor's `pause` action (VM ids of discovered VMs are libvirt UUIDs)."""
        return self.inventory.pause_hook(vm_id)
