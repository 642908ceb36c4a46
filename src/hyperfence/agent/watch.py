"""Security events (VSEM): what changed in the guest since the previous interval, as small dicts.

    {"type": "listen", "proto": "tcp", "addr": "0.0.0.0", "port": 22, "uid": 0, "pid": 412, "comm": "sshd",
     "exe": "sshd"}                         a socket started listening (TCP LISTEN, or an unconnected bound UDP
                                            socket); "initial": true on the first beat after the agent starts
    {"type": "unlisten", "proto": "tcp", "addr": "0.0.0.0", "port": 22}
    {"type": "connect", "proto": "tcp", "dst": "10.0.0.5", "dport": 443, "uid": 1000, "pid": 977,
     "comm": "curl", "exe": "curl", "count": 1}
                                            new outbound TCP connections (ESTABLISHED or SYN_SENT, local port
                                            not a listening port) and newly connected UDP sockets, one event per
                                            (proto, dst, dport, pid) with how many
    {"type": "fanout", "peers": 12, "ports": 3, "conns": 40}
                                            among this interval's new outbound connections: distinct remote
                                            addresses, distinct remote ports, connections (only when > 0)
    {"type": "auth_fail", "count": 5, "sources": {"203.0.113.9": 5}}
                                            lines of the configured auth logs written this interval that match a
                                            login failure; the source address when the line names one
    {"type": "dropped", "count": 17}        events beyond the per-beat cap (see `cap_events`)

Baseline: the first interval after start reports every existing listener as a "listen" event with
`"initial": true` (so the host can tell "was already there" from "just appeared" after an agent restart);
existing connections are only the baseline (no events). Auth logs are read from their end at start.

What is never read: payload, files' contents other than the auth logs' new lines (which are matched and
dropped at once: no user name and no line text leaves this module), command lines, environments, keys.
Process identity is `comm` and the basename of `/proc/PID/exe`.

Sampling: sockets are compared once per interval, so a listener or connection that lives less than an
interval can be missed. Socket owners (inode -> pid) are found by scanning /proc/*/fd ONLY when a new
listener or outbound connection appeared, with the processes that owned recent sockets scanned first, and
the scan stops as soon as every new inode is found.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from typing import Any, BinaryIO

from hyperfence.agent.sockets import ESTABLISHED, LISTEN, SYN_SENT, Sock, decode_addr, is_zero

MAX_EVENTS = 100
MAX_SOURCES = 20
MAX_READ = 1 << 20  # bytes of one auth log read per interval; a flood is caught up with over several
MAX_PARTIAL = 64 * 1024
RECENT_OWNERS = 32
AUTH_FAILURE = re.compile(rb"Failed password|Invalid user|authentication failure|\bFAILED\b")
SOURCE = re.compile(rb"(?:\bfrom|\brhost=)\s*([0-9A-Fa-f:.]{3,45})")


Owner = tuple[int, str, str]  # pid, comm, exe basename


def read_owners(inodes: set[int], *, root: str = "/", first: list[int] | None = None) -> dict[int, Owner]:
    """For each socket inode, a process holding it: scans /proc/PID/fd of `first` (likely owners), then of
    every process, and stops once all are found. Processes that vanish or cannot be read are skipped."""
    targets = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, Owner] = {}
    if not targets:
        return found
    proc = os.path.join(root, "proc")
    try:
        everyone = [int(n) for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return found
    order = list(dict.fromkeys([*(first or []), *everyone]))
    for pid in order:
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        hit = False
        for fd in fds:
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            inode = targets.pop(link, None)
            if inode is not None:
                hit = True
                found[inode] = (pid, "", "")
        if hit:
            owner = (pid, *read_identity(pid, root=root))
            for inode, (p, _, _) in found.items():
                if p == pid:
                    found[inode] = owner
        if not targets:
            break
    return found


def read_identity(pid: int, *, root: str = "/") -> tuple[str, str]:
    """(comm, basename of exe) of a process; "" for what cannot be read. Never the command line."""
    base = os.path.join(root, "proc", str(pid))
    comm = exe = ""
    with (
        contextlib.suppress(OSError),
        open(os.path.join(base, "comm"), encoding="utf-8", errors="replace") as f,
    ):
        comm = f.read(64).strip()
    with contextlib.suppress(OSError):
        exe = os.path.basename(os.readlink(os.path.join(base, "exe")))[:64]
    return comm, exe


def cap_events(events: list[dict[str, Any]], limit: int = MAX_EVENTS) -> list[dict[str, Any]]:
    """At most `limit` events, then {"type": "dropped", "count": N} for the rest."""
    if len(events) <= limit:
        return events
    return [*events[:limit], {"type": "dropped", "count": len(events) - limit}]


class Watcher:
    """Diffs the socket table and tails auth logs; `events` returns what happened since its previous call."""

    def __init__(self, *, root: str = "/", auth_logs: tuple[str, ...] = ()) -> None:
        self.root = root
        self._listeners: dict[tuple[str, bytes, int], Sock] | None = None
        self._outbound: set[int] = set()
        self._recent: list[int] = []
        self._tails = [LogTail(path) for path in auth_logs]
        self.scans = 0  # /proc/*/fd scans done (tests and the benchmark watch the budget)

    def events(self, sockets: list[Sock]) -> list[dict[str, Any]]:
        first = self._listeners is None
        listeners = {_listen_key(s): s for s in sockets if _is_listener(s)}
        before = self._listeners or {}
        tcp_ports = {s.lport for s in listeners.values() if s.proto == "tcp"}
        outbound = [s for s in sockets if s.inode and _is_outbound(s, tcp_ports)]
        new_listeners = [s for k, s in listeners.items() if k not in before]
        gone = [s for k, s in before.items() if k not in listeners]
        new_out = [] if first else [s for s in outbound if s.inode not in self._outbound]
        self._listeners = listeners
        self._outbound = {s.inode for s in outbound}

        wanted = {s.inode for s in new_listeners if s.inode} | {s.inode for s in new_out[:MAX_EVENTS]}
        owners: dict[int, Owner] = {}
        if wanted:
            self.scans += 1
            owners = read_owners(wanted, root=self.root, first=self._recent)
            pids = [o[0] for o in owners.values()]
            self._recent = list(dict.fromkeys([*pids, *self._recent]))[:RECENT_OWNERS]

        out: list[dict[str, Any]] = []
        if new_out:
            out.append(
                {
                    "type": "fanout",
                    "peers": len({s.remote for s in new_out}),
                    "ports": len({s.rport for s in new_out}),
                    "conns": len(new_out),
                }
            )
        out.extend(self._auth_events(first=first))
        for s in new_listeners:
            event = {
                "type": "listen",
                "proto": s.proto,
                "addr": decode_addr(s.local),
                "port": s.lport,
                "uid": s.uid,
            }
            event.update(_owner_fields(owners.get(s.inode)))
            if first:
                event["initial"] = True
            out.append(event)
        for s in gone:
            out.append({"type": "unlisten", "proto": s.proto, "addr": decode_addr(s.local), "port": s.lport})
        out.extend(_connect_events(new_out, owners))
        return out

    def close(self) -> None:
        for tail in self._tails:
            tail.close()

    def _auth_events(self, *, first: bool) -> list[dict[str, Any]]:
        count = 0
        sources: dict[str, int] = {}
        for tail in self._tails:
            for line in tail.read_lines(from_end=first):
                if not AUTH_FAILURE.search(line):
                    continue
                count += 1
                source = _source(line)
                if source:
                    sources[source] = sources.get(source, 0) + 1
        if not count:
            return []
        top = dict(sorted(sources.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SOURCES])
        return [{"type": "auth_fail", "count": count, "sources": top}]


def _listen_key(s: Sock) -> tuple[str, bytes, int]:
    return (s.proto, s.local, s.lport)


def _is_listener(s: Sock) -> bool:
    if s.proto == "tcp":
        return s.state == LISTEN
    return s.lport != 0 and s.rport == 0 and is_zero(s.remote)


def _is_outbound(s: Sock, tcp_listen_ports: set[int]) -> bool:
    if s.proto == "tcp":
        return s.state in (ESTABLISHED, SYN_SENT) and s.lport not in tcp_listen_ports
    return s.rport != 0


def _owner_fields(owner: Owner | None) -> dict[str, Any]:
    if owner is None:
        return {"pid": None, "comm": None, "exe": None}
    return {"pid": owner[0], "comm": owner[1] or None, "exe": owner[2] or None}


def _connect_events(new_out: list[Sock], owners: dict[int, Owner]) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, bytes, int, int | None], dict[str, Any]] = {}
    for s in new_out:
        owner = owners.get(s.inode)
        key = (s.proto, s.remote, s.rport, owner[0] if owner else None)
        event = grouped.get(key)
        if event is None:
            event = {
                "type": "connect",
                "proto": s.proto,
                "dst": decode_addr(s.remote),
                "dport": s.rport,
                "uid": s.uid,
            }
            event.update(_owner_fields(owner))
            event["count"] = 0
            grouped[key] = event
        event["count"] += 1
    return list(grouped.values())


def _source(line: bytes) -> str | None:
    m = SOURCE.search(line)
    if not m:
        return None
    try:
        return str(ipaddress.ip_address(m.group(1).decode("ascii").rstrip(".:")))
    except ValueError:
        return None


class LogTail:
    """Follows one log file like `tail -F`: from its end at start, then every complete new line; a rotated
    file (new inode at the path) is finished, then the new one is read from its start; a truncated one
    (copytruncate) is read again from its start. Reads at most MAX_READ bytes per call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._partial = b""

    def read_lines(self, *, from_end: bool = False) -> list[bytes]:
        """Complete lines appended since the previous call. `from_end`: a file opened now is skipped to its
        end (the agent's start); otherwise a file that appears is read from its start."""
        data = b""
        if self._f is None:
            self._open(from_end=from_end)
        if self._f is not None:
            data = self._read()
            if len(data) < MAX_READ and self._rotated():
                self.close()
                self._open(from_end=False)
                if self._f is not None:
                    data += self._read()
        if not data:
            return []
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()[-MAX_PARTIAL:]
        return lines

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._partial = b""

    def _open(self, *, from_end: bool) -> None:
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open across calls, closed in close()
        except OSError:
            return
        if from_end:
            self._f.seek(0, os.SEEK_END)

    def _read(self) -> bytes:
        assert self._f is not None  # noqa: S101 - callers check
        try:
            if os.fstat(self._f.fileno()).st_size < self._f.tell():
                self._f.seek(0)  # truncated in place
                self._partial = b""
            return self._f.read(MAX_READ)
        except OSError:
            return b""

    def _rotated(self) -> bool:
        assert self._f is not None  # noqa: S101 - callers check
        try:
            return os.stat(self.path).st_ino != os.fstat(self._f.fileno()).st_ino
        except OSError:
            return True  # gone: close it, pick up a new one when it appears
