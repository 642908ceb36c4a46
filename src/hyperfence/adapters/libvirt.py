"""libvirt: the inventory of VMs, their lifecycle events, and the actions taken on them.

The only module that imports `libvirt` (libvirt-python, no type stubs: its objects are `Any` here and never
leave this module; callers get `DomainInfo`, `DomainEvent`, `VmAction` from `libvirt_xml`). Every
`libvirtError` is translated into a hyperfence error naming the URI and the operation (`_translate`).

* `LibvirtInventory(uri)` reads domains (UUID, name, state, NICs with MAC/tap/bridge, agent channel,
  labels) and acts on them: `pause`, `resume`, `destroy` (the heartbeat policy, later the response ladder),
  plus `define`/`start`/`undefine`/`set_labels` for whoever manages domains (the lab). Each action is
  reported to `on_action` as a `VmAction`. A connection that died (libvirtd restarted) is reopened once per
  call; if libvirtd is still away, `TemporaryError`.
* `LibvirtEvents(uri, on_event)` watches lifecycle, device, reset (reboot) and metadata-change events (and networks started or stopped) on a
  thread of its own and hands them on as `DomainEvent`s. It notices a lost libvirtd within ~15 s (keepalive 5 s × 3) or at once when the
  socket closes, reconnects with exponential backoff, and after every (re)connection emits ``resync``:
  events may have been missed, so the caller re-reads the inventory (level-triggered).

libvirt dispatches events from one process-wide event loop (`virEventRegisterDefaultImpl` can be called
only once); `_ensure_event_loop` starts it on a daemon thread the first time events are watched, and it
runs until the process exits. Callbacks run on that thread: keep `on_event` quick (queue the event).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import libvirt  # type: ignore[import-untyped]

from hyperfence.codec.libvirt_xml import (
    RESUMED,
    RUNNING,
    XMLNS,
    XMLNS_PREFIX,
    DomainEvent,
    DomainInfo,
    NetworkLeases,
    VmAction,
    dac_baselabel,
    dac_label,
    device_kind,
    labels_xml,
    lifecycle_kind,
    metadata_detail,
    network_lease,
    parse_domain_xml,
    state_name,
    with_fw_cfg_file,
)
from hyperfence.errors import (
    ConflictError,
    HyperfenceError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    TemporaryError,
)
from hyperfence.model.lease import NetworkLease

log = logging.getLogger("hyperfence.libvirt")

DEFAULT_URI = "qemu:///system"
KEEPALIVE_INTERVAL = 5  # seconds between keepalive probes on the event connection
KEEPALIVE_COUNT = 3  # unanswered probes before the connection counts as dead
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
MAX_NETWORKS = 256  # active libvirt networks whose leases are read, at most
MAX_NETWORK_LEASES = 4096  # lease entries read at most, over all networks (more: the read is incomplete)

T = TypeVar("T")
OnEvent = Callable[[DomainEvent], None]
OnAction = Callable[[VmAction], None]

_ACTIVE = {"running", "paused", "blocked", "shutting-down", "pmsuspended"}
_TEMPORARY = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
}
_DENIED = {libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_ERR_AUTH_UNAVAILABLE}
_INVALID = {
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
}


def _silence_default_error_handler() -> None:
    """libvirt prints every error to stderr by default; ours are raised (translated) instead."""

    def ignore(_ctx: object, _err: object) -> None:
        return None

    libvirt.registerErrorHandler(ignore, None)


_silence_default_error_handler()


def _translate(exc: Any, *, uri: str, what: str) -> HyperfenceError:
    """The hyperfence error for libvirtError `exc` met while doing `what` on `uri`."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    where = f"libvirt {uri}: {what}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFoundError(f"{where}: no such domain ({message}); `virsh -c {uri} list --all` lists them")
    if code == libvirt.VIR_ERR_NO_NETWORK:
        return NotFoundError(f"{where}: no such network ({message}); `virsh -c {uri} net-list` lists them")
    if code in _TEMPORARY:
        return TemporaryError(
            f"{where}: libvirtd does not answer ({message}); is it running? Start it (`systemctl start "
            f"libvirtd`, or `libvirtd -d` without systemd) or use another URI",
            retry_after=2.0,
        )
    if code in _DENIED:
        return PermissionDeniedError(f"{where}: {message}; run as root or grant this user access to {uri}")
    if code in _INVALID:
        return InvalidInputError(f"{where}: libvirt rejected the input: {message}")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return ConflictError(f"{where}: not possible in the domain's current state ({message}); re-read it")
    return ConflictError(f"{where}: libvirt refused ({message})")


