"""conntrack dump -> delete keys of the entries of given addresses (pure)."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from hyperfence.adapters.conntrack import NLA_F_NESTED, matching_entries


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def entry(src: str, dst: str, *, zone: int | None = None) -> bytes:
    ip = attr(1, ipaddress.IPv4Address(src).packed) + attr(2, ipaddress.IPv4Address(dst).packed)
    orig = attr(1 | NLA_F_NESTED, ip) + attr(2 | NLA_F_NESTED, attr(1, bytes([1])))
    body = struct.pack("=BBH", 2, 0, 0) + attr(1 | NLA_F_NESTED, orig)
    if zone is not None:
        body += attr(18, struct.pack(">H", zone))
    return struct.pack("=IHHII", 16 + len(body), 1 << 8, 2, 1, 0) + body


DONE = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
VMS = frozenset(ipaddress.IPv4Address(a).packed for a in ("10.0.0.1", "10.0.0.2"))


def test_entries_with_a_vm_at_either_end_are_keyed_by_their_original_tuple_and_zone() -> None:
    data = entry("10.0.0.1", "8.8.8.8") + entry("9.9.9.9", "10.0.0.2", zone=3) + entry("9.9.9.9", "8.8.8.8")
    keys, done, err = matching_entries(data, VMS)
    assert (done, err) == (False, 0)
    assert len(keys) == 2
    assert keys[0].startswith(struct.pack("=HH", len(keys[0]), 1 | NLA_F_NESTED))
    assert ipaddress.IPv4Address("10.0.0.1").packed in keys[0]
    assert keys[1].endswith(attr(18, struct.pack(">H", 3)))


def test_the_end_of_a_dump_and_errors_are_reported() -> None:
    assert matching_entries(entry("10.0.0.1", "8.8.8.8") + DONE, VMS)[1:] == (True, 0)
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    assert matching_entries(error, VMS) == ([], True, 1)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_valid_argument(data: bytes) -> None:
    matching_entries(data, VMS)
