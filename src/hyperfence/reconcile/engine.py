"""The reconcile engine: where the policy comes from, what it compiles to, and making the kernel hold it.

Used by the daemon's loop and by one-shot CLI commands (`policy apply` without a running daemon), so both
follow exactly the same path: policy -> resolve -> compile -> converge (plan, one atomic batch, verify).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

from hyperfence.adapters import kernel_probe
from hyperfence.adapters.bridge_ports import read_bridge_ports
from hyperfence.adapters.conntrack import forget_flows
from hyperfence.adapters.host_addresses import read_host_addresses
from hyperfence.adapters.nft import Nft
from hyperfence.adapters.store import Store
from hyperfence.errors import ConflictError, HyperfenceError, NotFoundError
from hyperfence.model.kernel import Capabilities, Flavour, choose
from hyperfence.model.lease import Lease
from hyperfence.model.overlay import NOTHING, Merged, Overlay, expired, merge_overlays, replace_producer
from hyperfence.model.policy import AddressRange, Policy
from hyperfence.model.ports import BridgePort
from hyperfence.policy.desired import DesiredPolicy, desired_policy, desired_update
from hyperfence.policy.document import MAX_POLICY_BYTES, load_document
from hyperfence.policy.leases import expire
from hyperfence.policy.local import with_local
from hyperfence.policy.objects import ObjectChange, patch
from hyperfence.policy.overlays import with_overlays
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import Resolved, resolve_policy, resolve_update
from hyperfence.policy.syntax import format_range
from hyperfence.policy.uplinks import UndeclaredDevice, refusal, undeclared_devices, with_uplinks
from hyperfence.reconcile.firewall import ConvergeResult, Firewall, Record
from hyperfence.ruleset.closed import lets_through
from hyperfence.ruleset.compile import BRIDGE, TABLES, CompileCache, compile_ruleset, vm_sid
from hyperfence.ruleset.ir import Ruleset
from hyperfence.system.state_dir import write_private

log = logging.getLogger("hyperfence.engine")
AddressReader = Callable[[str | None], tuple[AddressRange, ...]]


class PortReader(Protocol):
    def __call__(
        self,
        netns: str | None,
        bridges: Iterable[str],
        *,
        known: Collection[str] = (),
        list_known: bool = False,
    ) -> tuple[BridgePort, ...]: ...


def read_policy_ports(
    netns: str | None, policy: Policy, read_ports: PortReader = read_bridge_ports
) -> tuple[BridgePort, ...]:
    """The ports of the policy's bridges in namespace `netns` (the ones it declares, as uplinks or VMs'
    ports, by name alone). One netlink dump per bridge."""
    known = {u for n in policy.networks for u in n.uplinks} | {v.port for v in policy.vms}
    return read_ports(netns, [n.bridge for n in policy.networks], known=known, list_known=True)


def find_undeclared(
    netns: str | None, policy: Policy, read_ports: PortReader = read_bridge_ports
) -> tuple[UndeclaredDevice, ...]:
    """The network devices on the policy's bridges (in namespace `netns`) that it declares neither as
    uplinks nor as VMs' ports (`policy/uplinks.py`)."""
    return undeclared_devices(policy, read_policy_ports(netns, policy, read_ports))


class PortsRead(NamedTuple):
    """One read of the bridges' ports: the policy whose bridges were read, the ports, and (bridge, port) of
    each."""

    policy: Policy
    ports: tuple[BridgePort, ...]
    names: frozenset[tuple[str, str]]


def port_names(ports: Iterable[BridgePort]) -> frozenset[tuple[str, str]]:
    """(bridge, port) of each port."""
    return frozenset((p.bridge, p.name) for p in ports)


