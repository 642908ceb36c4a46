"""Which rules a one-rule change edited, as the parser knows it (pure): `parse_rules_changed` records the
positions it validated, and `resolve_update` asks, so finding the changed rules among 10,000 costs the size
of the change, not a pass of identity checks over every rule.

One entry per base: the daemon validates an edit (from the policy it holds) and then compiles it (from the
same policy), so the last two are kept.
"""

from __future__ import annotations

from hyperfence.model.policy import Rule
from hyperfence.policy.memo import Recent

# The rules after an edit -> (the rules before, the positions that may differ).
_EDITS: Recent[tuple[Rule, ...], tuple[tuple[Rule, ...], tuple[int, ...]]] = Recent(2)


def record(before: tuple[Rule, ...], after: tuple[Rule, ...], positions: tuple[int, ...]) -> None:
    """`after` is `before` with only the rules at `positions` edited or appended (the others: the very
    objects of `before`)."""
    _EDITS.put(after, (before, positions))


def edited(before: tuple[Rule, ...], after: tuple[Rule, ...]) -> tuple[int, ...] | None:
    """The positions at which `after` may differ from `before`, when a recorded edit made one from the
    other (by identity); None when unknown."""
    found = _EDITS.get(after)
    return found[1] if found is not None and found[0] is before else None
