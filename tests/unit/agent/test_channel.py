"""The channel: real unix-socket and TLS receivers that go away and come back, a virtio-serial port faked by
a FIFO, the bounded backlog and the backoff."""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence import wire
from hyperfence.agent.channel import Backoff, Channel, TlsTransport, Transport, UnixTransport, VirtioTransport
from tests.unit.agent.receiver import KEY, VM, Receiver, make_certs, server_context


class Mono:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def frame(seq: int, size: int = 0) -> bytes:
    return wire.encode(KEY, wire.message(VM, seq, "beat", {"res": {}, "events": [], "pad": "x" * size}, 0.0))


def seqs(receiver: Receiver) -> list[int]:
    return [m["seq"] for m in receiver.messages]


@pytest.fixture
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def unix_receiver(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(unix_path=tmp_path / "vm.sock").start()
    yield receiver
    receiver.stop()


def outage_and_return(receiver: Receiver, transport: Transport) -> None:
    """Frames 1-3 delivered; the host goes away; 4-11 produced (backlog 5: 4-6 dropped); it comes back:
    7-11 delivered in order, after the retry delay and not before."""
    mono = Mono()
    channel = Channel(transport, backlog=5, monotonic=mono, backoff=Backoff(rand=random.Random(1)))
    try:
        for seq in (1, 2, 3):
            channel.push(frame(seq))
            channel.flush()
        receiver.wait_for(lambda m: len(m) == 3)
        receiver.stop()
        for seq in range(4, 12):
            channel.push(frame(seq))
            assert channel.flush() == 0
            mono.t += 1.0
        assert not channel.connected
        assert (len(channel.queue), channel.take_dropped(), channel.take_dropped()) == (5, 3, 0)
        receiver.start()
        channel.retry_at = mono.t + 5
        assert channel.flush() == 0  # still backing off
        mono.t += 5
        assert channel.flush() == 5
        receiver.wait_for(lambda m: len(m) == 8)
        assert seqs(receiver) == [1, 2, 3, 7, 8, 9, 10, 11]
        assert receiver.errors == [] and channel.dropped_total == 3
    finally:
        channel.close()


def test_unix_channel_survives_the_host_going_away(unix_receiver: Receiver) -> None:
    assert unix_receiver.unix_path is not None
    outage_and_return(unix_receiver, UnixTransport(str(unix_receiver.unix_path)))


def test_tls_channel_survives_the_host_going_away(certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    receiver = Receiver(tls=server_context(cert, key)).start()
    try:
        transport = TlsTransport(host="127.0.0.1", port=receiver.port, ca=str(ca), server_name="hf-test")
        outage_and_return(receiver, transport)
    finally:
        receiver.stop()


def test_tls_refuses_a_server_with_another_name(certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    receiver = Receiver(tls=server_context(cert, key)).start()
    transport = TlsTransport(host="127.0.0.1", port=receiver.port, ca=str(ca), server_name="someone-else")
    channel = Channel(transport, backlog=5, monotonic=Mono())
    try:
        channel.push(frame(1))
        assert channel.flush() == 0 and not channel.connected
        with pytest.raises(ssl.SSLCertVerificationError):
            transport.connect(2.0)
        assert receiver.messages == []
    finally:
        channel.close()
        receiver.stop()


def test_a_missing_socket_is_a_retry_not_a_crash(tmp_path: Path) -> None:
    mono = Mono()
    channel = Channel(UnixTransport(str(tmp_path / "absent.sock")), backlog=2, monotonic=mono)
    for seq in (1, 2, 3):
        channel.push(frame(seq))
        channel.flush()
    assert [wire.verify(KEY, f[4:], VM)["seq"] for f in channel.queue] == [2, 3]
    assert channel.retry_at > mono.t


def fake_virtio(root: Path, name: str = "org.hyperfence.agent.0") -> Path:
    for port, port_name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", name)):
        (root / "sys/class/virtio-ports" / port).mkdir(parents=True)
        (root / "sys/class/virtio-ports" / port / "name").write_text(port_name + "\n", encoding="ascii")
    (root / "dev").mkdir()
    fifo = root / "dev/vport1p1"
    os.mkfifo(fifo)
    return fifo


def test_virtio_port_found_by_name_never_blocks_and_keeps_whole_frames(tmp_path: Path) -> None:
    """A FIFO stands in for the port: the agent holds it open read-write and non-blocking; when nobody reads
    (the host is not there) writes stall and the channel goes down after its send timeout instead of hanging;
    when the reader drains, everything arrives as whole, verifiable frames in order."""
    fifo = fake_virtio(tmp_path)
    transport = VirtioTransport("org.hyperfence.agent.0", root=str(tmp_path))
    assert transport.find_device() == str(fifo)
    mono = Mono()
    channel = Channel(transport, backlog=100, monotonic=mono, send_timeout=0.05)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        seq = 0
        while channel.connected or seq == 0:  # fill the pipe (64 KiB) with 5 KB frames until a write stalls
            seq += 1
            channel.push(frame(seq, size=5000))
            channel.flush()
        assert seq > 5 and not channel.connected and channel.queue
        received = wire.FrameReader()
        got = []
        while True:
            try:
                data = os.read(reader, 1 << 20)
            except BlockingIOError:
                data = b""
            got += [wire.verify(KEY, f, VM)["seq"] for f in received.feed(data)]
            mono.t += 20
            if not channel.queue and not data:
                break
            channel.flush()
        assert got == list(range(1, seq + 1))
        assert received.pending == 0
    finally:
        channel.close()
        os.close(reader)


def test_virtio_without_the_port_says_what_to_check(tmp_path: Path) -> None:
    fake_virtio(tmp_path, name="something.else")
    with pytest.raises(
        FileNotFoundError, match=r"no virtio-serial port named 'org.hyperfence.agent.0'.*domain XML"
    ):
        VirtioTransport("org.hyperfence.agent.0", root=str(tmp_path)).connect(0.1)


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(first=0.5, cap=10.0, rand=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 8, 10, 10, 10], strict=True):
        assert nominal / 2 <= delay <= nominal
    backoff.reset()
    assert backoff.next_delay() <= 0.5
