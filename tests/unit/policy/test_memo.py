"""policy/memo.py: the last few values, found by the identity of what they were made from."""

from __future__ import annotations

from hyperfence.policy.memo import Recent


def test_values_are_found_by_identity_and_the_oldest_goes_first() -> None:
    a, b, c, equal_to_a = [1], [2], [3], [1]
    memo: Recent[list[int], str] = Recent(3)
    memo.put(a, "a")
    memo.put(b, "b")
    assert memo.get(a) == "a" and memo.get(b) == "b"
    assert memo.get(equal_to_a) is None  # equal is not the same
    memo.put(a, "a again")  # put again: found as the newest
    memo.put(c, "c")
    assert (memo.get(a), memo.get(b), memo.get(c)) == ("a again", "b", "c")
    memo.put(equal_to_a, "d")  # the oldest (b) goes
    assert (memo.get(a), memo.get(b), memo.get(c), memo.get(equal_to_a)) == ("a again", None, "c", "d")
