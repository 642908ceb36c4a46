"""What hyperfence reads from libvirt, as plain data, and the pure functions that read it. No I/O.

`adapters/libvirt.py` does the talking (and is the only module importing `libvirt`); everything here works
on XML text and integers, so it is tested without a libvirtd.

A domain's hyperfence labels live in its metadata, in our own namespace::

    <metadata>
      <hf:labels xmlns:hf="https://hyperfence.dev/xmlns/1">
        <hf:label key="tier">web</hf:label>
      </hf:labels>
    </metadata>

(`label` children are accepted with or without the namespace: ``virsh metadata`` writes them either way.)
Its agent channel is the virtio-serial port named `AGENT_CHANNEL`, whose host end is a unix socket that
QEMU listens on (``<source mode='bind' path='…'/>``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from hyperfence.errors import InvalidInputError, Problem
from hyperfence.model.lease import NetworkLease

XMLNS = "https://hyperfence.dev/xmlns/1"
"""The namespace of hyperfence's domain metadata; libvirt keys metadata by this URI."""
XMLNS_PREFIX = "hf"
AGENT_CHANNEL = "org.hyperfence.agent.0"
"""The virtio-serial port name of the hyperfence agent."""
QEMU_USER = "libvirt-qemu"
"""The user libvirt runs QEMU as on Debian (qemu.conf ``user``): files QEMU opens itself must be readable by it."""
AGENT_FW_CFG = "opt/org.hyperfence/agent"
"""The QEMU firmware-config file that hands the agent its JSON config (key included) at boot; in the guest:
``/sys/firmware/qemu_fw_cfg/by_name/opt/org.hyperfence/agent/raw`` (module ``qemu_fw_cfg``, root only)."""

# virDomainState
DOMAIN_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting-down",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}

# virDomainEventType -> (kind, {detail number: detail name})
_LIFECYCLE: dict[int, tuple[str, dict[int, str]]] = {
    0: ("defined", {0: "added", 1: "updated", 2: "renamed", 3: "from-snapshot"}),
    1: ("undefined", {0: "removed", 1: "renamed"}),
    2: ("started", {0: "booted", 1: "migrated", 2: "restored", 3: "from-snapshot", 4: "wakeup"}),
    3: (
        "paused",
        {
            0: "paused",
            1: "migrated",
            2: "ioerror",
            3: "watchdog",
            4: "restored",
            5: "from-snapshot",
            6: "api-error",
            7: "postcopy",
            8: "postcopy-failed",
        },
    ),
    4: ("resumed", {0: "unpaused", 1: "migrated", 2: "from-snapshot", 3: "postcopy", 4: "postcopy-failed"}),
    5: (
        "stopped",
        {
            0: "shutdown",
            1: "destroyed",
            2: "crashed",
            3: "migrated",
            4: "saved",
            5: "failed",
            6: "from-snapshot",
        },
    ),
    6: ("shutdown", {0: "finished", 1: "guest", 2: "host"}),
    7: ("paused", {0: "memory", 1: "disk"}),
    8: ("crashed", {0: "panicked", 1: "crashloaded"}),
}
_MIGRATED = {(2, 1), (5, 3)}  # started because migrated in, stopped because migrated out
RESUMED = 4  # virDomainEventType VIR_DOMAIN_EVENT_RESUMED
RUNNING = 1  # virDomainState VIR_DOMAIN_RUNNING
RUNNING_BOOTED = 1  # virDomainRunningReason: the CPUs run because the domain was started
RUNNING_UNPAUSED = 5  # ... because a paused domain was resumed (virsh resume)

ET.register_namespace(XMLNS_PREFIX, XMLNS)  # serialize our elements as hf:..., as libvirt shows them


@dataclass(frozen=True)
class DomainNic:
    """One interface of a domain. `tap` is the host-side device, known only while the domain runs."""

    mac: str
    tap: str | None
    bridge: str | None


@dataclass(frozen=True)
class DomainInfo:
    """One libvirt domain as hyperfence sees it; keyed by `uuid` (the name is only for people)."""

    uuid: str
    name: str
    state: str
    interfaces: tuple[DomainNic, ...]
    agent_socket: str | None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)  # a dict: left out of the hash
    # The VM's addresses, from the same metadata element (`<ip>10.77.0.11</ip>`): what anti-spoofing lets it
    # send from. libvirt does not know a bridged guest's addresses; without them its tap gets nothing.
    ips: tuple[str, ...] = ()
    # libvirt's id of the running domain (``<domain id='N'>``): a new one at every start, None while it is
    # off. A changed id means the domain started again since it was last read (a reset keeps the id).
    domain_id: int | None = None

    @property
    def is_active(self) -> bool:
        """Whether QEMU runs for it (running or paused): its taps exist."""
        return self.state not in {"shutoff", "crashed", "nostate"}


