"""The overlay merge: producers never undo each other, expiry, the strictest rate limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.model.overlay import (
    NOTHING,
    Merged,
    Overlay,
    OverlayKind,
    expired,
    merge_overlays,
    next_expiry,
    replace_producer,
)

ISO, RATE, SHIELD = OverlayKind.ISOLATE, OverlayKind.RATE_LIMIT, OverlayKind.SHIELD


def ov(
    producer: str, vm: str, kind: OverlayKind, *, until: float | None = None, rate: int | None = None
) -> Overlay:
    return Overlay(producer, vm, kind, f"{producer} says so", since=100.0, until=until, rate=rate)


def test_nothing_merges_to_nothing() -> None:
    assert merge_overlays((), 0.0) == NOTHING
    assert not NOTHING


def test_every_producers_overlays_count() -> None:
    merged = merge_overlays(
        [
            ov("heartbeat", "a", ISO),
            ov("operator", "b", ISO),
            ov("operator", "c", SHIELD),
            ov("detector", "d", RATE, rate=5),
        ],
        200.0,
    )
    assert merged == Merged(frozenset({"a", "b"}), (("d", 5),), frozenset({"c"}))
    assert merged.rate_of("d") == 5 and merged.rate_of("a") is None


def test_the_strictest_rate_limit_wins() -> None:
    merged = merge_overlays([ov("operator", "a", RATE, rate=50), ov("detector", "a", RATE, rate=7)], 0.0)
    assert merged.rate_limits == (("a", 7),)


def test_an_expired_overlay_counts_for_nothing() -> None:
    overlays = [ov("operator", "a", ISO, until=150.0), ov("operator", "b", RATE, until=150.0, rate=3)]
    assert merge_overlays(overlays, 149.9).isolated == {"a"}
    assert merge_overlays(overlays, 150.0) == NOTHING
    assert expired(overlays, 150.0) == tuple(overlays)
    assert next_expiry(overlays, 100.0) == 150.0
    assert next_expiry(overlays, 150.0) is None


def test_replacing_one_producer_keeps_the_others() -> None:
    current = (ov("heartbeat", "a", ISO), ov("operator", "a", ISO))
    after, set_, released = replace_producer(current, "heartbeat", ())
    assert after == (ov("operator", "a", ISO),)
    assert set_ == () and released == (ov("heartbeat", "a", ISO),)
    assert merge_overlays(after, 0.0).isolated == {"a"}  # the operator's isolation stays


def test_replacing_with_the_same_overlays_sets_nothing() -> None:
    current = (ov("operator", "a", ISO),)
    assert replace_producer(current, "operator", current) == (current, (), ())


def test_a_producer_cannot_pass_anothers_overlay() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        replace_producer((), "operator", (ov("heartbeat", "a", ISO),))


OVERLAYS = st.lists(
    st.builds(
        ov,
        st.sampled_from(["heartbeat", "operator", "detector"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(list(OverlayKind)),
        until=st.one_of(st.none(), st.floats(0, 300)),
        rate=st.integers(1, 100),
    ),
    max_size=12,
)


@given(OVERLAYS, st.floats(0, 300), st.randoms())
def test_the_merge_is_order_free(overlays: list[Overlay], now: float, rnd: object) -> None:
    shuffled = list(overlays)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert merge_overlays(overlays, now) == merge_overlays(shuffled, now)


@given(OVERLAYS, st.sampled_from(["heartbeat", "operator", "detector"]), st.floats(0, 300))
def test_no_producer_can_release_anothers_isolation(
    overlays: list[Overlay], producer: str, now: float
) -> None:
    """Whatever one producer sets or releases, the VMs the others isolate stay isolated."""
    others = {o.vm for o in overlays if o.producer != producer and o.kind is ISO and o.is_active(now)}
    after, _, _ = replace_producer(tuple(overlays), producer, ())
    assert others <= merge_overlays(after, now).isolated
