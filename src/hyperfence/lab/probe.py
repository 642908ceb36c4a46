"""Tiny traffic tools run inside lab namespaces: `python -m hyperfence.lab.probe tcp 10.77.0.12 80`.

Prints one word (OK, REFUSED, TIMEOUT, ERR:...) and the elapsed milliseconds; exit 0 on OK. Real sockets,
real packets: this is what a program in a VM would see.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time


def probe(kind: str, host: str, port: int, timeout: float) -> str:
    """Connect (TCP) or send a datagram (UDP, on a connected socket, so that an ICMP error such as a reject
    comes back as ECONNREFUSED) and wait for the responder's "OK"."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        if kind == "udp":
            s.send(b"hi")
        return "OK" if s.recv(16).startswith(b"OK") else "NODATA"
    except TimeoutError:
        return "TIMEOUT"
    except OSError as e:
        return _os_error(e)
    finally:
        s.close()


def _os_error(e: OSError) -> str:
    """EHOSTUNREACH: ARP got no answer (the firewall blocked it), as ping's "Destination Host Unreachable";
    ECONNREFUSED: a TCP reset, or ICMP port unreachable for UDP."""
    if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "UNREACHABLE"
    if e.errno == errno.ECONNREFUSED:
        return "REFUSED"
    return f"ERR:{e.__class__.__name__}:{e.errno}"


def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    """Answer "OK" on every TCP connection and UDP datagram, until killed."""

    def tcp_loop(port: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))  # noqa: S104 - inside a lab namespace
        s.listen(128)
        while True:
            c, _ = s.accept()
            try:
                c.sendall(b"OK\n")
            except OSError:
                pass
            finally:
                c.close()

    def udp_loop(port: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))  # noqa: S104 - inside a lab namespace
        while True:
            _, addr = s.recvfrom(2048)
            s.sendto(b"OK", addr)

    for p in tcp_ports:
        threading.Thread(target=tcp_loop, args=(p,), daemon=True).start()
    for p in udp_ports:
        threading.Thread(target=udp_loop, args=(p,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] in ("tcp", "udp"):
        t0 = time.monotonic()
        timeout = float(argv[3]) if len(argv) > 3 else 1.5
        result = probe(argv[0], argv[1], int(argv[2]), timeout)
        print(f"{result} {1000 * (time.monotonic() - t0):.0f}ms", flush=True)
        return 0 if result == "OK" else 1
    if len(argv) == 3 and argv[0] == "serve":
        serve([int(p) for p in argv[1].split(",") if p], [int(p) for p in argv[2].split(",") if p])
        return 0
    print("usage: probe tcp|udp HOST PORT [TIMEOUT] | serve TCPPORTS UDPPORTS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
