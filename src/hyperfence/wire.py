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
import math
import re
import struct
from collections.abc import Iterator
from typing import Any

VERSION = 1
MAC_LEN = 32
HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024  # a beat is ~2-10 KB; anything near this bound is an attack or a bug
MAX_DEPTH = 16  # nesting of arrays/objects in a body; a beat needs 5
MAX_SEQ = 2**63 - 1  # what the host's store holds (SQLite INTEGER)
MAX_VM_ID = 128
KINDS = ("hello", "beat", "bye")

# A JSON string, possibly unterminated (the optional closing quote keeps every match linear in its length,
# so no input can make the scan quadratic), and everything that is not a bracket.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")  # one pass removes exactly the innermost containers
# How a body names its VM (the agent writes compact JSON): used only to pick the key a claim is checked with.
_VM_FIELD = re.compile(rb'"vm":"([^"\\]{1,%d})"' % MAX_VM_ID)


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


def too_deep(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit` (or has unbalanced brackets), found without
    parsing it: strings are cut out, then the innermost bracket pairs are removed, one level per pass,
    `limit` times. Linear in the payload and C-speed (the json module would recurse, and raise RecursionError, on a deep enough body)."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", payload))
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub(b"", brackets)
    return bool(brackets)


def named_vms(frame: bytes, most: int = 4) -> list[str]:
    """The VM ids an (unverified) frame's body names, at most `most`: which keys a receiver may try on a
    connection that is not any VM's channel yet. Nothing here is trusted; the MAC decides."""
    out: list[str] = []
    for m in _VM_FIELD.finditer(frame, 1 + MAC_LEN):
        try:
            vm = m.group(1).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if vm not in out:
            out.append(vm)
        if len(out) >= most:
            break
    return out


def verify(key: bytes, frame: bytes, vm: str) -> dict[str, Any]:
    """The body of one frame (without its length prefix), checked. Raises WireError, and nothing else, for
    any input: the body is parsed only after its MAC verified, and only when its nesting is bounded."""
    if len(frame) <= 1 + MAC_LEN:
        raise WireError("malformed", f"frame of {len(frame)} bytes is shorter than its header")
    if frame[0] != VERSION:
        raise WireError("version", f"format version {frame[0]} (expected {VERSION})")
    mac, payload = frame[1 : 1 + MAC_LEN], frame[1 + MAC_LEN :]
    want = hmac.new(key, frame[:1] + payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise WireError("forged", "the MAC does not verify with this VM's key")
    if too_deep(payload):
        raise WireError("malformed", f"body nests deeper than {MAX_DEPTH} levels (or is unbalanced)")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError("malformed", f"body is not UTF-8 JSON ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise WireError("malformed", f"body is a JSON {type(body).__name__} (expected an object)")
    if body.get("vm") != vm:
        raise WireError("forged", f"signed for VM {str(body.get('vm'))[:80]!r} on the channel of {vm!r}")
    seq, kind, data = body.get("seq"), body.get("kind"), body.get("data")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise WireError("malformed", f"seq {str(seq)[:40]!r} (expected an integer from 0 to 2**63-1)")
    if kind not in KINDS:
        raise WireError("malformed", f"kind {str(kind)[:40]!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(data, dict):
        raise WireError("malformed", "data is not an object")
    t = body.get("t")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise WireError("malformed", f"t {str(t)[:40]!r} (expected a finite number)")
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
