"""A fake /proc + /sys tree for the agent's readers (they all take a `root`)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)
NET_DEV_HEADER = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
)


def hex4(addr: str) -> str:
    """An IPv4 address as /proc/net/tcp prints it (host byte order)."""
    packed = bytes(int(p) for p in addr.split("."))
    return "%08X" % struct.unpack("=I", packed)[0]


def sock_line(
    local: str, lport: int, remote: str, rport: int, *, state: int, inode: int, uid: int = 0
) -> str:
    return (
        f"   0: {hex4(local)}:{lport:04X} {hex4(remote)}:{rport:04X} {state:02X} 00000000:00000000 "
        f"00:00000000 00000000 {uid:5} 0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("proc/net", "sys/block", "proc/sys/kernel/random"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.write("proc/sys/kernel/random/boot_id", "0f0e0d0c-0000-4000-8000-000000000001\n")
        self.stat(user=100, system=50, idle=800, iowait=50)
        self.write(
            "proc/meminfo",
            "MemTotal:  2048 kB\nMemFree:  512 kB\nMemAvailable:  1024 kB\nCached:  256 kB\nSwapTotal:  0 kB\nSwapFree:  0 kB\n",
        )
        self.write("proc/loadavg", "0.50 0.25 0.10 2/123 4567\n")
        self.write("proc/uptime", "1234.56 2000.00\n")
        (root / "sys/block/vda").mkdir(exist_ok=True)
        (root / "sys/block/loop0").mkdir(exist_ok=True)
        self.disks(vda=(10, 100, 5, 40))
        self.net(eth0=(1000, 10, 0, 0, 2000, 20, 0, 0))
        self.sockets(tcp=[], udp=[])

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="ascii")

    def stat(self, *, user: int, system: int, idle: int, iowait: int, cpus: int = 2) -> None:
        line = f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 0 0\n"
        per = "".join(f"cpu{i} 0 0 0 0 0 0 0 0 0 0\n" for i in range(cpus))
        self.write("proc/stat", line + per + "intr 1 2 3\nctxt 99\n")

    def disks(self, **disks: tuple[int, int, int, int]) -> None:
        """name=(reads, sectors read, writes, sectors written); a partition vda1 and loop0 are always there."""
        lines = []
        for name, (r, rs, w, ws) in disks.items():
            lines.append(f" 254 0 {name} {r} 0 {rs} 0 {w} 0 {ws} 0 0 0 0 0 0 0 0 0 0\n")
        lines.append(" 254 1 vda1 7 0 7 0 7 0 7 0 0 0 0 0 0 0 0 0 0\n")
        lines.append(" 7 0 loop0 9 0 9 0 9 0 9 0 0 0 0 0 0 0 0 0 0\n")
        self.write("proc/diskstats", "".join(lines))

    def net(self, **ifaces: tuple[int, int, int, int, int, int, int, int]) -> None:
        """name=(rx bytes, packets, errs, drop, tx bytes, packets, errs, drop)."""
        lines = [NET_DEV_HEADER]
        for name, v in ifaces.items():
            lines.append(
                f"{name:>6}: {v[0]} {v[1]} {v[2]} {v[3]} 0 0 0 0 {v[4]} {v[5]} {v[6]} {v[7]} 0 0 0 0\n"
            )
        self.write("proc/net/dev", "".join(lines))

    def sockets(self, *, tcp: list[str], udp: list[str]) -> None:
        self.write("proc/net/tcp", TCP_HEADER + "".join(tcp))
        self.write("proc/net/udp", TCP_HEADER + "".join(udp))

    def process(self, pid: int, comm: str, *, inodes: tuple[int, ...] = (), exe: str = "/usr/bin/x") -> None:
        base = self.root / "proc" / str(pid)
        (base / "fd").mkdir(parents=True, exist_ok=True)
        (base / "comm").write_text(comm + "\n", encoding="ascii")
        if not (base / "exe").is_symlink():
            os.symlink(exe, base / "exe")
        if not (base / "fd" / "0").is_symlink():
            os.symlink("/dev/null", base / "fd" / "0")
        for i, inode in enumerate(inodes, start=3):
            link = base / "fd" / str(i)
            if not link.is_symlink():
                os.symlink(f"socket:[{inode}]", link)
