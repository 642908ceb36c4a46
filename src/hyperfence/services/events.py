"""The event log's use case: the recorded events of one VM and/or kind, newest last."""

from __future__ import annotations

from typing import Any

from hyperfence.errors import InvalidInputError, Problem
from hyperfence.ports import EventLog

MAX_LIMIT = 10_000


def list_events(
    log: EventLog, *, vm: str | None = None, kind: str | None = None, after: int = 0, limit: int = 50
) -> list[dict[str, Any]]:
    """The latest `limit` events (1 to MAX_LIMIT) with an id above `after` (0 or more), oldest first; each
    is its data with `id`, `time`, `kind` and `vm`. A caller that follows the log asks again with the last
    id it saw as `after`."""
    problems = []
    if not 1 <= limit <= MAX_LIMIT:
        problems.append(Problem("limit", f"{limit} is out of range (expected 1 to {MAX_LIMIT})"))
    if after < 0:
        problems.append(Problem("after", f"{after} is below 0 (expected an event id, or 0 for the first)"))
    if problems:
        raise InvalidInputError("events", problems)
    return log.events(vm=vm, kind=kind, after=after, limit=limit)