@dataclass(frozen=True)
class DomainEvent:
    """Something may have changed in the inventory: re-read it (level-triggered).

    `kind` is one of defined, undefined, started, stopped, paused, unpaused, resumed, migrated, shutdown,
    crashed, nic-added, nic-removed, device-added, device-removed, ``reset`` (the guest was reset or
    rebooted: it keeps running, its agent starts again), ``metadata-changed`` (labels or addresses may have
    changed; detail: what changed, `metadata_detail`), and ``resync`` (uuid and name empty): the connection
    to libvirtd was (re)made and events may have been missed, so re-read everything.
    """

    uuid: str
    name: str
    kind: str
    detail: str


@dataclass(frozen=True)
class VmAction:
    """A VM action hyperfence asked libvirt for: `outcome` is done, noop (already so) or failed."""

    uuid: str
    name: str
    action: str
    outcome: str
    message: str


def state_name(state: int) -> str:
    """The name of libvirt's domain state number `state` ("running", "paused", "shutoff", ...)."""
    return DOMAIN_STATES.get(state, f"state-{state}")


def lifecycle_kind(event: int, detail: int, *, running_reason: int | None = None) -> tuple[str, str] | None:
    """(kind, detail) of a libvirt lifecycle event (virDomainEventType, its detail number), or None for an
    event that is only part of another one.

    libvirt reports every time a domain's CPUs start running as RESUMED, detail ``unpaused``: when someone
    resumes a paused domain, but also when a domain boots (QEMU starts paused, libvirt lets it run and sends
    RESUMED just before STARTED ``booted``), when a migration or a restore completes. The event alone cannot
    tell; the domain's running reason right after it can (`running_reason`, virDomainRunningReason, from
    ``virDomainGetState``; None when it could not be read or the domain no longer runs):

    * booted: the start's own RESUMED -> None; the STARTED that follows is the start;
    * unpaused: a paused domain was resumed -> ``unpaused``;
    * anything else, or unknown -> ``resumed`` with libvirt's detail (``migrated``, ``from-snapshot``, ...).

    Migration shows as ``migrated`` (detail ``in`` on the target, ``out`` on the source); unknown numbers
    from a newer libvirt keep their number (``event-12``, ``detail-9``).
    """
    if (event, detail) in _MIGRATED:
        return "migrated", "in" if event == 2 else "out"
    kind, details = _LIFECYCLE.get(event, (f"event-{event}", {}))
    name = details.get(detail, f"detail-{detail}")
    if event == RESUMED and running_reason == RUNNING_BOOTED:
        return None
    if event == RESUMED and running_reason == RUNNING_UNPAUSED:
        return "unpaused", name
    return kind, name


def metadata_detail(kind: int, uri: str | None) -> str:
    """What a metadata-change event (virDomainMetadataType `kind`, namespace `uri`) says changed: ``title``,
    ``description``, ``element <uri>``; ``hyperfence`` for our own element."""
    if kind == 2:
        return "hyperfence" if uri == XMLNS else f"element {uri or '?'}"
    return {0: "description", 1: "title"}.get(kind, f"metadata-{kind}")


def device_kind(alias: str, *, added: bool) -> str:
    """nic-added/-removed for a NIC's device alias (libvirt names NICs ``net<N>``), else device-*."""
    what = "nic" if alias.startswith("net") and alias[3:].isdigit() else "device"
    return f"{what}-{'added' if added else 'removed'}"


def parse_domain_xml(xml: str, *, state: str = "unknown") -> DomainInfo:
    """The `DomainInfo` of a domain's XML (``virDomainGetXMLDesc``); `state` comes from libvirt separately.

    The XML of a running or paused domain (its root has an ``id``) names the taps; a shut-off domain's
    interfaces have ``tap=None`` even when a target device name is configured, because that device does not
    exist. MACs are lowercased. Interfaces without a MAC, channels other than the agent's, labels without
    a key are ignored. Raises `InvalidInputError` for text that is not a domain with a name and a UUID.
    """
    try:
        root = ET.fromstring(xml)  # noqa: S314 - see the import
    except ET.ParseError as exc:
        raise InvalidInputError(f"libvirt domain XML is not well-formed: {exc}") from exc
    problems = []
    if root.tag != "domain":
        problems.append(Problem("", f"root element is <{root.tag}>, expected <domain>"))
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not name:
        problems.append(Problem("domain.name", "missing"))
    if not uuid:
        problems.append(Problem("domain.uuid", "missing"))
    if problems:
        raise InvalidInputError("not a libvirt domain", problems)
    dom_id = root.get("id")
    active = dom_id not in {None, "-1"}
    return DomainInfo(
        uuid=uuid,
        name=name,
        state=state,
        interfaces=tuple(_interfaces(root, active=active)),
        agent_socket=_agent_socket(root),
        labels=_labels(root),
        ips=_ips(root),
        domain_id=int(dom_id) if active and dom_id is not None and dom_id.isdigit() else None,
    )