def local_ports(policy: Policy, ports: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """Those of `ports` that are declared VMs' ports: the VMs on this host (`policy/local.py`)."""
    declared = {v.port for v in policy.vms}
    return frozenset(p for p in ports if p[1] in declared)


def check_devices(netns: str | None, policy: Policy, read_ports: PortReader = read_bridge_ports) -> None:
    """Refuse a policy that leaves a network device on one of its bridges undeclared: `ConflictError`
    naming each (bridge, port, kind) and how to declare it. What `policy apply` and `policy check` ask
    before anything is stored or applied."""
    found = find_undeclared(netns, policy, read_ports)
    if found:
        raise ConflictError(refusal(found))


def read_policy_file(path: str) -> Any:
    """The document in a policy file (YAML or JSON). Reads at most one byte more than a policy may have,
    so that `/dev/zero` or a huge file is refused without being read whole."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise NotFoundError(f"cannot read policy file {path}: {e.strerror}") from None
    return load_document(data, source=path)


@dataclass(frozen=True)
class Compiled:
    key: str  # "gen:N" for the store, "file:mtime:size" for a policy file
    policy: Policy
    resolved: Resolved
    ruleset: Ruleset
    discovered: tuple[dict[str, Any], ...] = ()  # the discovered VMs this was compiled with
    host_addresses: tuple[AddressRange, ...] = ()  # and the host's addresses
    leases: tuple[Lease, ...] = ()  # and the learned addresses (`policy` has them in its VMs' `ips`)
    flavour: Flavour = Flavour.BR_NETFILTER  # the data plane it was compiled for
    # and the managed bridges' ports as read (None: every declared VM gets chains; see `Engine.local_only`)
    ports: frozenset[tuple[str, str]] | None = None
    # and the network devices passed as provisional uplinks (in `resolved`'s policy, not in `policy`)
    provisional: tuple[UndeclaredDevice, ...] = ()
    # and the merged overlays (`resolved` has them on; `plain` is the policy's resolve without them)
    overlays: Merged = NOTHING
    plain: Resolved | None = None
    # The document as loaded (for the store: generation `generation`), and what it made: what the next
    # generation is made from when only a few of its objects changed (`Engine._load_document`).
    document: Any = None
    generation: int | None = None
    desired: DesiredPolicy | None = None


RECORD_FILE = "kernel.json"  # what the kernel was verified to hold, at which nftables generation


class RecordFile:
    """The firewall's `Record` in a 0600 file of the state directory: a missing, unreadable or damaged one
    only means a slower start (everything is read from the kernel)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Record | None:
        try:
            with open(self.path, "rb") as f:
                data = orjson.loads(f.read(4096))
        except (OSError, orjson.JSONDecodeError):
            return None
        return Record.from_dict(data) if isinstance(data, dict) else None

    def save(self, record: Record) -> None:
        write_private(self.path, orjson.dumps(record.as_dict()))


class Engine:
    def __init__(
        self,
        *,
        netns: str | None,
        state_dir: str,
        policy_file: str | None = None,
        read_addresses: AddressReader = read_host_addresses,
        clock: Callable[[], float] = time.time,
        read_ports: PortReader = read_bridge_ports,
        flavour: Flavour | None = None,
        probe: Callable[[Nft], Capabilities] = kernel_probe.probe,
        provisional_uplinks: bool = False,
        local_only: bool = False,
    ) -> None:
        """`flavour`: the data plane to build (model/kernel.py), None to pick it from what the kernel offers
        (`probe`, at the first converge; the daemon's preconditions loop re-decides with `use_flavour`).
        Until then `compiled()` builds br_netfilter's: commands that only read the compiled policy (`vm
        list`) never touch the kernel.

        `provisional_uplinks` (the daemon): a policy version that would cut a network device off is applied
        with that device passed as a provisional uplink instead of being refused (see `converge`); a one-shot
        command refuses it, so the operator who typed it sees why at once.

        `local_only` (the daemon and the CLI): only the VMs whose port is on this host's bridges get chains
        (`policy/local.py`); the others stay addresses in the sets of the rules that name them. The bridges'
        ports are read with the first compile, again by the port watch (`refresh_devices`) and every full
        converge. False compiles every declared VM (an engine that must not read the kernel, e.g. in units)."""
        self.netns = netns
        self.forced_flavour = flavour
        self._flavour = flavour
        self._probe = probe
        self.state_dir = state_dir
        self.policy_file = policy_file
        self.store = Store(state_dir)
        self._nft: Nft | None = None
        self._firewall: Firewall | None = None
        self._compiled: Compiled | None = None
        self._cache = CompileCache()
        # How new policy versions were read: "changes" (as the objects they changed), "whole" (loaded and
        # parsed whole); "parsed_changes": of those read as changes, how many were parsed as themselves.
        self.policy_reads: dict[str, int] = {"changes": 0, "parsed_changes": 0, "whole": 0}
        self.lock = threading.RLock()
        # Every producer's overlays (isolation, rate limits, shields; model/overlay.py), from the store: so
        # they are in place before the first converge (see `set_overlays`).
        self.overlays: tuple[Overlay, ...] = self.store.overlays()
        # VMs discovered from the hypervisor, as `vms` items (see `set_discovered`): the last known ones
        # from the store, so that every engine compiles the VMs the daemon last read, and a daemon that
        # restarts converges to them before it reads the hypervisor (or while it cannot).
        stored = self.store.inventory()
        self.discovered: tuple[dict[str, Any], ...] = () if stored is None else stored.vms
        self.skipped: list[str] = []  # discovered VMs left out, and why
        # The host's own addresses in the bridges' namespace, an input next to the policy like the discovered
        # VMs (see `refresh_host_addresses`); None until first read.
        self.host_addresses: tuple[AddressRange, ...] | None = None
        self._read_addresses = read_addresses
        self.clock = clock
        # Addresses learned from DHCP leases (see `set_leases`): from the store, less those that ended while
        # nobody watched (a one-shot command applies no expired lease; the daemon's learner records them).
        self.leases: tuple[Lease, ...] = expire(self.store.leases(), clock())[0]
        self.ignored_leases: tuple[tuple[Lease, str], ...] = ()  # leases the policy left out, and why
        self._read_ports = read_ports
        # The compiled policy the kernel was last converged to (None: none yet by this engine), the network
        # devices it leaves undeclared (as of the last read of the bridges' ports; each gets nothing), and,
        # while a newer policy version is refused because applying it would cut devices off, its key and
        # the error (see `converge`).
        self.applied: Compiled | None = None
        self.undeclared: tuple[UndeclaredDevice, ...] = ()
        self.refused_key: str | None = None
        self.refused: str | None = None
        # Network devices the policy forgets that the kernel let through when a version came to be applied,
        # passed as uplinks until the policy declares them or they leave their bridge (`provisional_uplinks`).
        self.allow_provisional = provisional_uplinks
        self.provisional: tuple[UndeclaredDevice, ...] = ()
        self.provisional_stale = False  # one of them left its bridge or was declared: converge to apply
        # The last read of the managed bridges' ports (None: not read yet); with `local_only`, the declared
        # VMs among them get chains.
        self.local_only = local_only
        self._ports_read: PortsRead | None = None

    def set_discovered(self, vms: tuple[dict[str, Any], ...]) -> bool:
        """Replace the discovered VMs; True when they changed (converge to apply). A change is stored as
        the last known inventory first (`ports.InventoryStore`); a store that cannot take it is logged and
        the engine goes on with the new VMs (the kernel must follow the hypervisor)."""
        with self.lock:
            changed = vms != self.discovered
            if changed:
                try:
                    self.store.save_inventory(vms, read=self.clock())
                except HyperfenceError as e:
                    log.warning("the VMs discovered were not stored (a restart uses the older ones): %s", e)
                self.discovered = vms
            return changed

    def set_leases(self, leases: tuple[Lease, ...]) -> bool:
        """Replace the learned addresses; True when they changed (converge to apply). The caller stores them."""
        with self.lock:
            changed = leases != self.leases
            if changed:
                self.leases = leases
            return changed

    def refresh_host_addresses(self) -> bool:
        """Read the host's addresses from the bridges' namespace (what `host` covers and `outside` leaves
        out); True when they changed (converge to apply). A change after the first read is recorded as a
        `host-addresses` event. Raises `KernelError` / `NotFoundError` when they cannot be read.

        Read under the engine's lock, so reads and updates happen in the same order: otherwise the address
        watch's read from before a change could land after a full converge's read from after it, and put
        the old addresses back until the next event (seen as a flaky test_peers run)."""
        with self.lock:
            addrs = self._read_addresses(self.netns)
            before, self.host_addresses = self.host_addresses, addrs
        if before is None or before == addrs:
            return before is None
        added = [format_range(r) for r in addrs if r not in before]
        removed = [format_range(r) for r in before if r not in addrs]
        log.info("the host's addresses changed: added %s, removed %s", added or "none", removed or "none")
        self.store.add_event("host-addresses", {"added": added, "removed": removed})
        return True

    def known_host_addresses(self) -> tuple[AddressRange, ...]:
        """The host's addresses, read from the kernel the first time."""
        if self.host_addresses is None:
            self.refresh_host_addresses()
        return self.host_addresses or ()

    def refresh_devices(self) -> bool:
        """Read the bridges' ports again for the applied policy (the link watch does, on any link event)
        and report what changed (`note_undeclared`); True when the undeclared devices changed. A provisional
        uplink that left its bridge sets `provisional_stale` (a converge takes it out of the ruleset)."""
        with self.lock:  # one reader at a time: the watch and the converges report each change once
            applied = self.applied
            if applied is None:
                return False
            found = undeclared_devices(applied.policy, self._read_bridge_ports(applied.policy).ports)
            passed = {(d.bridge, d.port) for d in self.provisional}
            if passed - {(d.bridge, d.port) for d in found}:
                self.provisional_stale = True
            return self.note_undeclared(tuple(d for d in found if (d.bridge, d.port) not in passed))

    def chained(self) -> dict[str, Any] | None:
        """Which declared VMs the applied ruleset has chains for (`hyperfence status`): the setting, how
        many VMs have chains here and how many the policy declares; None before the first converge."""
        applied = self.applied
        if applied is None:
            return None
        declared = len(applied.policy.vms)
        here = declared if applied.ports is None else len(local_ports(applied.policy, applied.ports))
        return {"chains": "local" if self.local_only else "declared", "here": here, "declared": declared}

    @property
    def bridge_ports(self) -> frozenset[tuple[str, str]] | None:
        """The managed bridges' ports as last read, (bridge, port) each; None before the first read."""
        read = self._ports_read
        return None if read is None else read.names

    def _read_bridge_ports(self, policy: Policy) -> PortsRead:
        """Read the ports of `policy`'s bridges and keep them as the bridges' ports; a declared VM's port that
        came or went since is logged (with `local_only`, the next compile gives it chains or takes them)."""
        ports = read_policy_ports(self.netns, policy, self._read_ports)
        before, now = self.bridge_ports, port_names(ports)
        read = self._ports_read = PortsRead(policy, ports, now)
        if before is not None and self.local_only:
            was, here = local_ports(policy, before), local_ports(policy, now)
            for bridge, port in sorted(here - was):
                log.info("VM port %s joined bridge %s: its VM gets its chains here", port, bridge)
            for bridge, port in sorted(was - here):
                log.info("VM port %s left bridge %s: its VM's chains go", port, bridge)
        return read

    @property
    def local_stale(self) -> bool:
        """With `local_only`: the VMs on this host's bridges are not the ones the applied ruleset has chains
        for (a VM's port came or went: converge to apply)."""
        applied = self.applied
        return (
            self.local_only
            and applied is not None
            and applied.ports is not None
            and self.bridge_ports is not None
            and local_ports(applied.policy, applied.ports) != local_ports(applied.policy, self.bridge_ports)
        )

    def ports_for(self, policy: Policy) -> frozenset[tuple[str, str]] | None:
        """With `local_only`, the bridges' ports to compile `policy` with (read when the bridges it declares
        were not all read yet); None without."""
        if not self.local_only:
            return None
        read = self._ports_read
        wanted = {n.bridge for n in policy.networks}
        if read is None or not wanted <= {n.bridge for n in read.policy.networks}:
            read = self._read_bridge_ports(policy)
        return read.names

    def note_undeclared(self, found: tuple[UndeclaredDevice, ...]) -> bool:
        """Keep `found` as the network devices the applied policy leaves undeclared. Each new one is
        reported loudly (an `undeclared-device` event and a warning: it gets nothing until declared), each
        one gone (declared, or off the bridge) is recorded as `undeclared-device-gone`. True when they
        changed."""
        with self.lock:
            before, self.undeclared = self.undeclared, found
        return self._report_devices(
            "undeclared-device",
            before,
            found,
            "is not declared as an uplink: it gets nothing until declared (%s) or taken off the bridge",
            "is no longer undeclared",
        )

    def _report_devices(
        self,
        kind: str,
        before: tuple[UndeclaredDevice, ...],
        after: tuple[UndeclaredDevice, ...],
        added: str,
        gone: str,
    ) -> bool:
        """Log and record what changed between two lists of devices (same bridge and port: the same device):
        a warning ("network device P on bridge B (what) " + `added`, with the hint) and a `kind` event for
        each new one, an info line (+ `gone`) and a `kind`-gone event for each one gone. True on a change."""
        was = {(d.bridge, d.port) for d in before}
        now = {(d.bridge, d.port) for d in after}
        new = [d for d in after if (d.bridge, d.port) not in was]
        old = [d for d in before if (d.bridge, d.port) not in now]
        for d in new:
            log.warning(f"network device %s on bridge %s (%s) {added}", d.port, d.bridge, d.what, d.hint)
        for d in old:
            log.info(f"network device %s on bridge %s {gone}", d.port, d.bridge)
        rows: list[tuple[str, str | None, dict[str, Any]]] = [
            *((kind, None, d.as_dict()) for d in new),
            *((f"{kind}-gone", None, d.as_dict()) for d in old),
        ]
        if rows:
            self.store.add_events(rows)
        return bool(rows)

    def _settle_devices(
        self, found: tuple[UndeclaredDevice, ...], key: str, *, new: bool
    ) -> tuple[UndeclaredDevice, ...]:
        """Decide what each network device the policy version `key` forgets gets; the ones that get nothing.

        A provisional uplink stays one while it is still undeclared and on its bridge. When a version comes
        to be applied (`new`), a forgotten device the kernel lets through now (no hyperfence table yet, or
        one that has it as an uplink) would be cut off: a one-shot engine refuses the version
        (`ConflictError`, nothing changed); the daemon's passes the device as a provisional uplink, so the
        VMs are filtered and the host keeps its network. Any other forgotten device gets nothing (it joined
        a bridge after the policy was applied: fail closed)."""
        kept = {(d.bridge, d.port) for d in self.provisional}
        keep = tuple(d for d in found if (d.bridge, d.port) in kept)
        rest = tuple(d for d in found if (d.bridge, d.port) not in kept)
        cut: tuple[UndeclaredDevice, ...] = ()
        if new and rest:
            actual = self.firewall.actual or self.firewall.read()
            cut = tuple(d for d in rest if lets_through(actual.ruleset, d.port))
        if cut and not self.allow_provisional:
            self.refused_key, self.refused = key, refusal(found)
            raise ConflictError(self.refused)
        self._set_provisional(keep + cut)
        return tuple(d for d in rest if d not in cut)

    def _set_provisional(self, devices: tuple[UndeclaredDevice, ...]) -> None:
        """Keep `devices` as the provisional uplinks; each new one is reported loudly (a `provisional-uplink`
        event and a warning: it passes unfiltered until declared), each one gone as
        `provisional-uplink-gone`."""
        before, self.provisional = self.provisional, tuple(sorted(devices, key=lambda d: (d.bridge, d.port)))
        self.provisional_stale = False
        self._report_devices(
            "provisional-uplink",
            before,
            self.provisional,
            "is not declared as an uplink; the policy would cut it off, so it passes unfiltered as a "
            "provisional uplink until declared (%s) or taken off the bridge",
            "is no longer a provisional uplink",
        )

    def set_overlays(self, producer: str, overlays: tuple[Overlay, ...]) -> bool:
        """Replace `producer`'s overlays with `overlays` (every one of that producer: an empty tuple
        releases them all); the other producers' are kept. Stored first (one transaction: a store error
        is raised and nothing changed), then each overlay set or released is recorded as an
        `overlay-set` / `overlay-released` event of its VM with the producer. True when what the compiler
        sees (the merge of all producers' overlays) changed: converge to apply."""
        with self.lock:
            now = self.clock()
            before = merge_overlays(self.overlays, now)
            after, set_, released = replace_producer(self.overlays, producer, overlays)
            if not set_ and not released:
                return False
            self.store.save_overlays(producer, tuple(o for o in after if o.producer == producer))
            self.overlays = after
            changed = merge_overlays(after, now) != before
        self._record_overlays(set_, released, why=None)
        return changed

    def next_overlay_end(self) -> float | None:
        """When the first overlay with an end runs out (the engine's clock), None when none has one: the
        daemon wakes for it."""
        ends = [o.until for o in self.overlays if o.until is not None]
        return min(ends) if ends else None

    def expire_overlays(self) -> bool:
        """Drop the overlays whose time is up (from the store too), each recorded as `overlay-released`
        (`why: expired`). True when what the compiler sees changed. The daemon calls it every poll."""
        with self.lock:
            gone = expired(self.overlays, self.clock())
            if not gone:
                return False
            keep = tuple(o for o in self.overlays if o not in gone)
            for producer in sorted({o.producer for o in gone}):
                self.store.save_overlays(producer, tuple(o for o in keep if o.producer == producer))
            self.overlays = keep
        self._record_overlays((), gone, why="expired")
        return True  # an expired overlay already counted for nothing; a converge drops its rules

    def _record_overlays(
        self, set_: tuple[Overlay, ...], released: tuple[Overlay, ...], *, why: str | None
    ) -> None:
        rows: list[tuple[str, str | None, dict[str, Any]]] = []
        for o in set_:  # (`overlay`: the event's own `kind` is overlay-set)
            data = {k: v for k, v in o.as_dict().items() if k not in ("vm", "kind")}
            data["overlay"] = o.kind.value
            rows.append(("overlay-set", o.vm, data))
            log.warning("VM %s: %s by %s: %s", o.vm, o.kind.value, o.producer, o.reason)
        for o in released:
            data = {"producer": o.producer, "overlay": o.kind.value, "reason": o.reason}
            if why:
                data["why"] = why
            rows.append(("overlay-released", o.vm, data))
            log.info("VM %s: %s by %s released%s", o.vm, o.kind.value, o.producer, f" ({why})" if why else "")
        if rows:
            self.store.add_events(rows)

    def merged_overlays(self) -> Merged:
        """What all producers' overlays amount to now (expired ones count for nothing)."""
        return merge_overlays(self.overlays, self.clock())

    @property
    def quarantine(self) -> frozenset[str]:
        """The VMs some producer isolates now."""
        return self.merged_overlays().isolated

    @property
    def flavour(self) -> Flavour:
        """The data plane this engine builds: forced, decided by `use_flavour`, or probed on first need."""
        if self._flavour is None:
            self._flavour = choose(self._probe(self.nft), None)
            log.info("data plane %s (picked from what the kernel offers)", self._flavour.value)
        return self._flavour

    def _compile_flavour(self) -> Flavour:
        return self._flavour or Flavour.BR_NETFILTER

    def applied_flavour(self) -> Flavour | None:
        """The data plane of the latest ruleset a converge applied to this state dir's kernel (its `applied`
        event), None when none recorded one."""
        for event in self.store.events(kind="applied", limit=1):
            # (an event recorded before the field existed has none)
            return {f.value: f for f in Flavour}.get(str(event.get("flavour")))
        return None

    def use_flavour(self, caps: Capabilities) -> bool:
        """Decide the flavour from freshly probed capabilities (a forced flavour stays); True when it changed
        (converge to apply: the switch is one atomic batch like every change)."""
        wanted = choose(caps, self.forced_flavour)
        with self.lock:
            changed = self._flavour is not None and wanted is not self._flavour
            self._flavour = wanted
        if changed:
            log.warning("data plane switches to %s", wanted.value)
            self.store.add_event("flavour-changed", {"flavour": wanted.value})
        return changed

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft(self.netns)
        return self._nft

    @property
    def firewall(self) -> Firewall:
        if self._firewall is None:
            self._firewall = Firewall(self.nft, TABLES, RecordFile(os.path.join(self.state_dir, RECORD_FILE)))
        return self._firewall

    def store_policy(self, document: Any, *, source: str) -> tuple[int, Policy]:
        """Validate `document` and store it as a new generation. Nothing invalid ever reaches the store:
        an `InvalidInputError` listing every problem is raised first."""
        policy = parse_policy(document, source=source)
        return self.store.put_policy(document, source=source), policy

    def policy_key(self) -> str | None:
        """Cheap: what identifies the current policy version (None: there is no policy yet)."""
        if self.policy_file:
            try:
                st = os.stat(self.policy_file)
            except FileNotFoundError:
                raise NotFoundError(f"policy file {self.policy_file} does not exist") from None
            return f"file:{st.st_mtime_ns}:{st.st_size}"
        gen = self.store.latest_generation()
        return f"gen:{gen}" if gen else None

    def _load_document(
        self, key: str, previous: Compiled | None
    ) -> tuple[Any, str, int | None, list[ObjectChange] | None]:
        """The document of policy version `key`, where it came from, its store generation, and the object
        changes that made it from `previous`'s document (None: loaded whole). A store generation after the
        one `previous` holds is read as what changed (`policy_changes`: the size of the change, not of the
        policy) and made in a copy of `previous`'s document that shares every untouched part."""
        if self.policy_file:
            return read_policy_file(self.policy_file), self.policy_file, None, None
        generation = int(key.removeprefix("gen:"))
        source = f"store generation {generation}"
        if previous is not None and previous.generation is not None and isinstance(previous.document, dict):
            changes = self.store.policy_changes(previous.generation, generation)
            if changes is not None:
                document = patch(previous.document, changes) if changes else previous.document
                if document is not None:
                    self.policy_reads["changes"] += 1
                    return document, source, generation, changes
        stored = self.store.get_policy(generation)
        if stored is None:
            raise NotFoundError("no policy in the store yet: run `hyperfence policy apply FILE`")
        self.policy_reads["whole"] += 1
        return stored.document, source, stored.generation, None

    @property
    def current(self) -> Compiled | None:
        """The last compiled policy, without looking for a newer one (safe from other threads)."""
        return self._compiled

    def compiled(self) -> Compiled | None:
        """The compiled current policy (cached while the policy does not change). Under the engine's lock:
        a control request (a policy edit, an overlay) compiles beside the daemon's reconcile loop, and the
        compile cache is one."""
        with self.lock:
            return self._compiled_now()

    def _compiled_now(self) -> Compiled | None:
        key = self.policy_key()
        if key is None:
            return None
        host = self.known_host_addresses()
        merged = self.merged_overlays()
        previous = self._compiled
        if (
            previous is not None
            and previous.key == key
            and previous.discovered is self.discovered
            and previous.host_addresses == host
            and previous.leases is self.leases
            and previous.provisional == self.provisional
        ):
            if (
                previous.overlays == merged
                and previous.flavour is self._compile_flavour()
                and previous.ports == self.ports_for(previous.policy)
            ):
                return previous
            policy, resolved = previous.policy, previous.plain or previous.resolved
            document, generation, desired = previous.document, previous.generation, previous.desired
        else:
            document, source, generation, changes = self._load_document(key, previous)
            desired = None
            if (
                changes is not None
                and previous is not None
                and previous.desired is not None
                and previous.discovered is self.discovered
                and previous.leases is self.leases
            ):
                desired = desired_update(previous.desired, previous.document, document, changes)
                self.policy_reads["parsed_changes"] += desired is not None
            if desired is None:
                desired = desired_policy(
                    document, source=source, discovered=self.discovered, leases=self.leases
                )
            self.skipped = list(desired.skipped)
            policy = desired.policy
            self._note_ignored_leases(desired.ignored_leases)
            passed = with_uplinks(policy, self.provisional)
            resolved = (
                resolve_update(previous.plain or previous.resolved, passed, host_addresses=host)
                if previous is not None
                else None
            ) or resolve_policy(passed, host_addresses=host)
        overlaid = with_overlays(resolved, merged)
        ports = self.ports_for(policy)
        self._compiled = Compiled(
            key,
            policy,
            overlaid,
            compile_ruleset(with_local(overlaid, ports), self._cache, flavour=self._compile_flavour()),
            discovered=self.discovered,
            host_addresses=host,
            leases=self.leases,
            flavour=self._compile_flavour(),
            ports=ports,
            provisional=self.provisional,
            overlays=merged,
            plain=resolved,
            document=document,
            generation=generation,
            desired=desired,
        )
        return self._compiled

    def _note_ignored_leases(self, ignored: tuple[tuple[Lease, str], ...]) -> None:
        """Keep the learned addresses the policy left out; one newly left out is logged and recorded as a
        `lease-ignored` event of its VM (e.g. a VM now declares its address)."""
        before = {lease for lease, _ in self.ignored_leases}
        fresh = [(lease, why) for lease, why in ignored if lease not in before]
        self.ignored_leases = ignored
        for lease, why in fresh:
            log.warning("learned address %s of VM %s left out: %s", lease.ip, lease.vm, why)
        if fresh:
            self.store.add_events(
                [("lease-ignored", lease.vm, {"ip": str(lease.ip), "reason": why}) for lease, why in fresh]
            )

    def kernel_record(self) -> dict[str, Any] | None:
        """What the firewall knows of the kernel without reading it (reconcile/firewall.py `Record`): the
        nftables generation it was verified at, whether rule bodies were read back, and how many full
        converges skipped reading the kernel. None before the first converge."""
        fw = self._firewall
        if fw is None:
            return None
        rec = fw.record
        return {
            "generation": None if rec is None else rec.generation.number,
            "exact": None if rec is None else rec.exact,
            "full_reads_skipped": fw.skipped_reads,
        }

    def note_untouched(self, numbers: list[int]) -> None:
        """nftables commits that touched none of hyperfence's tables (reconcile/drift.py): the firewall's
        record of the kernel still holds after them. Safe from any thread."""
        with self.lock:
            if self._firewall is not None:
                self._firewall.advance(numbers)

    def owns_commit(self, pid: int) -> bool:
        """Was an nftables commit reported as "by process `pid`" made by this engine? (Its libnftables
        context commits from one worker thread; see adapters/nft_monitor.py.) Safe from any thread."""
        nft = self._nft
        return nft is not None and pid == nft.thread_id

    def converge(
        self, *, full: bool = False, cause: str | None = None
    ) -> tuple[Compiled | None, ConvergeResult | None]:
        """Make the kernel hold the current policy. `cause` (why this converge runs, e.g. the foreign
        nftables commit that triggered it) is recorded in the `drift-repaired` event when drift is found.

        Never cut the host off its network: before a policy version is applied for the first time (a new
        generation, an edited policy file, the first converge of this engine) unless it declares the very
        VMs, networks and uplinks of the version applied last (a change of rules only), and at every full
        converge, the managed bridges' ports are read. A network device on them that the version leaves undeclared,
        and that the kernel lets through now, is never cut off: a one-shot engine refuses the version with a
        `ConflictError` (naming each device and how to declare it; nothing is changed), the daemon's applies
        it with the device as a provisional uplink (`_settle_devices`). A device the kernel already gives
        nothing (it joined a bridge after the policy was applied) stays so, fail closed, and is reported
        (`note_undeclared`).

        After drift is repaired, the VMs' conntrack entries are deleted (`flows_cut` in the event): a flow
        that was opened while the rules were missing would otherwise pass the repaired rules as established
        for as long as it lives. Every flow's next packet is judged again, as a new flow, by the repaired
        rules; allowed flows go on."""
        with self.lock:
            if full:  # the periodic resync and drift repair read the host's addresses again too
                try:
                    self.refresh_host_addresses()
                except HyperfenceError as e:
                    if self.host_addresses is None:
                        raise
                    log.warning("keeping the host's last known addresses: %s", e)
            _ = self.flavour  # decided before compiling what the kernel will hold
            read = self._ports_read
            compiled = self.compiled()
            if compiled is None:
                return None, None
            new = self.applied is None or compiled.key != self.applied.key
            devices = None
            if full or (new and not self._declares_the_same_ports(compiled)):
                try:
                    last = self._ports_read
                    # (the compile above may have read them for this very version: once is enough)
                    ports = (
                        last.ports
                        if last is not None and last is not read and last.policy is compiled.policy
                        else self._read_bridge_ports(compiled.policy).ports
                    )
                    devices = undeclared_devices(compiled.policy, ports)
                except HyperfenceError as e:
                    if new:  # unchecked, a new version is not applied
                        raise
                    log.warning("the bridges' ports were not read (the resync goes on): %s", e)
                if devices is not None:
                    devices = self._settle_devices(devices, compiled.key, new=new)
                    # with the provisional uplinks and the VMs on the bridges as they are now
                    compiled = self.compiled() or compiled
            result = self.firewall.converge(compiled.ruleset, full=full)
            self.applied, self.refused_key, self.refused = compiled, None, None
            if devices is not None:
                self.note_undeclared(devices)
            if result.drift:
                found: dict[str, Any] = {"policy": compiled.key, "drift": result.drift[:50]}
                if cause:
                    found["cause"] = cause[:500]
                try:
                    found["flows_cut"] = forget_flows(
                        self.netns, (ip for vm in compiled.policy.vms for ip in vm.ips)
                    )
                except HyperfenceError as e:
                    found["flows_cut_error"] = str(e)[:500]
                self.store.add_event("drift-repaired", found)
                # The filter's own heartbeat: a VM whose chains were missing or changed in the kernel.
                self.store.add_events(
                    [
                        ("filter-repaired", vm, {"drift": lines[:20]})
                        for vm, lines in vm_drift(compiled.policy, result.drift).items()
                    ]
                )
            if result.changed:
                self.store.add_event(
                    "applied",
                    {
                        "policy": compiled.key,
                        "flavour": compiled.flavour.value,
                        "summary": result.summary,
                        "commands": result.commands,
                        "ms": round(result.seconds * 1000, 2),
                    },
                )
            return compiled, result

    def _declares_the_same_ports(self, compiled: Compiled) -> bool:
        """Whether `compiled` declares the very VMs, networks (uplinks) and provisional uplinks of the version
        applied last (a change of rules only): what each device on the bridges gets is then unchanged, and
        the bridges' ports need no read before it is applied (a device that joined since is the port
        watch's: `refresh_devices`)."""
        applied = self.applied
        return (
            applied is not None
            and compiled.policy.vms is applied.policy.vms
            and compiled.policy.networks is applied.policy.networks
            and compiled.provisional == applied.provisional
        )

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
        self.store.close()


def vm_drift(policy: Policy, drift: list[str]) -> dict[str, list[str]]:
    """Drift lines by the VM whose chains they name (VM id -> lines)."""
    by_sid = {vm_sid(vm.id): vm.id for vm in policy.vms}
    out: dict[str, list[str]] = {}
    if any(line.startswith(f"table {BRIDGE.family} {BRIDGE.name} ") for line in drift):
        return {vm.id: [f"table {BRIDGE.family} {BRIDGE.name} is missing"] for vm in policy.vms}
    for line in drift:
        for word in line.replace(":", " ").split():
            vm = by_sid.get(word.split("_", 1)[0])
            if vm is not None:
                out.setdefault(vm, []).append(line)
                break
    return out
