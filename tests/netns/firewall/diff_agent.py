"""A long-lived probe agent for the differential test: one per lab namespace (each VM, the host, the outside).

Run as a script (standard library only) inside a namespace::

    python diff_agent.py IFACE TCP_PORTS UDP_PORTS [dhcp-server]

It answers "OK" on every TCP connection to TCP_PORTS and every UDP datagram to UDP_PORTS (comma-separated);
with ``dhcp-server`` it also answers a DHCPDISCOVER that names its address as the server (option 54) with an
offer of the requested address (option 50), sent from its address and port 67 to that address and port 68,
as a DHCP server on a VM does (on a packet socket: the lab's VMs have no server of their own). It prints
``ready``, then reads one JSON command a line on stdin and writes one JSON answer a line on stdout, so
that a probe costs a pipe round trip instead of a process start:

* ``{"op": "flush"}``: forget every neighbour (ARP) entry of the namespace (``ip neigh flush all``), so that
  the next probe starts cold and has to resolve its peer's MAC through the firewall.
* ``{"op": "tcp", "dst": A, "port": P, "timeout": T}``: connect and read the server's "OK".
* ``{"op": "udp", "dst": A, "port": P, "timeout": T, "sport": S|null}``: a datagram on a connected socket
  (so that an ICMP error comes back as an errno) and the server's "OK"; `sport` binds the source port
  (from 68, a DHCP client's, the datagram is a DHCPREQUEST naming IFACE's MAC, as a lease renewal is).
* ``{"op": "ping", "dst": A, "timeout": T}``: one ICMP echo request on a raw socket; its echo reply, or an
  ICMP error quoting it.
* ``{"op": "arp", "dst": A, "timeout": T}``: one ARP request (broadcast, from IFACE's own MAC and address)
  on a packet socket; a reply from `dst` to us.
* ``{"op": "dhcp", "server": A, "timeout": T}``: a DHCPDISCOVER from 0.0.0.0 to 255.255.255.255 (as a DHCP
  client without a lease sends it), asking server A for IFACE's own address; a DHCPOFFER from A with its
  transaction id.

Every probe answers ``{"result": R, "ms": M}`` where R is one word:

* ``ok``: the exchange completed (for TCP the connection opened *and* the server's data arrived);
* ``refused`` (ECONNREFUSED: a TCP reset, or ICMP port unreachable for UDP), ``unreach`` (EHOSTUNREACH or
  ENETUNREACH: an ICMP host/admin-prohibited error, for TCP and UDP), ``eperm`` (the host's own output
  path dropped the packet, as a reject in the host's `output` hook does), ``icmp:TYPE/CODE`` (an ICMP error
  quoting our echo request): an answer that is not the exchange, i.e. a rejection;
* ``timeout``: nothing came back within T seconds (a silent drop);
* ``nodata``: a TCP connection opened but the server's data never came; ``err:...``: anything else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
SIOCGIFADDR = 0x8915
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
DHCP_COOKIE = b"\x63\x82\x53\x63"


def _iface_ipv4(iface: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", iface.encode()[:15])
        return fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]


def _iface_mac(iface: str) -> bytes:
    with open(f"/sys/class/net/{iface}/address", encoding="ascii") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _errno_word(e: OSError) -> str:
    if e.errno == errno.ECONNREFUSED:
        return "refused"
    if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreach"
    if e.errno == errno.EPERM:
        return "eperm"
    return f"err:{errno.errorcode.get(e.errno or 0, e.errno)}"


# ------------------------------------------------------------------------------------------------ servers


def _tcp_server(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s


def _udp_server(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", port))
    return s


def _serve_tcp(s: socket.socket) -> None:
    while True:
        c, _ = s.accept()
        with contextlib.suppress(OSError):
            c.sendall(b"OK\n")
        c.close()


def _serve_udp(s: socket.socket) -> None:
    """Answer from the address the datagram was sent to: the host has two (gateway and uplink), and a
    client's connected socket takes replies only from the address it sent to."""
    while True:
        _, ancillary, _, addr = s.recvmsg(2048, socket.CMSG_SPACE(12))
        pktinfo = [d for level, kind, d in ancillary if (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO)]
        # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: reply from `addr`, any interface
        reply = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, pktinfo[0][8:12], b"\0" * 4))]
        with contextlib.suppress(OSError):
            s.sendmsg([b"OK"], reply if pktinfo else [], 0, addr)


