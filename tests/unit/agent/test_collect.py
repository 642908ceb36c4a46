"""Resource sampling from fake /proc trees (exact figures) and from the real /proc (sane figures)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from hyperfence.agent.collect import Collector, read_cpu_times, read_disks
from hyperfence.agent.sockets import SocketTable, decode_addr, read_sockets
from tests.unit.agent.fake_proc import TCP_HEADER, FakeProc, sock_line


def test_a_sample_reports_deltas_since_the_previous_one(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.process(1, "init")
    fake.process(42, "sshd")
    collector = Collector(str(tmp_path))
    collector.prime(now=10.0)
    fake.stat(user=130, system=60, idle=850, iowait=60)  # +40 busy, +60 idle (iowait counts as idle)
    fake.disks(vda=(12, 108, 9, 48))
    fake.net(eth0=(1500, 15, 1, 2, 2100, 21, 0, 3), eth1=(7, 1, 0, 0, 0, 0, 0, 0))
    fake.sockets(
        tcp=[
            sock_line("0.0.0.0", 22, "0.0.0.0", 0, state=0x0A, inode=100),
            sock_line("10.0.0.2", 22, "10.0.0.9", 5555, state=0x01, inode=101),
            sock_line("10.0.0.2", 40000, "10.0.0.5", 443, state=0x06, inode=0),
        ],
        udp=[sock_line("0.0.0.0", 68, "0.0.0.0", 0, state=0x07, inode=200)],
    )
    res, errors = collector.sample(now=11.5, sockets=read_sockets(str(tmp_path)))
    assert errors == []
    assert res["dt"] == 1.5
    assert (res["cpu"], res["cpus"]) == (40.0, 2)
    assert res["mem"] == {
        "total": 2048 * 1024,
        "free": 512 * 1024,
        "available": 1024 * 1024,
        "cached": 256 * 1024,
        "swap_total": 0,
        "swap_free": 0,
    }
    assert res["load"] == [0.5, 0.25, 0.1]
    assert res["disk"] == {"vda": {"reads": 2, "read_bytes": 8 * 512, "writes": 4, "write_bytes": 8 * 512}}
    assert res["net"]["eth0"] == {
        "rx_bytes": 500, "rx_packets": 5, "rx_errors": 1, "rx_drops": 2,
        "tx_bytes": 100, "tx_packets": 1, "tx_errors": 0, "tx_drops": 3,
    }  # fmt: skip
    assert res["net"]["eth1"]["rx_bytes"] == 7  # a new interface: its counters are the delta
    assert res["tcp"] == {"LISTEN": 1, "ESTABLISHED": 1, "TIME_WAIT": 1}
    assert (res["udp"], res["procs"], res["uptime"]) == (1, 2, 1234.56)


def test_a_counter_that_went_backwards_reports_its_new_value(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    collector = Collector(str(tmp_path))
    collector.prime(now=0.0)
    fake.net(eth0=(300, 3, 0, 0, 0, 0, 0, 0))  # re-created interface: 1000 -> 300
    res, _ = collector.sample(now=1.0, sockets=None)
    assert res["net"]["eth0"]["rx_bytes"] == 300
    assert "tcp" not in res


def test_only_whole_disks_are_reported(tmp_path: Path) -> None:
    FakeProc(tmp_path)
    assert set(read_disks(str(tmp_path))) == {"vda"}  # not the partition vda1, not loop0


def test_a_part_that_cannot_be_read_is_left_out_and_reported(tmp_path: Path) -> None:
    FakeProc(tmp_path)
    (tmp_path / "proc/meminfo").unlink()
    (tmp_path / "proc/loadavg").write_text("garbage\n", encoding="ascii")
    res, errors = Collector(str(tmp_path)).sample(now=0.0, sockets=None)
    assert {what for what, _ in errors} == {"mem", "load"}
    assert "FileNotFoundError" in dict(errors)["mem"]
    assert "mem" not in res and "load" not in res
    assert res["uptime"] == 1234.56


def test_addresses_decode_like_the_kernel_prints_them(tmp_path: Path) -> None:
    def words(raw: bytes) -> str:  # /proc/net/* prints each 32-bit word in host byte order
        return "".join("%08X" % struct.unpack("=I", raw[i : i + 4])[0] for i in range(0, len(raw), 4))

    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3")
    FakeProc(tmp_path).write(
        "proc/net/tcp6",
        TCP_HEADER
        + f"   0: {words(v6)}:0016 {words(bytes(16))}:0000 0A 00000000:00000000 00:00000000 00000000 0 0 77 1\n"
        + f"   1: {words(mapped)}:9C40 {words(v6)}:01BB 01 00000000:00000000 00:00000000 00000000 0 0 78 1\n",
    )
    listener, conn = read_sockets(str(tmp_path))
    assert (decode_addr(listener.local), listener.lport, listener.inode) == ("2001:db8::1", 22, 77)
    assert (decode_addr(conn.local), decode_addr(conn.remote), conn.rport) == ("10.1.2.3", "2001:db8::1", 443)
    assert decode_addr(bytes([127, 0, 0, 1])) == "127.0.0.1"


def test_netlink_and_proc_see_the_same_sockets() -> None:
    """sock_diag (the default) and /proc/net agree on sockets this test opens, field for field."""
    table = SocketTable()
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        server.bind(("::1", 0))
        server.listen(1)
        udp.connect(("127.0.0.1", 9))
        with socket.create_connection(("::1", server.getsockname()[1])) as client:
            ports = {server.getsockname()[1], client.getsockname()[1], udp.getsockname()[1]}
            mine = lambda socks: sorted(s for s in socks if s.lport in ports)  # noqa: E731
            via_netlink, via_proc = mine(table.read()), mine(read_sockets())
    assert table.source == "netlink"
    assert len(via_netlink) == 4  # listener, client, the server end (still in the accept queue), udp
    assert via_netlink == via_proc


def test_the_real_proc() -> None:
    collector = Collector()
    collector.prime(now=0.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        sockets = read_sockets()
        res, errors = collector.sample(now=0.1, sockets=sockets)
        port = s.getsockname()[1]
    assert errors == []
    assert 0.0 <= res["cpu"] <= 100.0
    assert res["cpus"] == os.cpu_count()
    assert 0 < res["mem"]["available"] <= res["mem"]["total"]
    assert res["procs"] >= 1 and res["uptime"] > 0
    assert res["tcp"]["LISTEN"] >= 1
    assert any(x.lport == port and x.state == 0x0A and decode_addr(x.local) == "127.0.0.1" for x in sockets)
    assert "lo" in res["net"]
    total, idle, cpus = read_cpu_times()
    assert total > idle > 0 and cpus == os.cpu_count()
