"""The agent wire format: frames, MACs, and every way a frame is refused."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.agent import wire

KEY = b"k" * 32
VM = "vm-1"


def body(seq: int = 1, **extra: object) -> dict[str, object]:
    return {**wire.message(VM, seq, "beat", {"res": {"cpu": 1.5}, "events": []}, now=1000.0), **extra}


def test_a_frame_round_trips() -> None:
    frame = wire.encode(KEY, body())
    (inner,) = wire.split_frames(frame)
    assert wire.verify(KEY, inner, VM) == body()


def test_frames_split_at_any_byte_boundary() -> None:
    stream = b"".join(wire.encode(KEY, body(seq=i)) for i in range(1, 6))
    reader = wire.FrameReader()
    got = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert [wire.verify(KEY, f, VM)["seq"] for f in got] == [1, 2, 3, 4, 5]
    assert reader.pending == 0


def test_a_truncated_frame_stays_pending() -> None:
    frame = wire.encode(KEY, body())
    reader = wire.FrameReader()
    assert list(reader.feed(frame[:-3])) == []
    assert reader.pending == len(frame) - 3


def reason(frame: bytes, key: bytes = KEY, vm: str = VM) -> str:
    with pytest.raises(wire.WireError) as e:
        wire.verify(key, frame, vm)
    return e.value.reason


def inner(b: dict[str, object], key: bytes = KEY) -> bytes:
    return wire.encode(key, b)[4:]


def test_wrong_key_is_forged() -> None:
    assert reason(inner(body()), key=b"x" * 32) == "forged"


def test_another_vm_on_this_channel_is_forged() -> None:
    assert reason(inner(body()), vm="vm-2") == "forged"


def test_a_flipped_bit_is_forged() -> None:
    frame = bytearray(inner(body()))
    frame[-2] ^= 1
    assert reason(bytes(frame)) == "forged"


@pytest.mark.parametrize(
    "bad",
    [{"seq": -1}, {"seq": "1"}, {"seq": True}, {"kind": "shell"}, {"data": []}, {"t": "now"}],
)
def test_bad_fields_are_malformed(bad: dict[str, object]) -> None:
    assert reason(inner(body(**bad))) == "malformed"


def test_not_json_and_not_an_object_are_malformed() -> None:
    import hashlib
    import hmac

    for payload in (b"\xff\xfe", b"[1,2]", b"{"):
        mac = hmac.new(KEY, b"\x01" + payload, hashlib.sha256).digest()
        assert reason(b"\x01" + mac + payload) == "malformed"
    assert reason(b"\x01short") == "malformed"


def test_another_version_is_refused() -> None:
    assert reason(b"\x02" + inner(body())[1:]) == "version"


def test_an_oversized_length_is_refused_before_buffering() -> None:
    reader = wire.FrameReader()
    with pytest.raises(wire.WireError) as e:
        list(reader.feed(struct.pack(">I", 10 * 1024 * 1024) + b"x" * 100))
    assert e.value.reason == "oversized"
    assert reader.pending == 0


def test_encoding_refuses_what_the_receiver_would() -> None:
    with pytest.raises(wire.WireError):
        wire.encode(KEY, body(data={"blob": "x" * wire.MAX_FRAME}))


def test_next_seq_survives_restarts_and_fast_sends() -> None:
    a = wire.next_seq(0, now=1000.0)
    b = wire.next_seq(a, now=1000.0)  # same millisecond
    c = wire.next_seq(0, now=1000.5)  # a restart that forgot `b`, half a second later
    assert a < b < c


@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_anything_but_a_wire_error(data: bytes) -> None:
    reader = wire.FrameReader()
    try:
        for frame in reader.feed(data):
            wire.verify(KEY, frame, VM)
    except wire.WireError:
        pass


def test_canonical_body_is_compact_sorted_json() -> None:
    payload = inner(body())[1 + wire.MAC_LEN :]
    assert payload == json.dumps(body(), separators=(",", ":"), sort_keys=True).encode()