# ------------------------------------------------------------------------------------------------- probes


def probe_tcp(dst: str, port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    with socket.socket() as s:
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return _errno_word(e)
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            return "ok" if s.recv(16).startswith(b"OK") else "nodata"
        except TimeoutError:
            return "nodata"
        except OSError as e:
            return "nodata:" + _errno_word(e)


def probe_udp(iface: str, dst: str, port: int, timeout: float, sport: int | None) -> str:
    # From a DHCP client's port the datagram is what a client renewing its lease sends: a DHCPREQUEST naming
    # IFACE's own MAC as chaddr (the guard drops a DHCP request that names any other: the chaddr guard).
    payload = _bootp(1, random.randrange(1, 0xFFFFFFFF), b"\0" * 4, _iface_mac(iface), bytes([53, 1, 3]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if sport is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            s.send(payload if sport == 68 else b"hi")
            return "ok" if s.recv(16).startswith(b"OK") else "nodata"
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return _errno_word(e)


def probe_ping(dst: str, timeout: float) -> str:
    ident, seq = random.randrange(1, 0xFFFF), 1
    payload = b"hfdiff" + os.urandom(10)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        try:
            s.sendto(packet, (dst, 0))
        except OSError as e:
            return _errno_word(e)
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, addr = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, code = data[ihl], data[ihl + 1]
            if typ == 0 and addr[0] == dst and data[ihl + 4 : ihl + 8] == struct.pack("!HH", ident, seq):
                return "ok"
            if typ in (3, 4, 5, 11, 12) and len(data) >= ihl + 8 + 28:
                inner = data[ihl + 8 :]
                iihl = (inner[0] & 0x0F) * 4
                if inner[9] == 1 and inner[iihl + 4 : iihl + 8] == struct.pack("!HH", ident, seq):
                    return f"icmp:{typ}/{code}"
    return "timeout"


def probe_arp(iface: str, dst: str, timeout: float) -> str:
    mac, own = _iface_mac(iface), _iface_ipv4(iface)
    target = socket.inet_aton(dst)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, mac, own, b"\0" * 6, target)
    frame = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((iface, ETH_P_ARP))
        s.send(frame)
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, addr = s.recvfrom(2048)
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 42:
                continue
            op, spa, tpa = struct.unpack("!H", data[20:22])[0], data[28:32], data[38:42]
            if op == 2 and spa == target and tpa == own:
                return "ok"
    return "timeout"


def _udp_frame(
    macs: tuple[bytes, bytes], addrs: tuple[bytes, bytes], ports: tuple[int, int], data: bytes
) -> bytes:
    """An Ethernet frame with an IPv4 UDP datagram: (source, destination) MACs, addresses and ports."""
    udp = struct.pack("!HHHH", *ports, 8 + len(data), 0) + data
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, *addrs)
    ip_header = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
    return macs[1] + macs[0] + struct.pack("!H", ETH_P_IP) + ip_header + udp


def _bootp(op: int, xid: int, yiaddr: bytes, mac: bytes, options: bytes) -> bytes:
    head = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        1,
        6,
        0,
        xid,
        0,
        0,
        b"\0" * 4,
        yiaddr,
        b"\0" * 4,
        b"\0" * 4,
        mac,
        b"",
        b"",
    )
    return head + DHCP_COOKIE + options + b"\xff"


def _dhcp_options(msg: bytes) -> dict[int, bytes]:
    """The options of a BOOTP message (after the 236-byte header and the magic cookie)."""
    out: dict[int, bytes] = {}
    i = 240
    while i < len(msg) and msg[i] != 255:
        if msg[i] == 0:
            i += 1
            continue
        if i + 1 >= len(msg):
            break
        code, size = msg[i], msg[i + 1]
        out[code] = msg[i + 2 : i + 2 + size]
        i += 2 + size
    return out


