"""Shared helpers of the benchmarks: the lab, nft in the lab's host namespace, traffic tools, statistics.

Everything runs inside the lab's own namespaces (``hf-<lab>-*``); nothing touches the machine's own
network namespace. Only tables this code or hyperfence created are ever deleted.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyperfence.lab import topology
from hyperfence.lab.plan import LabPlan

IPERF_PORT = 5201
FLOOD_PORT = 5301
SENDER_CPU = "0"
RECEIVER_CPU = "1"

# A 64-byte-payload UDP generator and sink. iperf3's server reads one datagram per syscall and, here, can only
# receive ~90 kpps of 64-byte datagrams (it loses ~28 % of what the sender manages at the socket), so it
# measures iperf3's receiver, not the bridge. This pair uses sendmmsg/recvmmsg: the sink keeps up with the
# sender, and the sender's core (which also runs the whole bridge + firewall path in softirq, as veth
# delivers on the sending CPU) is the bottleneck, so the rate reflects the per-packet cost of the switch.
# `est` mode first exchanges one datagram each way (like iperf3's UDP "connect"), so conntrack sees the flow
# as established; `new` mode never gets a reply, so conntrack classifies every packet as NEW and the whole
# policy is evaluated for every packet (the worst case for any stateful firewall).
UDPFLOOD_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "sink")) {          /* sink PORT MAXSECONDS */
        int port = atoi(argv[2]); double maxs = atof(argv[3]);
        int s = socket(AF_INET, SOCK_DGRAM, 0); int one = 1, rcv = 8 << 20;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        if (bind(s, (void *)&a, sizeof a)) { perror("bind"); return 1; }
        struct timeval tv = {0, 200000}; setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        printf("ready\n"); fflush(stdout);
        static char buf[BATCH][2048]; struct mmsghdr m[BATCH]; struct iovec io[BATCH]; struct sockaddr_in from[BATCH];
        long count = 0; double first = 0, last = 0, start = now();
        for (;;) {
            for (int i = 0; i < BATCH; i++) { io[i].iov_base = buf[i]; io[i].iov_len = sizeof buf[i];
                memset(&m[i].msg_hdr, 0, sizeof m[i].msg_hdr); m[i].msg_hdr.msg_iov = &io[i]; m[i].msg_hdr.msg_iovlen = 1;
                m[i].msg_hdr.msg_name = &from[i]; m[i].msg_hdr.msg_namelen = sizeof from[i]; }
            int n = recvmmsg(s, m, BATCH, MSG_WAITFORONE, NULL);
            double t = now();
            if (n > 0) {
                for (int i = 0; i < n; i++) {
                    if (m[i].msg_len == 5 && !memcmp(buf[i], "HELLO", 5)) {
                        sendto(s, "OLLEH", 5, 0, (void *)&from[i], m[i].msg_hdr.msg_namelen);
                        continue;
                    }
                    if (m[i].msg_len == 3 && !memcmp(buf[i], "END", 3)) goto done;
                    if (!count) first = t;
                    count++; last = t;
                }
            } else if (count && t - last > 1.0) break;
            if (t - start > maxs) break;
        }
    done:
        printf("%ld %.6f\n", count, last - first); return 0;
    }
    if (argc >= 7 && !strcmp(argv[1], "send")) {          /* send IP PORT SECONDS LEN est|new */
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        if (connect(s, (void *)&a, sizeof a)) { perror("connect"); return 1; }
        double secs = atof(argv[4]); int len = atoi(argv[5]);
        if (!strcmp(argv[6], "est")) {
            struct timeval tv = {0, 300000}; setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            char r[16]; int ok = 0;
            for (int i = 0; i < 10 && !ok; i++) { send(s, "HELLO", 5, 0); ok = recv(s, r, sizeof r, 0) == 5; }
            if (!ok) { fprintf(stderr, "no handshake reply\n"); return 2; }
        }
        static char pay[BATCH][2048]; struct mmsghdr m[BATCH]; struct iovec io[BATCH];
        memset(pay, 'x', sizeof pay);
        for (int i = 0; i < BATCH; i++) { io[i].iov_base = pay[i]; io[i].iov_len = len;
            memset(&m[i].msg_hdr, 0, sizeof m[i].msg_hdr); m[i].msg_hdr.msg_iov = &io[i]; m[i].msg_hdr.msg_iovlen = 1; }
        long sent = 0; double t0 = now(), t;
        while ((t = now()) - t0 < secs) {
            int n = sendmmsg(s, m, BATCH, 0);
            if (n > 0) sent += n;
            else if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED) { perror("sendmmsg"); return 1; }
        }
        usleep(200000);
        for (int i = 0; i < 3; i++) { send(s, "END", 3, 0); usleep(10000); }
        printf("%ld %.6f\n", sent, t - t0); return 0;
    }
    fprintf(stderr, "usage: udpflood sink PORT MAXSECONDS | send IP PORT SECONDS LEN est|new\n"); return 64;
}
"""


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    """Progress goes to stderr, results to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (apt-get install -y iperf3 nftables gcc ...)")


def build_udpflood(workdir: Path) -> str:
    src = workdir / "udpflood.c"
    exe = workdir / "udpflood"
    src.write_text(UDPFLOOD_C, encoding="utf-8")
    done = subprocess.run(
        ["gcc", "-O2", "-o", str(exe), str(src)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"building udpflood failed: {done.stderr}")
    return str(exe)


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ------------------------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): a value that was really observed."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


# ------------------------------------------------------------------------------------------ lab and nft


def fresh_lab(plan: LabPlan, only: int) -> None:
    """Create the lab from scratch (a lab of the same name left by a crashed run is destroyed first)."""
    topology.destroy_lab(plan.name)
    topology.create_lab(plan, only=only)


def host(plan: LabPlan, argv: Sequence[str], *, input: bytes | None = None, check: bool = True) -> str:
    done = topology.run_in_host(plan, argv, input=input, timeout=120)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} failed: {done.stderr.decode(errors='replace')[:800]}")
    return done.stdout.decode(errors="replace")


def nft_load(plan: LabPlan, text: str) -> float:
    """`nft -f -` in the lab's host namespace; returns the wall time in seconds (incl. nft's start-up)."""
    t0 = time.perf_counter()
    host(plan, ["nft", "-f", "-"], input=text.encode())
    return time.perf_counter() - t0


def nft_tables(plan: LabPlan) -> list[tuple[str, str]]:
    data = json.loads(host(plan, ["nft", "-j", "list", "tables"]))
    return [(o["table"]["family"], o["table"]["name"]) for o in data["nftables"] if "table" in o]


def nft_delete_tables(plan: LabPlan, tables: Sequence[tuple[str, str]]) -> None:
    """Delete exactly these tables (those that exist) in one transaction."""
    present = set(nft_tables(plan))
    cmds = "".join(f"delete table {f} {n}\n" for f, n in tables if (f, n) in present)
    if cmds:
        host(plan, ["nft", "-f", "-"], input=cmds.encode())


def conntrack_flush(plan: LabPlan) -> None:
    host(plan, ["conntrack", "-F"], check=False)


# ---------------------------------------------------------------------------------------------- traffic


def start_iperf_server(plan: LabPlan, vm: str) -> subprocess.Popen[bytes]:
    proc = topology.popen_in_vm(
        plan,
        vm,
        ["taskset", "-c", RECEIVER_CPU, "iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc


def tcp_gbps(plan: LabPlan, src: str, dst: str, seconds: float) -> float:
    ip = str(plan.vm(dst).ip)
    argv = ["taskset", "-c", SENDER_CPU, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "2000"]
    done = topology.run_in_vm(plan, src, argv, timeout=seconds + 20)
    try:
        data = json.loads(done.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError) as e:
        raise BenchError(
            f"iperf3 tcp {src}->{dst} failed: {done.stdout[-400:]!r} {done.stderr[-400:]!r}"
        ) from e


def iperf_udp_kpps(plan: LabPlan, src: str, dst: str, seconds: float) -> float:
    """iperf3 -u -l 64 -b 0: datagrams the server received per second (sent minus lost), in kpps."""
    ip = str(plan.vm(dst).ip)
    argv = ["taskset", "-c", SENDER_CPU, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-u", "-l", "64"]
    argv += ["-b", "0", "-t", str(seconds), "-J"]
    done = topology.run_in_vm(plan, src, argv, timeout=seconds + 20)
    try:
        s = json.loads(done.stdout)["end"]["sum"]
        return (int(s["packets"]) - int(s["lost_packets"])) / float(s["seconds"]) / 1e3
    except (ValueError, KeyError) as e:
        raise BenchError(f"iperf3 udp {src}->{dst} failed: {done.stdout[-400:]!r}") from e


def udp_kpps(plan: LabPlan, tool: str, src: str, dst: str, *, seconds: float, mode: str) -> float:
    """64-byte UDP datagrams per second RECEIVED by the sink in `dst` (kpps), sender flooding with sendmmsg."""
    sink = topology.popen_in_vm(
        plan,
        dst,
        ["taskset", "-c", RECEIVER_CPU, tool, "sink", str(FLOOD_PORT), str(seconds + 6)],
        stdout=subprocess.PIPE,
    )
    try:
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != b"ready":
            raise BenchError("udpflood sink did not start")
        ip = str(plan.vm(dst).ip)
        argv = ["taskset", "-c", SENDER_CPU, tool, "send", ip, str(FLOOD_PORT), str(seconds), "64", mode]
        sent = topology.run_in_vm(plan, src, argv, timeout=seconds + 20)
        if sent.returncode != 0:
            raise BenchError(f"udpflood send failed: {sent.stderr.decode(errors='replace')}")
        out = sink.stdout.read().decode()
        sink.wait(timeout=10)
    finally:
        topology.stop_process(sink)
    count, span = out.split()
    if int(count) < 1000 or float(span) <= 0:
        raise BenchError(f"udpflood {src}->{dst} ({mode}): the sink received only {count} datagrams")
    return int(count) / float(span) / 1e3


def ping_rtt_us(plan: LabPlan, src: str, dst: str, count: int, interval: float = 0.005) -> tuple[float, int]:
    """(median RTT in µs over the replies, replies lost): `count` pings, `interval` seconds apart.

    At 5 ms the CPUs go idle between pings, so this includes the wake-up latency of an idle (virtual) CPU."""
    ip = str(plan.vm(dst).ip)
    argv = ["taskset", "-c", SENDER_CPU, "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", ip]
    rtts = _ping(plan, src, argv, count * interval + 20)
    return median(rtts), count - len(rtts)


def ping_busy_rtt_us(plan: LabPlan, src: str, dst: str, count: int) -> float:
    """Mean RTT in µs of `count` back-to-back pings (`ping -A`: the next one leaves when the reply is in),
    slowest 1 % dropped. The CPU never idles, so this is the path's own latency; per-ping values have 1 µs
    resolution, the mean of 2,000 resolves well below that."""
    ip = str(plan.vm(dst).ip)
    argv = ["taskset", "-c", SENDER_CPU, "ping", "-n", "-A", "-c", str(count), "-W", "1", ip]
    rtts = sorted(_ping(plan, src, argv, 30))
    kept = rtts[: max(1, int(len(rtts) * 0.99))]
    return sum(kept) / len(kept)


def _ping(plan: LabPlan, src: str, argv: list[str], timeout: float) -> list[float]:
    done = topology.run_in_vm(plan, src, argv, timeout=timeout)
    text = done.stdout.decode(errors="replace")
    rtts = [float(m) * 1000 for m in re.findall(r"time=([\d.]+) ms", text)]
    if not rtts:
        raise BenchError(f"{' '.join(argv[3:])}: no reply\n{text[-300:]}")
    return rtts


def ping_ok(plan: LabPlan, src: str, dst: str) -> bool:
    ip = str(plan.vm(dst).ip)
    done = topology.run_in_vm(plan, src, ["ping", "-n", "-c", "1", "-W", "1", ip], timeout=10)
    return done.returncode == 0


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{nd}f}"


def env_summary() -> str:
    uname = os.uname()
    return f"kernel {uname.release}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}"


def as_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


def cpu_ticks(pid: int) -> int:
    """CPU time a process used, in clock ticks (os.sysconf("SC_CLK_TCK") a second)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def rss_mb(pid: int) -> float:
    """A process's resident memory now, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