def _interfaces(root: ET.Element, *, active: bool) -> list[DomainNic]:
    nics = []
    for iface in root.iterfind("devices/interface"):
        mac = iface.find("mac")
        address = mac.get("address") if mac is not None else None
        if not address:
            continue
        target = iface.find("target")
        source = iface.find("source")
        nics.append(
            DomainNic(
                mac=address.lower(),
                tap=target.get("dev") if active and target is not None else None,
                bridge=source.get("bridge") if source is not None else None,
            )
        )
    return nics


def _agent_socket(root: ET.Element) -> str | None:
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if (
            channel.get("type") == "unix"
            and target is not None
            and target.get("type") == "virtio"
            and target.get("name") == AGENT_CHANNEL
            and source is not None
            and source.get("path")
        ):
            return source.get("path")
    return None


def _labels(root: ET.Element) -> dict[str, str]:
    labels: dict[str, str] = {}
    for element in root.iterfind(f"metadata/{{{XMLNS}}}labels"):
        for label in element:
            if label.tag in {"label", f"{{{XMLNS}}}label"} and label.get("key"):
                labels[str(label.get("key"))] = (label.text or "").strip()
    return labels


def _ips(root: ET.Element) -> tuple[str, ...]:
    return tuple(
        (ip.text or "").strip()
        for element in root.iterfind(f"metadata/{{{XMLNS}}}labels")
        for ip in element
        if ip.tag in {"ip", f"{{{XMLNS}}}ip"} and (ip.text or "").strip()
    )


def labels_xml(labels: Mapping[str, str], *, namespaced: bool = True, ips: tuple[str, ...] = ()) -> str:
    """The metadata element holding `labels` (keys sorted) and the VM's addresses, as in a domain's XML.

    With ``namespaced=False`` the elements carry no namespace: what ``virDomainSetMetadata`` takes (it
    puts the element into the URI and prefix it is given, and refuses an element that declares one).
    """
    ns = f"{{{XMLNS}}}" if namespaced else ""
    root = ET.Element(f"{ns}labels")
    for key in sorted(labels):
        label = ET.SubElement(root, f"{ns}label", key=key)
        label.text = labels[key]
    for addr in ips:
        ET.SubElement(root, f"{ns}ip").text = addr
    return ET.tostring(root, encoding="unicode")


