"""What a hostile guest runs against the host's agent endpoint (standard library only: it runs with the
guest's python3 inside a lab VM). It writes frames itself, as an attacker would, not with hyperfence's code.

    hostile.py ATTACK HOST PORT CA [ARGS...]

Prints one line of JSON with what it saw (e.g. whether the host closed the connection).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
import struct
import sys
import time


def frame(key: bytes, payload: bytes) -> bytes:
    mac = hmac.new(key, b"\x01" + payload, hashlib.sha256).digest()
    return struct.pack(">I", 33 + len(payload)) + b"\x01" + mac + payload


def body(vm: str, seq: int, kind: str = "beat", data: str = '{"res":{}}') -> bytes:
    return f'{{"data":{data},"kind":"{kind}","seq":{seq},"t":{time.time()},"vm":"{vm}"}}'.encode()


def connect(host: str, port: int, ca: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection((host, port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def send(s: socket.socket, data: bytes) -> bool:
    """False when the host closed the connection before it took all of `data`."""
    try:
        s.sendall(data)
    except OSError:
        return False
    return True


def closed_by_host(s: socket.socket, wait: float = 3.0) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except (TimeoutError, BlockingIOError, ssl.SSLError):
        return False
    except OSError:
        return True


def deep_unsigned(host: str, p: int, ca: str, vm: str) -> dict[str, object]:
    """No key: frames naming VM `vm`, their JSON nested 30,000 / 100,000 deep."""
    closed = []
    for depth in (30_000, 100_000):
        s = connect(host, p, ca)
        data = '{"x":' + "[" * depth + "]" * depth + "}"
        closed.append(not send(s, frame(b"x" * 32, body(vm, 10**15, data=data))) or closed_by_host(s))
        s.close()
    return {"closed": all(closed)}


def impersonate(host: str, p: int, ca: str, vm: str, n: str) -> dict[str, object]:
    """No key: N connections, each sending frames that name VM `vm`."""
    closed = 0
    for i in range(int(n)):
        try:
            s = connect(host, p, ca)
        except OSError:  # refused during the handshake (too many, too fast)
            closed += 1
            continue
        sent = send(s, b"".join(frame(b"x" * 32, body(vm, 10**15 + i * 10 + k)) for k in range(5)))
        closed += not sent or closed_by_host(s)
        s.close()
    return {"closed": closed}


def hold(host: str, p: int, ca: str, n: str, seconds: str) -> dict[str, object]:
    """Keep N TLS connections open, sending nothing, for T s: reopen any the host closes."""
    socks: list[socket.socket] = []
    opened = reopened = 0
    deadline = time.monotonic() + float(seconds)
    announced = False
    while time.monotonic() < deadline:
        for s in [s for s in socks if closed_by_host(s, 0.0)]:
            socks.remove(s)
            s.close()
            reopened += 1
        while len(socks) < int(n) and time.monotonic() < deadline:
            try:
                socks.append(connect(host, p, ca))
                opened += 1
            except OSError:
                break
        if not announced:
            print(json.dumps({"opened": opened}), flush=True)
            announced = True
        time.sleep(0.1)
    return {"opened": opened, "reopened": reopened, "open_at_end": len(socks)}


def own_key(host: str, p: int, ca: str, config_file: str) -> dict[str, object]:
    """With its own key: claim its channel with a good frame, then try to crash the receiver and the store."""
    with open(config_file) as f:
        config = json.load(f)
    key, vm = bytes.fromhex(config["key"]), config["vm"]
    seq = int(time.time() * 1000) + 50  # just above the real agent's (far above would lock it out)
    s = connect(host, p, ca)
    s.sendall(frame(key, body(vm, seq)))  # a good frame: the connection is now vm's channel
    s.sendall(frame(key, body(vm, seq + 1, data='{"x":' + "[" * 50_000 + "]" * 50_000 + "}")))
    s.sendall(frame(key, body(vm, 2**63)))  # more than the store holds
    s.sendall(frame(key, body(vm, 2**64 + 5)))
    s.sendall(frame(key, body(vm, seq + 2, data='{"x":' + "9" * 20_000 + "}")))  # a huge integer
    s.sendall(frame(key, body(vm, seq + 3, data='{"res":{"cpu":NaN}}')))
    infinite_t = b'{"data":{},"kind":"beat","seq":%d,"t":Infinity,"vm":"%s"}' % (seq + 4, vm.encode())
    s.sendall(frame(key, infinite_t))
    time.sleep(1.5)
    return {"closed": closed_by_host(s, 0.2)}


ATTACKS = {"deep-unsigned": deep_unsigned, "impersonate": impersonate, "hold": hold, "own-key": own_key}


def main() -> None:
    attack, host, port, ca, *args = sys.argv[1:]
    print(json.dumps(ATTACKS[attack](host, int(port), ca, *args)), flush=True)


if __name__ == "__main__":
    main()
