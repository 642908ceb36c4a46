"""Security events: listeners, connections and their owners, fan-out, auth failures; fake trees and the real
/proc with sockets this test opens."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hyperfence.agent.sockets import read_sockets
from hyperfence.agent.watch import LogTail, Watcher, cap_events
from tests.unit.agent.fake_proc import FakeProc, sock_line

SSH = sock_line("0.0.0.0", 22, "0.0.0.0", 0, state=0x0A, inode=100)
DNS = sock_line("127.0.0.53", 53, "0.0.0.0", 0, state=0x07, inode=300)


def events_of(watcher: Watcher, root: Path) -> list[dict[str, object]]:
    return watcher.events(read_sockets(str(root)))


def test_listeners_connections_and_their_owners(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.process(1, "init")
    fake.process(412, "sshd", inodes=(100,), exe="/usr/sbin/sshd")
    fake.sockets(tcp=[SSH], udp=[DNS])
    watcher = Watcher(root=str(tmp_path))

    first = events_of(watcher, tmp_path)
    assert first == [
        {
            "type": "listen",
            "proto": "tcp",
            "addr": "0.0.0.0",
            "port": 22,
            "uid": 0,
            "pid": 412,
            "comm": "sshd",
            "exe": "sshd",
            "initial": True,
        },
        {
            "type": "listen",
            "proto": "udp",
            "addr": "127.0.0.53",
            "port": 53,
            "uid": 0,
            "pid": None,
            "comm": None,
            "exe": None,
            "initial": True,
        },
    ]
    assert events_of(watcher, tmp_path) == []  # nothing changed: no events, and no /proc scan
    assert watcher.scans == 1

    fake.process(977, "curl", inodes=(501, 502, 503), exe="/usr/bin/curl")
    fake.process(978, "nc", inodes=(600,), exe="/usr/bin/nc.openbsd")
    fake.sockets(
        tcp=[
            SSH,
            sock_line(
                "10.0.0.2", 22, "10.0.0.9", 50000, state=0x01, inode=400
            ),  # inbound to sshd: not a connect
            sock_line("10.0.0.2", 40001, "10.0.0.5", 443, state=0x01, inode=501, uid=1000),
            sock_line("10.0.0.2", 40002, "10.0.0.5", 443, state=0x02, inode=502, uid=1000),
            sock_line("10.0.0.2", 40003, "10.0.0.6", 80, state=0x01, inode=503, uid=1000),
            sock_line("0.0.0.0", 8080, "0.0.0.0", 0, state=0x0A, inode=600),
        ],
        udp=[],
    )
    second = events_of(watcher, tmp_path)
    assert second == [
        {"type": "fanout", "peers": 2, "ports": 2, "conns": 3},
        {
            "type": "listen",
            "proto": "tcp",
            "addr": "0.0.0.0",
            "port": 8080,
            "uid": 0,
            "pid": 978,
            "comm": "nc",
            "exe": "nc.openbsd",
        },
        {"type": "unlisten", "proto": "udp", "addr": "127.0.0.53", "port": 53},
        {
            "type": "connect",
            "proto": "tcp",
            "dst": "10.0.0.5",
            "dport": 443,
            "uid": 1000,
            "pid": 977,
            "comm": "curl",
            "exe": "curl",
            "count": 2,
        },
        {
            "type": "connect",
            "proto": "tcp",
            "dst": "10.0.0.6",
            "dport": 80,
            "uid": 1000,
            "pid": 977,
            "comm": "curl",
            "exe": "curl",
            "count": 1,
        },
    ]
    assert watcher.scans == 2
    assert events_of(watcher, tmp_path) == []  # the same connections are not new any more
    assert watcher.scans == 2


def test_connected_udp_sockets_count_as_outbound(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    watcher = Watcher(root=str(tmp_path))
    events_of(watcher, tmp_path)
    fake.sockets(tcp=[], udp=[sock_line("10.0.0.2", 33333, "8.8.8.8", 53, state=0x01, inode=700)])
    got = events_of(watcher, tmp_path)
    assert got[0] == {"type": "fanout", "peers": 1, "ports": 1, "conns": 1}
    assert got[1]["type"] == "connect" and got[1]["proto"] == "udp" and got[1]["dst"] == "8.8.8.8"


def test_real_sockets_opened_by_this_test_are_found_with_their_process() -> None:
    watcher = Watcher()
    watcher.events(read_sockets())  # the baseline
    comm = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        got = watcher.events(read_sockets())
        (listen,) = [e for e in got if e["type"] == "listen" and e["port"] == port]
        assert listen == {
            "type": "listen",
            "proto": "tcp",
            "addr": "127.0.0.1",
            "port": port,
            "uid": os.getuid(),
            "pid": os.getpid(),
            "comm": comm,
            "exe": listen["exe"],
        }
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                got = watcher.events(read_sockets())
        (connect,) = [e for e in got if e["type"] == "connect" and e["dport"] == port]
        assert (connect["dst"], connect["pid"], connect["comm"]) == ("127.0.0.1", os.getpid(), comm)
    got = watcher.events(read_sockets())
    assert {"type": "unlisten", "proto": "tcp", "addr": "127.0.0.1", "port": port} in got


def test_failed_logins_are_counted_by_source_without_names_or_text(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text("sshd[1]: Failed password for root from 192.0.2.1 port 22 ssh2\n", encoding="ascii")
    watcher = Watcher(root=str(tmp_path), auth_logs=(str(log), str(tmp_path / "secure")))
    FakeProc(tmp_path)
    assert events_of(watcher, tmp_path) == []  # read from the end at start
    with log.open("a", encoding="ascii") as f:
        f.write("sshd[2]: Failed password for invalid user mallory from 192.0.2.7 port 4242 ssh2\n")
        f.write("sshd[2]: Invalid user mallory from 192.0.2.7 port 4242\n")
        f.write("sshd[3]: Accepted publickey for alice from 192.0.2.9 port 1 ssh2\n")
        f.write(
            "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=2001:db8::5\n"
        )
        f.write("login[9]: FAILED LOGIN (1) on '/dev/tty1' FOR 'bob', Authentication failure\n")
        f.write("sshd[4]: Failed password for root from 192.0.2.")  # not a complete line yet
    (event,) = events_of(watcher, tmp_path)
    assert event == {"type": "auth_fail", "count": 4, "sources": {"192.0.2.7": 2, "2001:db8::5": 1}}
    assert "mallory" not in repr(event) and "bob" not in repr(event)
    with log.open("a", encoding="ascii") as f:
        f.write("8 port 22 ssh2\n")
    assert events_of(watcher, tmp_path) == [{"type": "auth_fail", "count": 1, "sources": {"192.0.2.8": 1}}]
    # a log that appears after start is read from its beginning
    (tmp_path / "secure").write_text(
        "sshd[5]: Failed password for x from 198.51.100.1 port 1 ssh2\n", encoding="ascii"
    )
    assert events_of(watcher, tmp_path) == [{"type": "auth_fail", "count": 1, "sources": {"198.51.100.1": 1}}]
    watcher.close()


def test_a_rotated_log_is_finished_then_the_new_one_followed(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text("old\n", encoding="ascii")
    tail = LogTail(str(log))
    assert tail.read_lines(from_end=True) == []
    with log.open("a", encoding="ascii") as f:
        f.write("a\n")
    log.rename(tmp_path / "auth.log.1")
    with (tmp_path / "auth.log.1").open("a", encoding="ascii") as f:
        f.write("b\n")  # written by the logger before it reopened
    log.write_text("c: a longer line\n", encoding="ascii")
    assert tail.read_lines() == [b"a", b"b", b"c: a longer line"]
    log.write_text("d\n", encoding="ascii")  # truncated in place (copytruncate) and rewritten
    assert tail.read_lines() == [b"d"]
    log.unlink()
    assert tail.read_lines() == []
    log.write_text("e\n", encoding="ascii")
    assert tail.read_lines() == [b"e"]
    tail.close()


def test_events_are_capped_per_beat() -> None:
    many = [{"type": "connect", "n": i} for i in range(130)]
    capped = cap_events(many, 100)
    assert len(capped) == 101 and capped[-1] == {"type": "dropped", "count": 30}
    assert cap_events(many[:5], 100) == many[:5]
