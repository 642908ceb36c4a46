"""Traffic log: NFLOG packets from hyperfence's rules -> JSON lines in `<state>/traffic.jsonl`.

The kernel already rate-limits every logging rule per VM and direction (`limit rate N/second` in each VM
chain), so a deny flood costs the host at most N events per second per VM. The file is rotated at
`MAX_BYTES` (one old file kept), so the log cannot fill the disk either. It is 0600: traffic metadata.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from hyperfence.adapters.nflog import NflogReader
from hyperfence.codec.nflog import NflogPacket
from hyperfence.errors import HyperfenceError
from hyperfence.reconcile.supervisor import wake_fd
from hyperfence.ruleset.compile import LOG_PREFIX, vm_sid
from hyperfence.system.state_dir import open_private

log = logging.getLogger("hyperfence.traffic")

TRAFFIC_FILE = "traffic.jsonl"
MAX_BYTES = 20 * 1024 * 1024
READ_TIMEOUT = 0.5  # how often the loop looks at a plain `stop` Event while nothing is logged
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 58: "ipv6-icmp"}
ETHERTYPES = {0x0800: "ipv4", 0x0806: "arp", 0x86DD: "ipv6"}


class _EngineLike(Protocol):
    state_dir: str
    netns: str | None

    @property
    def current(self) -> Any: ...


def traffic_record(pkt: NflogPacket, vm_names: dict[str, str], *, now: float) -> dict[str, Any] | None:
    """One JSON-able event, or None for packets not logged by hyperfence (prefix not ours)."""
    parts = pkt.prefix.split(":", 4)
    if len(parts) != 5 or parts[0] != LOG_PREFIX:
        return None
    _, sid, direction, verdict, comment = parts
    rule = comment
    if comment.startswith("rule:"):
        rule = comment[len("rule:") :].split("#", 1)[0]
    ts = pkt.timestamp if pkt.timestamp is not None else now
    rec: dict[str, Any] = {
        "time": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
        "vm": vm_names.get(sid, None if sid == "-" else sid),
        "direction": direction,
        "verdict": verdict,
        "rule": rule,
        "nft_rule": comment.removesuffix(":log"),
        "ethertype": ETHERTYPES.get(pkt.hw_protocol, f"{pkt.hw_protocol:#06x}"),
    }
    if pkt.src is not None:
        rec.update(src=pkt.src, dst=pkt.dst, protocol=PROTOCOLS.get(pkt.protocol or -1, pkt.protocol))
    if pkt.sport is not None:
        rec.update(sport=pkt.sport, dport=pkt.dport)
    if pkt.icmp_type is not None:
        rec.update(icmp_type=pkt.icmp_type, icmp_code=pkt.icmp_code)
    if pkt.arp_op is not None:
        rec.update(arp_op=pkt.arp_op, src=pkt.arp_sender_ip, dst=pkt.arp_target_ip)
    if pkt.mac_src is not None:
        rec["mac_src"] = pkt.mac_src
    if sid == "-":
        rec["port_ifindex"] = pkt.physindev if direction == "out" else pkt.physoutdev
    return rec


def _vm_names(compiled: Any) -> dict[str, str]:
    if compiled is None:
        return {}
    return {vm_sid(v.id): v.name for v in compiled.policy.vms}


def _open_log(path: str) -> TextIO:
    """Appended to, 0600: who talked to whom is for root only (the state directory is 0700 as well)."""
    return os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")


def run_traffic_log(engine: _EngineLike, stop: threading.Event, *, group: int | None = None) -> None:
    """Read NFLOG until `stop` is set, appending records to the traffic file.

    Runs on its own thread: it only reads `engine.current` (the last compiled policy, a frozen snapshot) and
    never compiles, so it cannot race the reconcile loop."""
    compiled = engine.current
    if group is None:
        group = compiled.policy.settings.nflog_group if compiled is not None else 7
    try:
        reader = NflogReader(group, netns=engine.netns)
    except HyperfenceError as e:
        log.error("traffic log disabled: %s", e)
        return
    path = os.path.join(engine.state_dir, TRAFFIC_FILE)
    names = _vm_names(compiled)
    out = _open_log(path)
    try:
        wake = wake_fd(stop)
        with reader:
            while not stop.is_set():
                packets = reader.read(READ_TIMEOUT, wake=wake)
                if not packets:
                    continue
                if engine.current is not compiled:
                    was, compiled = compiled, engine.current
                    # (a change of rules keeps the very VMs: no pass over them all again)
                    if was is None or compiled is None or compiled.policy.vms is not was.policy.vms:
                        names = _vm_names(compiled)
                now = time.time()
                for pkt in packets:
                    rec = traffic_record(pkt, names, now=now)
                    if rec is not None:
                        out.write(json.dumps(rec) + "\n")
                out.flush()
                if out.tell() > MAX_BYTES:
                    out.close()
                    os.replace(path, path + ".1")
                    out = _open_log(path)
    finally:
        out.close()


class TrafficLog:
    """The traffic log as a monitor (reconcile/monitor.py): `run_traffic_log` on the engine. Started after
    the first compile, which names the NFLOG group."""

    name = "traffic"

    def __init__(self, engine: _EngineLike) -> None:
        self.engine = engine

    def run(self, stop: threading.Event) -> None:
        run_traffic_log(self.engine, stop)
