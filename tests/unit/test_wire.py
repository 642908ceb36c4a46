"""The agent wire format: frames, MACs, and every way a frame is refused."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence import wire

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


# --- bounds: what the host parses from a VM -------------------------------------------------------


def signed(payload: bytes, key: bytes = KEY) -> bytes:
    """A frame (without length prefix) whose MAC is valid for `payload`, whatever it is."""
    import hashlib
    import hmac

    return b"\x01" + hmac.new(key, b"\x01" + payload, hashlib.sha256).digest() + payload


@pytest.mark.parametrize("depth", [wire.MAX_DEPTH + 1, 1000, 100_000])
def test_a_signed_body_nested_too_deep_is_malformed_not_a_crash(depth: int) -> None:
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        payload = b'{"vm":"vm-1","seq":1,"t":1,"kind":"beat","data":{"x":' + opener * depth + b"1"
        payload += closer * depth + b"}}"
        assert reason(signed(payload)) == "malformed"


def test_nesting_within_the_bound_is_accepted() -> None:
    nested: object = 1
    for _ in range(wire.MAX_DEPTH - 3):  # body -> data -> x -> ...
        nested = [nested]
    assert wire.verify(KEY, inner(body(data={"x": nested})), VM)["data"]["x"] == nested


def test_brackets_inside_strings_do_not_count() -> None:
    text = "[" * 5000 + '\\"{' * 100
    assert wire.verify(KEY, inner(body(data={"x": text})), VM)["data"]["x"] == text


@pytest.mark.parametrize("seq", [wire.MAX_SEQ + 1, 2**64, 10**30])
def test_a_seq_the_store_cannot_hold_is_malformed(seq: int) -> None:
    assert reason(inner(body(seq=seq))) == "malformed"
    assert wire.verify(KEY, inner(body(seq=wire.MAX_SEQ)), VM)["seq"] == wire.MAX_SEQ


@pytest.mark.parametrize("t", ["NaN", "Infinity", "-Infinity"])
def test_a_time_that_is_not_finite_is_malformed(t: str) -> None:
    payload = b'{"data":{},"kind":"beat","seq":1,"t":' + t.encode() + b',"vm":"vm-1"}'
    assert reason(signed(payload)) == "malformed"


def test_a_huge_integer_is_malformed() -> None:
    payload = b'{"data":{"x":' + b"9" * 10_000 + b'},"kind":"beat","seq":1,"t":1,"vm":"vm-1"}'
    assert reason(signed(payload)) == "malformed"


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=1, max_value=8))
def test_too_deep_agrees_with_the_parsed_depth(value: object, limit: int) -> None:
    text = json.dumps(value).encode()
    assert wire.too_deep(text, limit) == (depth_of(value) > limit)


def test_named_vms_reads_only_the_vm_field_and_at_most_a_few() -> None:
    frame = inner(body())
    assert wire.named_vms(frame) == [VM]
    many = b"\x01" + b"m" * wire.MAC_LEN + b"".join(b'"vm":"v%d",' % i for i in range(100))
    assert wire.named_vms(many) == ["v0", "v1", "v2", "v3"]
    assert wire.named_vms(b"\x01" + b"m" * wire.MAC_LEN + b'"vm":"' + b"x" * 1000 + b'"') == []


# --- fuzz: authenticated frames (the MAC verifies, so parsing is reached) ---------------------------


@given(st.binary(max_size=2000))
def test_any_signed_payload_is_a_body_or_a_wire_error(payload: bytes) -> None:
    try:
        got = wire.verify(KEY, signed(payload), VM)
    except wire.WireError:
        return
    assert got["vm"] == VM and 0 <= got["seq"] <= wire.MAX_SEQ


@given(json_values, json_values, st.sampled_from(["hello", "beat", "bye", "x"]))
def test_any_signed_json_body_is_a_body_or_a_wire_error(data: object, seq: object, kind: str) -> None:
    payload = json.dumps({"vm": VM, "seq": seq, "t": 1.0, "kind": kind, "data": data}).encode()
    try:
        got = wire.verify(KEY, signed(payload), VM)
    except wire.WireError:
        return
    assert isinstance(got["data"], dict) and isinstance(got["seq"], int)


@given(
    st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"1", b",", b":", b"a"]), max_size=3000)
)
def test_any_signed_bracket_soup_is_a_wire_error_or_a_body(parts: list[bytes]) -> None:
    with contextlib.suppress(wire.WireError):
        wire.verify(KEY, signed(b"".join(parts)), VM)