def serve_dhcp(iface: str) -> None:
    """Offer the requested address to every DHCPDISCOVER that names this namespace's address as its server."""
    mac, own = _iface_mac(iface), _iface_ipv4(iface)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as s:
        s.bind((iface, ETH_P_IP))
        while True:
            data, addr = s.recvfrom(4096)
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 14 + 20 + 8 + 240:
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17 or struct.unpack("!H", ip[ihl + 2 : ihl + 4])[0] != 67:
                continue
            msg = ip[ihl + 8 :]
            if msg[0] != 1 or msg[236:240] != DHCP_COOKIE:
                continue
            options = _dhcp_options(msg)
            if options.get(53) != b"\x01" or options.get(54) != own or len(options.get(50, b"")) != 4:
                continue
            xid, chaddr, wanted = struct.unpack("!I", msg[4:8])[0], msg[28:34], options[50]
            offer = _bootp(2, xid, wanted, chaddr, bytes([53, 1, 2, 54, 4]) + own)
            with contextlib.suppress(OSError):
                s.send(_udp_frame((mac, chaddr), (own, wanted), (67, 68), offer))


def probe_dhcp(iface: str, server: str, timeout: float) -> str:
    mac, own, server_ip = _iface_mac(iface), _iface_ipv4(iface), socket.inet_aton(server)
    xid = random.randrange(1, 0xFFFFFFFF)
    # DISCOVER, the address it had (50) and the server it asks (54): the lab's VM servers answer only that
    options = bytes([53, 1, 1, 50, 4]) + own + bytes([54, 4]) + server_ip
    discover = _bootp(1, xid, b"\0" * 4, mac, options)
    frame = _udp_frame((mac, b"\xff" * 6), (b"\0" * 4, b"\xff" * 4), (68, 67), discover)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as s:
        s.bind((iface, ETH_P_IP))
        s.send(frame)
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([s], [], [], left)[0]:
                break
            data, addr = s.recvfrom(4096)
            if addr[2] == socket.PACKET_OUTGOING or len(data) < 14 + 20 + 8 + 8:
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17 or struct.unpack("!H", ip[ihl + 2 : ihl + 4])[0] != 68:
                continue
            msg = ip[ihl + 8 :]
            if (
                ip[12:16] == server_ip
                and len(msg) >= 8
                and msg[0] == 2
                and struct.unpack("!I", msg[4:8])[0] == xid
            ):
                return "ok"
    return "timeout"


def handle(iface: str, cmd: dict[str, object]) -> dict[str, object]:
    op = cmd["op"]
    t0 = time.monotonic()
    timeout = float(cmd.get("timeout", 0.5))  # type: ignore[arg-type]
    dst = str(cmd.get("dst", ""))
    if op == "flush":
        done = subprocess.run(["ip", "neigh", "flush", "all"], capture_output=True, check=False)
        result = "ok" if done.returncode == 0 else "err:" + done.stderr.decode(errors="replace")
    elif op == "tcp":
        result = probe_tcp(dst, int(cmd["port"]), timeout)  # type: ignore[call-overload]
    elif op == "udp":
        sport = cmd.get("sport")
        result = probe_udp(iface, dst, int(cmd["port"]), timeout, None if sport is None else int(sport))  # type: ignore[call-overload]
    elif op == "ping":
        result = probe_ping(dst, timeout)
    elif op == "arp":
        result = probe_arp(iface, dst, timeout)
    elif op == "dhcp":
        result = probe_dhcp(iface, dst, timeout)
    else:
        result = f"err:unknown op {op!r}"
    return {"result": result, "ms": round(1000 * (time.monotonic() - t0), 1)}


def main(argv: list[str]) -> int:
    iface, tcp, udp = argv[0], argv[1], argv[2]
    if argv[3:] == ["dhcp-server"]:
        threading.Thread(target=serve_dhcp, args=(iface,), daemon=True).start()
    # Bound before "ready": a probe to a port that is not listening yet would be refused.
    for s in [_tcp_server(int(p)) for p in tcp.split(",") if p]:
        threading.Thread(target=_serve_tcp, args=(s,), daemon=True).start()
    for s in [_udp_server(int(p)) for p in udp.split(",") if p]:
        threading.Thread(target=_serve_udp, args=(s,), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            answer = handle(iface, cmd)
        except Exception as e:  # reported to the test, which fails with it
            answer = {"result": f"err:{e.__class__.__name__}:{e}", "ms": 0}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
