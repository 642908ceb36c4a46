"""reconcile/firewall.py's pure parts: the rule handles fetched chain by chain, and the record's file form."""

from __future__ import annotations

import pytest

from hyperfence.codec.nft_rules import Generation
from hyperfence.reconcile.firewall import ChainHandles, Record
from hyperfence.ruleset.ir import TableId

T = TableId("bridge", "hyperfence")


def test_handles_are_fetched_once_per_chain_when_first_needed() -> None:
    fetched: list[str] = []

    def fetch(table: TableId, chain: str) -> list[tuple[int, str]]:
        fetched.append(chain)
        return {"a": [(4, "web"), (5, "sys:drop")], "b": [(9, "ssh")]}.get(chain, [])

    handles = ChainHandles(fetch)
    assert fetched == []
    assert handles[(T, "a", "web")] == 4
    assert handles[(T, "a", "sys:drop")] == 5
    assert fetched == ["a"]
    with pytest.raises(KeyError):
        handles[(T, "a", "gone")]  # the kernel does not hold it: not fetched again
    assert fetched == ["a"]
    handles[(T, "b", "ssh-new")] = 11  # what a verified apply learned wins over a later fetch
    assert handles[(T, "b", "ssh")] == 9
    assert handles[(T, "b", "ssh-new")] == 11
    assert fetched == ["a", "b"]
    assert handles.pop((T, "c", "x"), None) is None  # pop does not fetch
    assert fetched == ["a", "b"]


def test_a_record_survives_its_file_form_and_a_damaged_one_is_none() -> None:
    rec = Record(Generation("boot:4:123", 77), (1 << 127) + 5, exact=True)
    assert Record.from_dict(rec.as_dict()) == rec
    for bad in ({}, {**rec.as_dict(), "digest": "zz"}, {**rec.as_dict(), "generation": None}, []):
        assert Record.from_dict(bad) is None
    assert Record.from_dict({**rec.as_dict(), "exact": "yes"}) == Record(rec.generation, rec.digest, False)
