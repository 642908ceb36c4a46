"""Which rules a one-rule change edited, as the parser knows it (pure): `parse_rules_changed` records the
positions it validated, and `resolve_update` asks, so finding the changed rules among 10,000 costs the size
of the change, not a pass of identity checks over every rule.

One entry per base: the daemon validates an edit (from the policy it holds) and then compiles it (from the
same policy), so the last two are kept.
"""

from __future__ import annotations

from hyperfence.model.policy import Rule

KEEP = 2
# (the rules before, the rules after, the positions that may differ): newest first, replaced whole.
_EDITS: list[tuple[tuple[Rule, ...], tuple[Rule, ...], tuple[int, ...]]] = []


def record(before: tuple[Rule, ...], after: tuple[Rule, ...], positions: tuple[int, ...]) -> None:
    """`after` is `before` with only the rules at `positions` edited or appended (the others: the very
    objects of `before`)."""
    global _EDITS  # noqa: PLW0603 - a small memo of what a pure function made
    _EDITS = [(before, after, positions), *(e for e in _EDITS if e[1] is not after)][:KEEP]


def edited(before: tuple[Rule, ...], after: tuple[Rule, ...]) -> tuple[int, ...] | None:
    """The positions at which `after` may differ from `before`, when a recorded edit made one from the
    other (by identity); None when unknown."""
    for b, a, positions in _EDITS:
        if a is after and b is before:
            return positions
    return None