def _open(uri: str) -> Any:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code in _DENIED:
            raise _translate(exc, uri=uri, what="connect") from exc
        raise TemporaryError(
            f"libvirt {uri}: cannot connect ({exc.get_error_message() or exc}). Is libvirtd running? Start it "
            f"(`systemctl start libvirtd`; without systemd `libvirtd -d`; `hyperfence lab` starts one for its "
            f"lab) or pass another URI",
            retry_after=2.0,
        ) from exc


def _running_reason(dom: Any) -> int | None:
    """Why the domain's CPUs run (virDomainRunningReason), or None if it does not run or cannot be read."""
    try:
        state, reason = dom.state()
    except libvirt.libvirtError:
        return None
    return int(reason) if state == RUNNING else None


def _leases_of(net: Any) -> Callable[[Any], tuple[str, Any]]:
    """For `_call`: the network's name and its raw lease list."""
    return lambda _conn: (str(net.name()), net.DHCPLeases())


def _is_alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


# -------------------------------------------------------------------------------------------- inventory


class LibvirtInventory:
    """The domains of one libvirtd, and actions on them. Thread-safe; connects on first use.

    Domains are addressed by UUID (lowercase text), never by name.
    """

    def __init__(self, uri: str = DEFAULT_URI, *, on_action: OnAction | None = None) -> None:
        self.uri = uri
        self.on_action = on_action
        self._conn: Any = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Connect now (otherwise the first call does). `TemporaryError` if libvirtd does not answer."""
        self._connection()

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    # --- reading ---

    def domains(self) -> list[DomainInfo]:
        """Every domain, defined or transient, running or not (a domain gone mid-read is left out)."""
        doms = self._call("list domains", lambda conn: conn.listAllDomains(0))
        out = []
        for dom in doms:
            try:
                out.append(self._info(dom))
            except NotFoundError:
                continue
        return sorted(out, key=lambda d: (d.name, d.uuid))

    def network_leases(self) -> NetworkLeases:
        """The IPv4 leases of every active libvirt network (`virNetworkGetDHCPLeases`), each entry checked
        (`network_lease`: guest-written, hostile). At most `MAX_NETWORKS` networks and `MAX_NETWORK_LEASES`
        entries are looked at; beyond either the read says it is not `complete`. A network that goes away
        while it is read has no leases any more."""
        nets = self._call(
            "list networks", lambda conn: conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE)
        )
        complete = len(nets) <= MAX_NETWORKS
        leases: list[NetworkLease] = []
        refused: list[str] = []
        seen = 0
        for net in nets[:MAX_NETWORKS]:
            try:
                name, entries = self._call("read network leases", _leases_of(net))
            except NotFoundError:
                continue
            if not isinstance(entries, list):
                refused.append(f"network {name}: a lease list that is not a list")
                continue
            if seen + len(entries) > MAX_NETWORK_LEASES:
                complete = False
                entries = entries[: MAX_NETWORK_LEASES - seen]
            seen += len(entries)
            for raw in entries:
                got = network_lease(raw, name)
                if isinstance(got, str):
                    refused.append(f"network {name}: {got}")
                elif got is not None:
                    leases.append(got)
        return NetworkLeases(tuple(leases), tuple(refused), complete)

    def domain(self, uuid: str) -> DomainInfo:
        """The domain with `uuid`; `NotFoundError` if there is none."""
        return self._info(self._lookup(uuid))

    def _info(self, dom: Any) -> DomainInfo:
        def read(_conn: Any) -> tuple[str, int]:
            return dom.XMLDesc(0), dom.state()[0]

        xml, state = self._call("read domain", read)
        return parse_domain_xml(xml, state=state_name(state))

    def _lookup(self, uuid: str) -> Any:
        return self._call(f"look up domain {uuid}", lambda conn: conn.lookupByUUIDString(uuid))

    # --- managing (the lab) ---

    def define(self, xml: str) -> DomainInfo:
        """Define (or redefine) a persistent domain from `xml`; its `DomainInfo`."""
        dom = self._call("define domain", lambda conn: conn.defineXML(xml))
        return self._info(dom)

    def start(self, uuid: str) -> bool:
        """Start a defined domain; False if it was already active."""
        dom = self._lookup(uuid)
        if self._call(f"read state of {uuid}", lambda _c: dom.isActive()):
            return False
        self._call(f"start domain {uuid}", lambda _c: dom.create())
        return True

    def undefine(self, uuid: str) -> bool:
        """Remove a domain's persistent definition (a running domain becomes transient); False if gone."""
        try:
            dom = self._lookup(uuid)
        except NotFoundError:
            return False
        self._call(f"undefine domain {uuid}", lambda _c: dom.undefine())
        return True

    def set_labels(
        self, uuid: str, labels: Mapping[str, str], *, ips: Sequence[str] | None = None
    ) -> DomainInfo:
        """Replace the domain's hyperfence labels and keep its addresses (`ips` None), or replace those too;
        in the persistent definition, and in the running domain if it runs (a shut-off domain has no live
        side: libvirt refuses ``--live`` for it). The domain as read afterwards.

        The element holds both (`labels_xml`), and libvirt replaces it whole: writing labels without the
        ``<ip>`` children would take the VM out of the firewall. Nothing left removes the element.
        """
        dom = self._lookup(uuid)
        current = self._info(dom)
        keep = tuple(current.ips if ips is None else ips)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if current.is_active:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        text = labels_xml(labels, namespaced=False, ips=keep) if labels or keep else None
        self._call(
            f"set labels of {uuid}",
            lambda _c: dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, XMLNS_PREFIX if text else None, XMLNS, flags
            ),
        )
        return self._info(dom)

    def set_fw_cfg_file(self, uuid: str, name: str, path: str) -> None:
        """Add (or replace) firmware-config entry `name`, read from `path`, in the domain's persistent
        definition; the guest sees it from its next boot. The rest of the definition is kept as is."""
        dom = self._lookup(uuid)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE  # SECURE: keep its secrets
        xml = self._call(f"read the definition of {uuid}", lambda _c: dom.XMLDesc(flags))
        changed = with_fw_cfg_file(xml, name, path)
        self._call(f"redefine domain {uuid}", lambda conn: conn.defineXML(changed))

    def qemu_label(self, uuid: str) -> tuple[str | None, str]:
        """Whom libvirt runs the domain's QEMU as: (DAC label ``USER:GROUP`` or ``+UID:+GID``, where it comes
        from). The label of the running domain, else a static one in its definition, else libvirt's default
        for the domain's type (qemu.conf ``user``/``group``, as libvirt reports it in its capabilities); None
        when libvirt names none (no DAC driver: QEMU runs as libvirtd). See `adapters/qemu_files.py`."""
        dom = self._lookup(uuid)
        active = self._call(f"read state of {uuid}", lambda _c: dom.isActive())
        flags = 0 if active else libvirt.VIR_DOMAIN_XML_INACTIVE
        label, virt_type = dac_label(self._call(f"read domain {uuid}", lambda _c: dom.XMLDesc(flags)))
        if label is not None:
            return label, "the domain's DAC seclabel"
        base = dac_baselabel(self._call("read capabilities", lambda conn: conn.getCapabilities()), virt_type)
        if base is not None:
            return base, f"libvirt's QEMU user for {virt_type} domains, qemu.conf"
        return None, "libvirt names no DAC label: QEMU runs as libvirtd"

    def attach_device(self, uuid: str, xml: str) -> None:
        """Hot-plug the device `xml` (e.g. an ``<interface>``) into the running domain (live only)."""
        dom = self._lookup(uuid)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        self._call(f"attach a device to {uuid}", lambda _c: dom.attachDeviceFlags(xml, flags))

    def detach_device(self, uuid: str, xml: str) -> None:
        """Ask the running domain to release the device `xml` (live only). The guest must cooperate (ACPI
        hot-unplug); it is gone when libvirt reports the device removed, which may be seconds later."""
        dom = self._lookup(uuid)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        self._call(f"detach a device from {uuid}", lambda _c: dom.detachDeviceFlags(xml, flags))

    # --- actions (each reported to on_action) ---

    def pause(self, uuid: str) -> bool:
        """Pause (suspend) an active domain. True if it was paused now, False if it already was.

        `NotFoundError` if there is no such domain, `ConflictError` if it is not running.
        """
        return self._act(uuid, "pause", done_when={"paused", "pmsuspended"}, method="suspend")

    def resume(self, uuid: str) -> bool:
        """Resume a paused domain. True if resumed now, False if it was running already.

        `NotFoundError` if there is no such domain, `ConflictError` if it is shut off.
        """
        return self._act(uuid, "resume", done_when={"running", "blocked"}, method="resume")

    def destroy(self, uuid: str) -> bool:
        """Stop a domain at once (power off). True if it was stopped now, False if it was not active."""
        return self._act(uuid, "destroy", done_when={"shutoff", "crashed", "nostate"}, method="destroy")

    def pause_hook(self, uuid: str) -> bool:
        """`pause` for the agent monitor's `pause` hook: True if the VM is paused now, False otherwise
        (unknown to libvirt, shut off, libvirtd away: the caller then isolates it). Never raises."""
        try:
            self.pause(uuid)
        except HyperfenceError as exc:
            log.warning("pause %s: %s", uuid, exc)
            return False
        return True

    def _act(self, uuid: str, action: str, *, done_when: set[str], method: str) -> bool:
        name = uuid
        try:
            dom = self._lookup(uuid)
            name = self._call(f"read name of {uuid}", lambda _c: dom.name())
            state = state_name(self._call(f"read state of {uuid}", lambda _c: dom.state()[0]))
            if state in done_when:
                self._report(VmAction(uuid, name, action, "noop", f"already {state}"))
                return False
            if action != "destroy" and state not in _ACTIVE:
                raise ConflictError(f"libvirt {self.uri}: {action} {name} ({uuid}): the domain is {state}")
            self._call(f"{action} domain {name} ({uuid})", lambda _c: getattr(dom, method)())
        except HyperfenceError as exc:
            self._report(VmAction(uuid, name, action, "failed", str(exc)))
            raise
        self._report(VmAction(uuid, name, action, "done", f"was {state}"))
        return True

    def _report(self, action: VmAction) -> None:
        if self.on_action is not None:
            self.on_action(action)

    # --- the connection ---

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is None:
                self._conn = _open(self.uri)
            return self._conn

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """`fn(connection)`; reconnects once if the connection died (libvirtd restarted)."""
        for attempt in range(2):
            conn = self._connection()
            try:
                return fn(conn)
            except libvirt.libvirtError as exc:
                if attempt == 0 and not _is_alive(conn):
                    log.info("libvirt %s: connection lost (%s); reconnecting", self.uri, exc)
                    self._drop(conn)
                    continue
                raise _translate(exc, uri=self.uri, what=what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop(self, conn: Any) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


# ----------------------------------------------------------------------------------------------- events

_NETWORK_EVENTS = {0: "defined", 1: "undefined", 2: "started", 3: "stopped"}  # virNetworkEventLifecycleType
_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop (once per process) and run it on a daemon thread."""
    global _loop_started  # noqa: PLW0603 - one event loop per process is libvirt's own rule
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:  # pragma: no cover - libvirt's loop reports, we keep going
                    log.exception("libvirt event loop")

        threading.Thread(target=run, name="hf-libvirt-loop", daemon=True).start()
        _loop_started = True


class LibvirtEvents:
    """Watch one libvirtd's domain events; `on_event` gets `DomainEvent`s (on libvirt's event thread).

    `start()` returns at once; connecting, reconnecting (backoff `BACKOFF_MIN`..`BACKOFF_MAX` seconds,
    doubling) and the ``resync`` after each (re)connection happen on a watcher thread. `close()` stops it.
    """

    def __init__(self, uri: str = DEFAULT_URI, on_event: OnEvent | None = None) -> None:
        self.uri = uri
        self.on_event = on_event
        self.connections = 0  # how many times a connection was made (1 = first, 2+ = reconnected)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_connected(self) -> bool:
        return self.connections > 0 and not self._lost.is_set()

    def start(self) -> None:
        if self._thread is not None:
            return
        _ensure_event_loop()
        self._thread = threading.Thread(target=self._run, name="hf-libvirt-watch", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        delay = BACKOFF_MIN
        failures = 0
        while not self._stop.is_set():
            self._lost.clear()
            try:
                conn, ids = self._connect()
            except libvirt.libvirtError as exc:
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "libvirt %s: cannot watch events (%s); retrying every %.1f..%.0f s",
                    self.uri,
                    exc.get_error_message() or exc,
                    BACKOFF_MIN,
                    BACKOFF_MAX,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, failures = BACKOFF_MIN, 0
            self.connections += 1
            detail = "connected" if self.connections == 1 else "reconnected"
            log.info("libvirt %s: watching events (%s)", self.uri, detail)
            self._emit(DomainEvent("", "", "resync", detail))
            self._lost.wait()
            self._disconnect(conn, ids)
            if not self._stop.is_set():
                log.warning("libvirt %s: connection lost; reconnecting", self.uri)

    def _connect(self) -> tuple[Any, tuple[list[int], list[int]]]:
        conn = libvirt.open(self.uri)
        ids: list[int] = []
        net_ids: list[int] = []
        try:
            conn.registerCloseCallback(self._on_close, None)
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            )
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device_added, None
                )
            )
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed, None
                )
            )
            ids.append(
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None)
            )
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None
                )
            )
            net_ids.append(
                conn.networkEventRegisterAny(
                    None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, self._on_network, None
                )
            )
        except libvirt.libvirtError:
            self._disconnect(conn, (ids, net_ids))
            raise
        return conn, (ids, net_ids)

    def _disconnect(self, conn: Any, ids: tuple[list[int], list[int]]) -> None:
        for cb_id in ids[0]:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb_id)
        for cb_id in ids[1]:
            with contextlib.suppress(libvirt.libvirtError):
                conn.networkEventDeregisterAny(cb_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    # --- callbacks (libvirt's event thread) ---

    def _on_close(self, _conn: Any, reason: int, _opaque: object) -> None:
        log.debug("libvirt %s: connection closed (reason %d)", self.uri, reason)
        self._lost.set()

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: object) -> None:
        reason = _running_reason(dom) if event == RESUMED else None
        named = lifecycle_kind(event, detail, running_reason=reason)
        if named is None:  # the RESUMED of a domain that boots: its STARTED follows
            log.debug("libvirt %s: %s resumed as part of its start", self.uri, dom.name())
            return
        kind, what = named
        self._emit(DomainEvent(dom.UUIDString().lower(), dom.name(), kind, what))

    def _on_device_added(self, _conn: Any, dom: Any, alias: str, _opaque: object) -> None:
        self._emit(DomainEvent(dom.UUIDString().lower(), dom.name(), device_kind(alias, added=True), alias))

    def _on_device_removed(self, _conn: Any, dom: Any, alias: str, _opaque: object) -> None:
        self._emit(DomainEvent(dom.UUIDString().lower(), dom.name(), device_kind(alias, added=False), alias))

    def _on_reboot(self, _conn: Any, dom: Any, _opaque: object) -> None:
        self._emit(DomainEvent(dom.UUIDString().lower(), dom.name(), "reset", "reboot"))

    def _on_metadata(self, _conn: Any, dom: Any, kind: int, uri: str | None, _opaque: object) -> None:
        self._emit(
            DomainEvent(dom.UUIDString().lower(), dom.name(), "metadata-changed", metadata_detail(kind, uri))
        )

    def _on_network(self, _conn: Any, net: Any, event: int, _detail: int, _opaque: object) -> None:
        """A network started or stopped (or was defined, undefined): its leases come or go. The event names
        the network, not a domain (no UUID); the watcher re-reads everything on any event."""
        self._emit(DomainEvent("", net.name(), "network", _NETWORK_EVENTS.get(event, str(event))))

    def _emit(self, event: DomainEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a consumer's bug must not kill libvirt's event thread
            log.exception("libvirt event handler failed on %s", event)
