"""`list_events` over the in-memory event log."""

from __future__ import annotations

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.services.events import MAX_LIMIT, list_events
from hyperfence.testing import FakeEventLog


def test_events_of_a_vm_or_kind_newest_last_and_after_an_id() -> None:
    log = FakeEventLog()
    log.add_events(
        [("applied", None, {"n": 1}), ("agent:hello", "a", {"n": 2}), ("agent:bye", "a", {"n": 3})]
    )
    log.add_event("agent:hello", {"n": 4}, vm="b")
    assert [e["n"] for e in list_events(log, vm="a")] == [2, 3]
    assert [e["n"] for e in list_events(log, kind="agent:hello")] == [2, 4]
    assert [e["n"] for e in list_events(log, limit=2)] == [3, 4]
    first = list_events(log, vm="a")[0]
    assert [e["n"] for e in list_events(log, vm="a", after=first["id"])] == [3]
    assert set(first) == {"id", "time", "kind", "vm", "n"}


@pytest.mark.parametrize(
    ("limit", "after", "paths"), [(0, 0, ["limit"]), (MAX_LIMIT + 1, -1, ["limit", "after"])]
)
def test_a_bad_limit_or_start_is_invalid_input_naming_each(limit: int, after: int, paths: list[str]) -> None:
    with pytest.raises(InvalidInputError) as e:
        list_events(FakeEventLog(), limit=limit, after=after)
    assert [p.path for p in e.value.problems] == paths
