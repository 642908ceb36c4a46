"""The host ends of the agent channels against strangers, over real sockets (unix, and TLS on 127.0.0.x):
a connection is a VM's only after a frame verified with that VM's key; a stranger never touches the VM's
counts or its live connection, is counted, and cannot hold the waiting slots of other sources. Driven round
by round from the test's thread with a fake clock (no threads, no kernel)."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence import wire
from hyperfence.adapters import agent_channels as ch
from hyperfence.adapters.tls import ensure_certificates, server_context
from hyperfence.health.tracker import AgentRecord, Tracker

KEYS = {"a": b"A" * 32, "b": b"B" * 32, "t": b"T" * 32}


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    """A Hub wired to a Tracker like the daemon's monitor: claims verified with the tracker's keys."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = Clock()
        self.specs: dict[str, dict[str, Any]] = {
            "a": {"type": "unix", "path": str(tmp / "a.sock")},
            "b": {"type": "unix", "path": str(tmp / "b.sock")},
            "t": {"type": "tls"},
        }
        self.tracker = Tracker(
            {
                vm: AgentRecord(vm, key, spec)
                for (vm, key), spec in zip(KEYS.items(), self.specs.values(), strict=False)
            },
            started=self.clock.t,
            startup_grace=0,
        )
        self.frames: list[tuple[str, bytes]] = []
        self.hub = ch.Hub(self.on_frame, self.on_refused, self.claim, now=self.clock)
        self.hub.sync(self.specs)
        self.seqs: dict[str, int] = {}
        self.port = 0
        self.clients: list[socket.socket] = []

    def on_frame(self, vm: str, frame: bytes) -> None:
        self.frames.append((vm, frame))
        self.tracker.ingest(vm, frame, self.clock.t)

    def on_refused(self, vm: str, reason: str, detail: str) -> None:
        self.tracker.refuse(vm, reason, detail)

    def claim(self, vm: str | None, frame: bytes) -> str | None:
        if vm is not None:
            return vm if self.tracker.verify_claim(vm, frame) else None
        for named in wire.named_vms(frame):
            if self.specs.get(named, {}).get("type") == "tls" and self.tracker.verify_claim(named, frame):
                return named
        return None

    def frame(self, vm: str, key: bytes | None = None) -> bytes:
        self.seqs[vm] = self.seqs.get(vm, 0) + 1
        body = wire.message(vm, self.seqs[vm], "beat", {"res": {"cpu": 1}}, 0.0)
        return wire.encode(key or KEYS[vm], body)

    def unix(self, vm: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.clients.append(s)
        s.connect(self.specs[vm]["path"])
        return s

    def listen_tls(self) -> None:
        ensure_certificates(str(self.tmp), __import__("ipaddress").IPv4Address("127.0.0.1"))
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.hub.listen_tls(sock, server_context(str(self.tmp)))

    def tls(self, source: str = "127.0.0.1") -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(self.tmp / "tls" / "ca.pem"))
        raw = socket.create_connection(("127.0.0.1", self.port), source_address=(source, 0))
        raw.setblocking(False)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)
        self.clients.append(s)
        for _ in range(200):  # the handshake, interleaved with the hub's rounds
            try:
                s.do_handshake()
                break
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                self.hub.poll(0.01)
        s.setblocking(True)
        return s

    def rounds(self, n: int = 20) -> None:
        for _ in range(n):
            self.hub.poll(0.005)

    def accepted(self, vm: str) -> int:
        return self.tracker.live[vm].counts.get("accepted", 0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.hub.close()
    for s in r.clients:
        s.close()


def test_a_stranger_on_a_vms_unix_channel_cannot_take_it_over(rig: Rig) -> None:
    agent = rig.unix("a")
    agent.sendall(rig.frame("a"))
    rig.rounds()
    assert rig.accepted("a") == 1 and "a" in rig.hub.conns
    live = rig.hub.conns["a"]
    counts = dict(rig.tracker.live["a"].counts)
    stranger = rig.unix("a")
    stranger.sendall(rig.frame("a", key=b"X" * 32) * 3)
    rig.rounds()
    assert rig.hub.refused["unverified"] == 1
    assert rig.hub.conns["a"] is live  # the agent's connection stays
    assert dict(rig.tracker.live["a"].counts) == counts  # and its counts are untouched
    assert stranger.recv(1) == b""  # the stranger was closed
    agent.sendall(rig.frame("a"))
    rig.rounds()
    assert rig.accepted("a") == 2


def test_a_reconnecting_agent_replaces_its_old_connection(rig: Rig) -> None:
    old = rig.unix("a")
    old.sendall(rig.frame("a"))
    rig.rounds()
    new = rig.unix("a")
    new.sendall(rig.frame("a") + rig.frame("a"))
    rig.rounds()
    assert rig.accepted("a") == 3 and rig.hub.claimed == 2
    assert old.recv(1) == b""
    old.close()


def test_a_replayed_first_frame_cannot_claim(rig: Rig) -> None:
    first = rig.frame("a")
    rig.unix("a").sendall(first)
    rig.rounds()
    replayer = rig.unix("a")
    replayer.sendall(first)
    rig.rounds()
    assert rig.hub.refused["unverified"] == 1 and rig.accepted("a") == 1


def test_a_stranger_naming_a_tls_vm_is_refused_and_counted_apart(rig: Rig) -> None:
    rig.listen_tls()
    stranger = rig.tls()
    stranger.sendall(rig.frame("t", key=b"X" * 32))
    rig.rounds()
    assert rig.hub.refused["unverified"] == 1
    assert sum(rig.tracker.live["t"].counts.values()) == 0 and "t" not in rig.hub.conns
    # a unix VM cannot be claimed over TLS, even with its own key
    wrong_channel = rig.tls()
    wrong_channel.sendall(rig.frame("a"))
    rig.rounds()
    assert rig.hub.refused["unverified"] == 2 and rig.accepted("a") == 0
    agent = rig.tls()
    agent.sendall(rig.frame("t") + rig.frame("t"))
    rig.rounds()
    assert rig.accepted("t") == 2 and "t" in rig.hub.conns


def test_one_source_cannot_hold_the_waiting_slots_of_others(rig: Rig) -> None:
    rig.listen_tls()
    idle = [rig.tls("127.0.0.2") for _ in range(ch.MAX_PENDING_PER_SOURCE)]
    more = socket.create_connection(("127.0.0.1", rig.port), source_address=("127.0.0.2", 0))
    rig.clients.append(more)  # one too many from that source: closed at once
    rig.rounds()
    assert rig.hub.refused["busy"] == 1
    assert more.recv(1) == b""
    agent = rig.tls("127.0.0.3")  # another source still gets in
    agent.sendall(rig.frame("t"))
    rig.rounds()
    assert rig.accepted("t") == 1
    rig.clock.t += ch.CLAIM_TIMEOUT + 0.1  # the idle ones time out
    rig.rounds(2)
    assert rig.hub.refused["timeout"] == ch.MAX_PENDING_PER_SOURCE
    assert all(s.recv(1) == b"" for s in idle)


def test_new_connections_are_rate_limited_per_source(rig: Rig) -> None:
    for _ in range(int(ch.ACCEPT_BURST) + 3):
        s = rig.unix("b")
        rig.rounds(2)
        s.close()
        rig.rounds(2)
    assert rig.hub.refused["rate"] >= 3
    rig.clock.t += 5  # the bucket refills
    agent = rig.unix("b")
    agent.sendall(rig.frame("b"))
    rig.rounds()
    assert rig.accepted("b") == 1


def test_a_first_frame_too_big_for_a_claim_is_refused_before_it_is_buffered(rig: Rig) -> None:
    s = rig.unix("a")
    s.sendall(struct.pack(">I", ch.MAX_CLAIM_FRAME + 1) + b"x" * 100)
    rig.rounds()
    assert rig.hub.refused["oversized"] == 1 and sum(rig.tracker.live["a"].counts.values()) == 0


def test_an_error_while_handling_one_channel_closes_only_that_one(rig: Rig) -> None:
    a, b = rig.unix("a"), rig.unix("b")
    a.sendall(rig.frame("a"))
    b.sendall(rig.frame("b"))
    rig.rounds()

    def explode(vm: str, frame: bytes) -> None:
        if vm == "a":
            raise RuntimeError("a bug")
        rig.frames.append((vm, frame))

    rig.hub.on_frame = explode
    a.sendall(rig.frame("a"))
    rig.rounds()
    assert "a" not in rig.hub.conns and rig.hub.refused["error"] == 0  # a VM's channel, not a stranger
    b.sendall(rig.frame("b"))
    rig.rounds()
    assert rig.frames[-1][0] == "b"
