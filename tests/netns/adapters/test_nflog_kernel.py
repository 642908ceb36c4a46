"""NflogReader against the real kernel: a bridge in a "host" namespace, two "VM" namespaces, real packets.

Every namespace is created here with a unique `hf-t<hex>-*` name and deleted in the fixture's `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from hyperfence.adapters.nflog import NflogPacket, NflogReader
from hyperfence.errors import BugError, InvalidInputError, KernelError, NotFoundError
from hyperfence.system.netns import NetnsThread

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("nft") and shutil.which("ip")),
        reason="needs root, nft and ip",
    ),
]

GROUP = 5
DENIED_PORT = 9999
ALLOWED_PORT = 9998
TCP_PORT = 7777
VM1_IP, VM2_IP = "10.79.0.11", "10.79.0.12"

HOST_RULESET = f"""
table bridge hf_test {{
  chain c_forward {{
    type filter hook forward priority 0; policy accept;
    arp operation request log prefix "hf:test:arp" group {GROUP}
    tcp dport {TCP_PORT} log prefix "hf:test:tcp" group {GROUP}
    udp dport {DENIED_PORT} log prefix "hf:test:deny:r1" group {GROUP} drop
  }}
}}
"""

# In a second namespace: log UDP sent to its own loopback, on the same group number.
OTHER_RULESET = f"""
table inet hf_test {{
  chain c_output {{
    type filter hook output priority 0; policy accept;
    udp dport {DENIED_PORT} log prefix "hf:test:other" group {GROUP}
  }}
}}
"""


def run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Link:
    ifindex: int
    mac: str


def link(netns: str, name: str) -> Link:
    (info,) = json.loads(run("ip", "-n", netns, "-j", "link", "show", "dev", name))
    return Link(ifindex=int(info["ifindex"]), mac=str(info["address"]))


@dataclass(frozen=True)
class Lab:
    host: str
    vm1: str
    vm2: str
    other: str
    br0: Link
    port1: Link  # vm1's bridge port, in the host namespace
    port2: Link
    vm1_eth0: Link
    vm2_eth0: Link


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = f"hf-t{secrets.token_hex(4)}"
    host, vm1, vm2, other = (f"{tag}-{role}" for role in ("host", "vm1", "vm2", "other"))
    created: list[str] = []
    try:
        for ns in (host, vm1, vm2, other):
            run("ip", "netns", "add", ns)
            created.append(ns)
        run("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", host, "link", "set", "br0", "up")
        for ns, port, ip in ((vm1, "p-vm1", VM1_IP), (vm2, "p-vm2", VM2_IP)):
            run("ip", "-n", host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "-n", host, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", other, "link", "set", "lo", "up")
        run("ip", "netns", "exec", host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        run("ip", "netns", "exec", host, "nft", "-f", "-", stdin=HOST_RULESET)
        run("ip", "netns", "exec", other, "nft", "-f", "-", stdin=OTHER_RULESET)
        yield Lab(
            host=host,
            vm1=vm1,
            vm2=vm2,
            other=other,
            br0=link(host, "br0"),
            port1=link(host, "p-vm1"),
            port2=link(host, "p-vm2"),
            vm1_eth0=link(vm1, "eth0"),
            vm2_eth0=link(vm2, "eth0"),
        )
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


def in_netns(netns: str, fn: Callable[[], object]) -> object:
    worker = NetnsThread(netns, name="hf-test")
    try:
        return worker.call(fn)
    finally:
        worker.close()


def send_udp(netns: str, dst: str, dport: int, *, sport: int = 0, count: int = 1) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("", sport))
            for i in range(count):
                sock.sendto(b"hf-%d" % i, (dst, dport))

    in_netns(netns, send)


def try_tcp(netns: str, dst: str, dport: int) -> None:
    def connect() -> None:
        with socket.socket() as sock:
            sock.settimeout(2)
            with contextlib.suppress(OSError):  # refused (nobody listens): we only need the SYN
                sock.connect((dst, dport))

    in_netns(netns, connect)


def udp_listener(netns: str, port: int) -> socket.socket:
    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", port))
        return sock

    sock = in_netns(netns, listen)
    assert isinstance(sock, socket.socket)
    return sock


def read_until(
    reader: NflogReader, done: Callable[[list[NflogPacket]], bool], timeout: float = 5.0
) -> list[NflogPacket]:
    got: list[NflogPacket] = []
    deadline = time.monotonic() + timeout
    while not done(got) and (left := deadline - time.monotonic()) > 0:
        got.extend(reader.read(left))
    return got


def with_prefix(packets: list[NflogPacket], prefix: str) -> list[NflogPacket]:
    return [p for p in packets if p.prefix == prefix]


def test_reader_decodes_denied_udp_arp_and_tcp_from_a_bridge(lab: Lab) -> None:
    allowed = udp_listener(lab.vm2, ALLOWED_PORT)
    denied = udp_listener(lab.vm2, DENIED_PORT)
    try:
        with NflogReader(GROUP, netns=lab.host) as reader:
            send_udp(lab.vm1, VM2_IP, DENIED_PORT, sport=40001, count=3)
            send_udp(lab.vm1, VM2_IP, ALLOWED_PORT, sport=40001)
            try_tcp(lab.vm1, VM2_IP, TCP_PORT)
            got = read_until(
                reader,
                lambda ps: (
                    len(with_prefix(ps, "hf:test:deny:r1")) >= 3
                    and bool(with_prefix(ps, "hf:test:arp"))
                    and bool(with_prefix(ps, "hf:test:tcp"))
                ),
            )
            assert reader.malformed == 0
            assert reader.dropped_overruns == 0

        # What the packets did: the allowed datagram arrived, the denied ones did not.
        allowed.settimeout(2)
        assert allowed.recv(64) == b"hf-0"
        denied.settimeout(0.2)
        with pytest.raises(TimeoutError):
            denied.recv(64)
    finally:
        allowed.close()
        denied.close()

    udp = with_prefix(got, "hf:test:deny:r1")
    assert len(udp) == 3
    for p in udp:
        assert (p.family, p.group, p.hook, p.hw_protocol) == (7, GROUP, 2, 0x0800)  # bridge, forward, IPv4
        assert (p.ip_version, p.src, p.dst, p.protocol) == (4, VM1_IP, VM2_IP, 17)
        assert (p.sport, p.dport) == (40001, DENIED_PORT)
        assert p.physindev == lab.port1.ifindex
        assert p.physoutdev == lab.port2.ifindex
        assert p.indev == p.outdev == lab.br0.ifindex
        assert (p.mac_src, p.mac_dst) == (lab.vm1_eth0.mac, lab.vm2_eth0.mac)
        assert p.timestamp is not None
        assert p.timestamp > 1_600_000_000
        assert p.payload_len == p.ip_len == 20 + 8 + 4
    assert not [p for p in got if p.dport == ALLOWED_PORT]

    arp = with_prefix(got, "hf:test:arp")[0]
    assert (arp.hw_protocol, arp.arp_op, arp.physindev) == (0x0806, 1, lab.port1.ifindex)
    assert (arp.arp_sender_ip, arp.arp_sender_mac, arp.arp_target_ip) == (VM1_IP, lab.vm1_eth0.mac, VM2_IP)
    assert (arp.mac_src, arp.mac_dst) == (lab.vm1_eth0.mac, "ff:ff:ff:ff:ff:ff")

    syn = with_prefix(got, "hf:test:tcp")[0]
    assert (syn.protocol, syn.dport, syn.tcp_flags) == (6, TCP_PORT, 0x02)


def test_a_group_has_one_reader_per_namespace(lab: Lab) -> None:
    first = NflogReader(GROUP, netns=lab.host)
    try:
        with pytest.raises(KernelError, match="already bound"):
            NflogReader(GROUP, netns=lab.host)
    finally:
        first.close()
    # Closing the owner releases the group at once.
    with NflogReader(GROUP, netns=lab.host) as again:
        send_udp(lab.vm1, VM2_IP, DENIED_PORT)
        assert with_prefix(read_until(again, bool), "hf:test:deny:r1")


def test_readers_in_two_namespaces_see_only_their_own_logs(lab: Lab) -> None:
    with (
        NflogReader(GROUP, netns=lab.host) as host_reader,
        NflogReader(GROUP, netns=lab.other) as other_reader,  # same group number, another namespace
    ):
        send_udp(lab.other, "127.0.0.1", DENIED_PORT, count=2)
        theirs = read_until(other_reader, lambda ps: len(ps) >= 2)
        assert [p.prefix for p in theirs] == ["hf:test:other"] * 2
        assert (theirs[0].family, theirs[0].src, theirs[0].dst) == (2, "127.0.0.1", "127.0.0.1")

        assert host_reader.read(0.5) == []
        send_udp(lab.vm1, VM2_IP, DENIED_PORT)
        ours = read_until(host_reader, lambda ps: bool(with_prefix(ps, "hf:test:deny:r1")))
        assert {p.prefix for p in ours} <= {"hf:test:deny:r1", "hf:test:arp"}
        assert len(with_prefix(ours, "hf:test:deny:r1")) == 1
        assert other_reader.read(0.3) == []


def test_overrun_is_counted_and_reading_continues(lab: Lab) -> None:
    # A tiny receive buffer and one kernel message per packet: most of a burst cannot be queued.
    with NflogReader(GROUP, netns=lab.host, rcvbuf=4096, max_batch=1, max_delay=0) as reader:
        send_udp(lab.vm1, VM2_IP, DENIED_PORT, sport=40002, count=400)
        time.sleep(0.2)  # let the kernel flush everything it will into the (full) socket
        burst = read_until(reader, lambda _ps: False, timeout=0.5)
        assert reader.dropped_overruns >= 1
        assert 0 < len(burst) < 400

        send_udp(lab.vm1, VM2_IP, DENIED_PORT, sport=40003)
        after = read_until(reader, lambda ps: any(p.sport == 40003 for p in ps))
        assert any(p.sport == 40003 for p in after)
        assert reader.malformed == 0


def test_closed_reader_and_bad_arguments(lab: Lab) -> None:
    reader = NflogReader(GROUP, netns=lab.host)
    assert reader.fileno() >= 0
    reader.close()
    reader.close()
    assert reader.closed
    with pytest.raises(BugError):
        reader.read(0)
    with pytest.raises(InvalidInputError) as err:
        NflogReader(70000, copy_range=0, max_batch=0, netns=lab.host)
    assert {p.path for p in err.value.problems} == {"group", "copy_range", "max_batch"}
    with pytest.raises(NotFoundError):
        NflogReader(GROUP, netns=f"{lab.host}-missing")
