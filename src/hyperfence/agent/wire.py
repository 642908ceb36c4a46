"""The agent's wire format, shared by the agent (in the guest) and the daemon's receiver (on the host).

Standard library only, Python >= 3.9 (this module ships inside the agent's zipapp).

A stream of frames, each:

    4 bytes   length L of the rest, unsigned big endian, 33 < L <= MAX_FRAME
    1 byte    format version (VERSION)
    32 bytes  HMAC-SHA256(key, version byte + body)
    L-33      body: one JSON object, UTF-8

Body fields (every message):

    vm     str    the VM id the agent was enrolled for
    seq    int    strictly increasing for this VM, across agent restarts (see `next_seq`)
    t      float  the guest's clock, seconds since the epoch (informational: never trusted)
    kind   str    "hello" (agent start), "beat" (every interval), "bye" (agent stop)
    data   obj    per kind: hello {agent, python, interval, boot, pid}; beat {res: {...}, events: [...],
                  dropped, dropped_total}; bye {reason} (schemas: main.py, collect.py, watch.py, docs/agent.md)

The key is per VM, issued at enrolment (`hyperfence vm enroll`). The receiver drops and counts a frame that is
too long (`oversized`), not parseable (`malformed`), of another version (`version`), whose MAC does not verify
with the channel's VM key (`forged`), that names another VM (`forged`), or whose seq is not above the last
accepted one (`replayed`). Identity comes from the channel first (one channel per VM); the MAC proves the
sender holds that VM's key; the seq stops replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterator
from typing import Any

VERSION = 1
MAC_LEN = 32
HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024  # a beat is ~2-10 KB; anything near this bound is an attack or a bug
KINDS = ("hello", "beat", "bye")


class WireError(Exception):
    """A frame that must be dropped. `reason` is one of: oversized, malformed, version, forged, replayed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(key: bytes, body: dict[str, Any]) -> bytes:
    """One frame carrying `body`, signed with `key`."""
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
    version = bytes([VERSION])
    mac = hmac.new(key, version + payload, hashlib.sha256).digest()
    length = 1 + MAC_LEN + len(payload)
    if length > MAX_FRAME:
        raise WireError("oversized", f"frame of {length} bytes (at most {MAX_FRAME})")
    return HEADER.pack(length) + version + mac + payload


def message(vm: str, seq: int, kind: str, data: dict[str, Any], now: float) -> dict[str, Any]:
    return {"vm": vm, "seq": seq, "t": now, "kind": kind, "data": data}


def next_seq(last: int, now: float) -> int:
    """A sequence number above `last` and above every number an earlier run of the agent can have used, as
    long as the guest clock (`now`, seconds since the epoch) does not go back: milliseconds, or last + 1."""
    return max(last + 1, int(now * 1000))


def verify(key: bytes, frame: bytes, vm: str) -> dict[str, Any]:
    """The body of one frame (without its length prefix), checked. Raises WireError."""
    if len(frame) <= 1 + MAC_LEN:
        raise WireError("malformed", f"frame of {len(frame)} bytes is shorter than its header")
    if frame[0] != VERSION:
        raise WireError("version", f"format version {frame[0]} (expected {VERSION})")
    mac, payload = frame[1 : 1 + MAC_LEN], frame[1 + MAC_LEN :]
    want = hmac.new(key, frame[:1] + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise WireError("forged", "the MAC does not verify with this VM's key")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError("malformed", f"body is not UTF-8 JSON ({e})") from None
    if not isinstance(body, dict):
        raise WireError("malformed", f"body is a JSON {type(body).__name__} (expected an object)")
    if body.get("vm") != vm:
        raise WireError("forged", f"signed for VM {str(body.get('vm'))[:80]!r} on the channel of {vm!r}")
    seq, kind, data = body.get("seq"), body.get("kind"), body.get("data")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WireError("malformed", f"seq {str(seq)[:40]!r} (expected a non-negative integer)")
    if kind not in KINDS:
        raise WireError("malformed", f"kind {str(kind)[:40]!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(data, dict):
        raise WireError("malformed", "data is not an object")
    t = body.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise WireError("malformed", f"t {str(t)[:40]!r} (expected a number)")
    return body


class FrameReader:
    """Splits a byte stream into frames. A length above MAX_FRAME cannot be resynchronised (the stream has no
    markers), so it raises WireError("oversized") and the caller must close the channel."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                self._buf.clear()
                raise WireError("oversized", f"frame length {length} (at most {self.max_frame})")
            if len(self._buf) < HEADER.size + length:
                return
            frame = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            yield frame

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a truncated frame stays here until the channel closes)."""
        return len(self._buf)


def split_frames(data: bytes) -> list[bytes]:
    """All complete frames in `data` (tests and tools)."""
    return list(FrameReader().feed(data))
