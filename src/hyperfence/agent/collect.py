"""Resource use (VREM), from /proc and /sys only. Every reader takes `root` (default "/") so tests can point it
at a fake tree.

A sample (`Collector.sample`) is one dict, the beat's `res`:

    dt      seconds covered by the deltas below (monotonic time since the previous sample)
    cpu     % busy of all CPUs together since the previous sample (0-100; iowait counts as idle)
    cpus    number of CPUs
    mem     bytes: total, available, free, cached, swap_total, swap_free
    load    [1 min, 5 min, 15 min]
    disk    per whole disk: read_bytes, write_bytes, reads, writes -- DELTAS since the previous sample
    net     per interface: rx_/tx_ bytes, packets, errors, drops -- DELTAS since the previous sample
    tcp     TCP sockets (IPv4 + IPv6) by state, e.g. {"ESTABLISHED": 3, "LISTEN": 2}; states with 0 omitted
    udp     number of UDP sockets (IPv4 + IPv6)
    procs   number of processes
    uptime  seconds since boot

Disk and network figures are deltas (not counters) so each beat stands alone for the host's detector; a
counter that went backwards (an interface re-created, a disk re-attached) yields its new value as the delta.
`Collector.prime` takes the baseline (the agent primes before its hello), so the first beat already has
real deltas; without it, a first sample's deltas are the counters themselves.

A part that cannot be read is left out of the sample and reported in `errors` (the agent turns these into
`collector_error` events); it never stops the others.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from hyperfence.agent.sockets import TCP_STATES, Sock

SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size
MEM_FIELDS = {
    "MemTotal": "total",
    "MemAvailable": "available",
    "MemFree": "free",
    "Cached": "cached",
    "SwapTotal": "swap_total",
    "SwapFree": "swap_free",
}
NET_FIELDS = (
    ("rx_bytes", 0),
    ("rx_packets", 1),
    ("rx_errors", 2),
    ("rx_drops", 3),
    ("tx_bytes", 8),
    ("tx_packets", 9),
    ("tx_errors", 10),
    ("tx_drops", 11),
)
DISK_PREFIXES_SKIPPED = ("loop", "ram", "zram", "fd", "sr")


def _read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel), encoding="ascii", errors="replace") as f:
        return f.read()


def read_cpu_times(root: str = "/") -> tuple[int, int, int]:
    """(total jiffies, idle jiffies incl. iowait, number of CPUs) from /proc/stat."""
    text = _read(root, "proc/stat")
    total = idle = cpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
        elif line.startswith("cpu"):
            cpus += 1
        elif cpus:
            break  # the cpuN lines come first
    return total, idle, max(cpus, 1)


def read_memory(root: str = "/") -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(root, "proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        key = MEM_FIELDS.get(name)
        if key is not None:
            out[key] = int(rest.split()[0]) * 1024
    return out


def read_load(root: str = "/") -> list[float]:
    return [float(v) for v in _read(root, "proc/loadavg").split()[:3]]


def read_uptime(root: str = "/") -> float:
    return float(_read(root, "proc/uptime").split()[0])


def count_processes(root: str = "/") -> int:
    return sum(1 for name in os.listdir(os.path.join(root, "proc")) if name.isdigit())


def read_disks(root: str = "/") -> dict[str, tuple[int, int, int, int]]:
    """Per whole disk (those listed in /sys/block, without loop, ram, floppy and cd-rom devices): counters
    (read_bytes, write_bytes, reads, writes) from /proc/diskstats."""
    try:
        disks = {
            n for n in os.listdir(os.path.join(root, "sys/block")) if not n.startswith(DISK_PREFIXES_SKIPPED)
        }
    except FileNotFoundError:
        disks = set()
    out: dict[str, tuple[int, int, int, int]] = {}
    for line in _read(root, "proc/diskstats").splitlines():
        p = line.split()
        if len(p) >= 10 and p[2] in disks:
            out[p[2]] = (int(p[5]) * SECTOR, int(p[9]) * SECTOR, int(p[3]), int(p[7]))
    return out


def read_interfaces(root: str = "/") -> dict[str, tuple[int, ...]]:
    """Per interface: counters in NET_FIELDS order, from /proc/net/dev."""
    out: dict[str, tuple[int, ...]] = {}
    for line in _read(root, "proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        p = rest.split()
        if len(p) >= 12:
            out[name.strip()] = tuple(int(p[i]) for _, i in NET_FIELDS)
    return out


def count_tcp_states(sockets: list[Sock]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sockets:
        if s.proto == "tcp":
            name = TCP_STATES.get(s.state, str(s.state))
            counts[name] = counts.get(name, 0) + 1
    return counts


def _delta(now: int, before: int | None) -> int:
    if before is None or now < before:
        return now
    return now - before


class Collector:
    """Samples resource use; keeps the previous counters to report deltas."""

    def __init__(self, root: str = "/") -> None:
        self.root = root
        self._cpu: tuple[int, int] | None = None
        self._disks: dict[str, tuple[int, int, int, int]] = {}
        self._nets: dict[str, tuple[int, ...]] = {}
        self._at: float | None = None

    def prime(self, *, now: float) -> None:
        """Take the baseline the first sample's deltas are computed against."""
        self.sample(now=now, sockets=None)

    def sample(
        self, *, now: float, sockets: list[Sock] | None
    ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """(res, errors): `now` is a monotonic time; `sockets` the socket table read for this interval (None:
        no tcp/udp figures). `errors` holds (part, message) for each part that could not be read."""
        res: dict[str, Any] = {"dt": round(now - self._at, 3) if self._at is not None else 0.0}
        self._at = now
        errors: list[tuple[str, str]] = []
        parts: list[tuple[str, Callable[[], None]]] = [
            ("cpu", lambda: self._sample_cpu(res)),
            ("mem", lambda: res.__setitem__("mem", read_memory(self.root))),
            ("load", lambda: res.__setitem__("load", read_load(self.root))),
            ("disk", lambda: res.__setitem__("disk", self._disk_deltas())),
            ("net", lambda: res.__setitem__("net", self._net_deltas())),
            ("procs", lambda: res.__setitem__("procs", count_processes(self.root))),
            ("uptime", lambda: res.__setitem__("uptime", read_uptime(self.root))),
        ]
        for what, run in parts:
            try:
                run()
            except Exception as e:  # a collector must never stop the agent
                errors.append((what, f"{type(e).__name__}: {e}"[:200]))
        if sockets is not None:
            res["tcp"] = count_tcp_states(sockets)
            res["udp"] = sum(1 for s in sockets if s.proto == "udp")
        return res, errors

    def _sample_cpu(self, res: dict[str, Any]) -> None:
        total, idle, cpus = read_cpu_times(self.root)
        before, self._cpu = self._cpu, (total, idle)
        busy = 0.0
        if before is not None and total > before[0]:
            d_total, d_idle = total - before[0], idle - before[1]
            busy = max(0.0, min(100.0, 100.0 * (d_total - d_idle) / d_total))
        res["cpu"] = round(busy, 2)
        res["cpus"] = cpus

    def _disk_deltas(self) -> dict[str, dict[str, int]]:
        now = read_disks(self.root)
        out = {}
        for name, values in now.items():
            old = self._disks.get(name)
            d = [_delta(v, old[i] if old else None) for i, v in enumerate(values)]
            out[name] = {"read_bytes": d[0], "write_bytes": d[1], "reads": d[2], "writes": d[3]}
        self._disks = now
        return out

    def _net_deltas(self) -> dict[str, dict[str, int]]:
        now = read_interfaces(self.root)
        out = {}
        for name, values in now.items():
            old = self._nets.get(name)
            out[name] = {
                key: _delta(values[i], old[i] if old else None) for i, (key, _) in enumerate(NET_FIELDS)
            }
        self._nets = now
        return out
