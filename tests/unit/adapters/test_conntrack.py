"""The ctnetlink codecs, on messages built here the way the kernel lays them out: the dump counted by
address pair (`vm list`), and the delete keys of given addresses (after drift)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfence.adapters.conntrack import NLA_F_NESTED, AddressPairs, matching_entries, parse_dump_chunk
from hyperfence.errors import KernelError


def nla(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + payload
    return body + b"\0" * (-len(body) % 4)


def message(kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, 1, 0) + payload


def entry(src: str, dst: str) -> bytes:
    ip = nla(1, socket.inet_aton(src)) + nla(2, socket.inet_aton(dst))
    proto = nla(2, nla(1, bytes([17]) + b"\0\0\0"), nested=True)  # CTA_TUPLE_PROTO, before or after IP
    orig = nla(1, proto + nla(1, ip, nested=True), nested=True)
    reply = nla(2, nla(1, nla(1, socket.inet_aton(dst)) + nla(2, socket.inet_aton(src)), nested=True))
    status = nla(3, struct.pack(">I", 8))
    return message(0x0100, struct.pack("=BBH", 2, 0, 0) + status + orig + reply)


def test_a_dump_is_counted_by_original_address_pair_until_done() -> None:
    pairs: AddressPairs = Counter()
    chunk = entry("10.77.0.11", "10.78.0.2") * 3 + entry("10.78.0.2", "10.77.0.12")
    assert parse_dump_chunk(chunk, pairs) == (False, 4)
    assert parse_dump_chunk(entry("10.77.0.11", "10.78.0.2") + message(3, b"\0" * 4), pairs) == (True, 1)
    a, b, c = (socket.inet_aton(x) for x in ("10.77.0.11", "10.78.0.2", "10.77.0.12"))
    assert pairs == {(a, b): 4, (b, c): 1}


def test_errors_and_malformed_messages() -> None:
    pairs: AddressPairs = Counter()
    with pytest.raises(PermissionError):
        parse_dump_chunk(message(2, struct.pack("=i", -errno.EPERM)), pairs)
    with pytest.raises(KernelError, match="EINVAL"):
        parse_dump_chunk(message(2, struct.pack("=i", -errno.EINVAL)), pairs)
    with pytest.raises(KernelError, match="malformed"):
        parse_dump_chunk(entry("10.0.0.1", "10.0.0.2")[:-8], pairs)
    with pytest.raises(KernelError, match="malformed"):
        parse_dump_chunk(message(2, b"\xff\xff"), pairs)  # an error message too short for its code
    # an entry without an IPv4 tuple is skipped, not guessed at
    assert parse_dump_chunk(message(0x0100, b"\x02\0\0\0" + nla(3, b"\0\0\0\x08")), pairs) == (False, 1)
    assert not pairs


_header = st.builds(
    lambda length, kind, rest: struct.pack("=IHHII", length, kind, 2, 1, 0) + rest,
    st.integers(0, 400),
    st.sampled_from([0x0100, 2, 3, 0x0101]),
    st.binary(max_size=80),
)


@settings(max_examples=500, deadline=None)
@given(
    parts=st.lists(
        st.one_of(_header, st.binary(max_size=40), st.just(entry("10.0.0.1", "10.0.0.2"))), max_size=6
    )
)
def test_any_bytes_give_pairs_or_a_kernel_error(parts: list[bytes]) -> None:
    with contextlib.suppress(KernelError, PermissionError):
        parse_dump_chunk(b"".join(parts), Counter())


# --- delete keys (forget_flows) ---------------------------------------------------------------------


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def keyed_entry(src: str, dst: str, *, zone: int | None = None) -> bytes:
    ip = attr(1, ipaddress.IPv4Address(src).packed) + attr(2, ipaddress.IPv4Address(dst).packed)
    orig = attr(1 | NLA_F_NESTED, ip) + attr(2 | NLA_F_NESTED, attr(1, bytes([1])))
    body = struct.pack("=BBH", 2, 0, 0) + attr(1 | NLA_F_NESTED, orig)
    if zone is not None:
        body += attr(18, struct.pack(">H", zone))
    return struct.pack("=IHHII", 16 + len(body), 1 << 8, 2, 1, 0) + body


DONE = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
VMS = frozenset(ipaddress.IPv4Address(a).packed for a in ("10.0.0.1", "10.0.0.2"))


def test_entries_with_a_vm_at_either_end_are_keyed_by_their_original_tuple_and_zone() -> None:
    data = (
        keyed_entry("10.0.0.1", "8.8.8.8")
        + keyed_entry("9.9.9.9", "10.0.0.2", zone=3)
        + keyed_entry("9.9.9.9", "8.8.8.8")
    )
    keys, done, err = matching_entries(data, VMS)
    assert (done, err) == (False, 0)
    assert len(keys) == 2
    assert keys[0].startswith(struct.pack("=HH", len(keys[0]), 1 | NLA_F_NESTED))
    assert ipaddress.IPv4Address("10.0.0.1").packed in keys[0]
    assert keys[1].endswith(attr(18, struct.pack(">H", 3)))


def test_the_end_of_a_dump_and_errors_are_reported() -> None:
    assert matching_entries(keyed_entry("10.0.0.1", "8.8.8.8") + DONE, VMS)[1:] == (True, 0)
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    assert matching_entries(error, VMS) == ([], True, 1)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_valid_argument(data: bytes) -> None:
    matching_entries(data, VMS)