def dac_label(xml: str) -> tuple[str | None, str]:
    """(the DAC label QEMU runs with, the domain's type) from a domain's XML: the ``<label>`` of its
    ``<seclabel model='dac'>`` (a running domain shows the one libvirt gave it, ``+64055:+64055``; a definition
    only a static one), None when it names none. The type (``kvm``, ``qemu``) picks libvirt's default for it
    (`dac_baselabel`). `InvalidInputError` for text that is not XML."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    except ET.ParseError as e:
        raise InvalidInputError("domain XML", [Problem("xml", f"not XML: {e}")]) from e
    for seclabel in root.iterfind("seclabel"):
        label = (seclabel.findtext("label") or "").strip()
        if seclabel.get("model") == "dac" and seclabel.get("type") != "none" and label:
            return label, root.get("type") or "kvm"
    return None, root.get("type") or "kvm"


def dac_baselabel(capabilities: str, virt_type: str) -> str | None:
    """The DAC label libvirt runs QEMU domains of `virt_type` with by default (qemu.conf's ``user`` and
    ``group``), from its capabilities XML (``<secmodel><model>dac</model><baselabel type='kvm'>+64055:+64055``);
    None when it names none (the DAC driver is off: QEMU runs as libvirtd's own user)."""
    try:
        root = ET.fromstring(capabilities)  # noqa: S314 - libvirt's own XML
    except ET.ParseError as e:
        raise InvalidInputError("capabilities XML", [Problem("xml", f"not XML: {e}")]) from e
    for model in root.iterfind("host/secmodel"):
        if (model.findtext("model") or "").strip() != "dac":
            continue
        for base in model.iterfind("baselabel"):
            if base.get("type") == virt_type and (base.text or "").strip():
                return (base.text or "").strip()
    return None


def with_fw_cfg_file(xml: str, name: str, path: str) -> str:
    """The domain `xml` with the firmware-config entry `name` read from file `path` (``<sysinfo type='fwcfg'>``),
    replacing an entry of that name; everything else is kept. Pure; `InvalidInputError` for XML that is not a
    domain, or a name or path QEMU would not take."""
    problems = []
    if not name.startswith("opt/") or any(c in name for c in ",\n"):
        problems.append(Problem("name", f"{name!r} (expected opt/<vendor>/<name>, no commas)"))
    if not path.startswith("/") or any(c in path for c in ",\n"):
        problems.append(Problem("path", f"{path!r} (expected an absolute path without commas)"))
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own XML
    except ET.ParseError as e:
        raise InvalidInputError("domain XML", [Problem("xml", f"not XML: {e}")]) from e
    if root.tag != "domain":
        problems.append(Problem("xml", f"root element {root.tag!r} (expected 'domain')"))
    if problems:
        raise InvalidInputError("cannot add the firmware-config entry", problems)
    ET.register_namespace(XMLNS_PREFIX, XMLNS)
    sysinfo = root.find("sysinfo[@type='fwcfg']")
    if sysinfo is None:
        sysinfo = ET.Element("sysinfo", type="fwcfg")
        after = [
            i for i, child in enumerate(root) if child.tag in ("name", "uuid", "metadata", "memory", "vcpu")
        ]
        root.insert(max(after, default=-1) + 1, sysinfo)
    for entry in sysinfo.findall("entry"):
        if entry.get("name") == name:
            sysinfo.remove(entry)
    ET.SubElement(sysinfo, "entry", name=name, file=path)
    return ET.tostring(root, encoding="unicode")


# ------------------------------------------------------------------------------------- network leases

LEASE_IPV4 = 0  # virIPAddrType VIR_IP_ADDR_TYPE_IPV4
MAX_NETWORK_NAME = 255
MAX_IFNAME = 15  # IFNAMSIZ - 1
MAX_EXPIRY = 2**40  # seconds since the epoch: anything later is not a time


def network_lease(raw: object, network: str) -> NetworkLease | str | None:
    """One entry of `virNetworkGetDHCPLeases` on `network`, checked: a `NetworkLease`, None for an entry
    that is not an IPv4 lease (IPv6 is not learned), or the reason it is refused.

    libvirt writes its lease list from what dnsmasq's clients sent: the entry is hostile input. Only the
    fields needed are read, each by type and size before it is parsed (`mac` 17 characters, `ipaddr` at
    most 15, `iface` a device name, `expirytime` an integer in range); the guest-chosen `hostname` and
    `clientid` are never read."""
    if not isinstance(raw, Mapping):
        return f"not a lease record ({type(raw).__name__})"
    if raw.get("type") != LEASE_IPV4:
        return None
    mac, ip, iface, expiry = raw.get("mac"), raw.get("ipaddr"), raw.get("iface"), raw.get("expirytime")
    if not isinstance(mac, str) or len(mac) != 17 or not _is_mac(mac.lower()):
        return f"mac {_shown(mac)} is not a MAC address"
    if not isinstance(ip, str) or not 7 <= len(ip) <= 15:
        return f"ipaddr {_shown(ip)} is not an IPv4 address"
    try:
        address = IPv4Address(ip)
    except ValueError:
        return f"ipaddr {_shown(ip)} is not an IPv4 address"
    if not isinstance(iface, str) or not 1 <= len(iface) <= MAX_IFNAME:
        return f"iface {_shown(iface)} is not a device name"
    if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 <= expiry < MAX_EXPIRY:
        return f"expirytime {_shown(expiry)} is not a time"
    return NetworkLease(network, iface, mac.lower(), address, float(expiry) if expiry else None)


def _is_mac(text: str) -> bool:
    return all(
        len(part) == 2 and all(c in "0123456789abcdef" for c in part) for part in text.split(":")
    ) and (text.count(":") == 5)


def _shown(value: object) -> str:
    """`value` for an error message, cut short (it may be long, and is not ours)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class NetworkLeases:
    """What one read of every active libvirt network's lease list gave: the IPv4 `leases`, the entries
    `refused` (with the reason), and whether the read is `complete` (False: a bound cut it short, so a
    lease missing from it may still exist)."""

    leases: tuple[NetworkLease, ...]
    refused: tuple[str, ...] = ()
    complete: bool = True
