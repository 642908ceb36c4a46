"""The one table of error kinds (exit code, HTTP status) and the wire form that keeps an error's kind across
the daemon's control socket."""

from __future__ import annotations

import json

import pytest

from hyperfence import errors
from hyperfence.errors import (
    KINDS,
    BugError,
    ConflictError,
    DriftError,
    HyperfenceError,
    InvalidInputError,
    KernelError,
    NotFoundError,
    PermissionDeniedError,
    Problem,
    TemporaryError,
    exit_code,
    from_wire,
    http_status,
    prefixed,
    to_wire,
)

EVERY_CLASS = [k.cls for k in KINDS]


def test_the_table_holds_every_error_class_once_with_the_documented_codes() -> None:
    declared = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, HyperfenceError) and cls is not HyperfenceError
    }
    assert set(EVERY_CLASS) == declared and len(EVERY_CLASS) == len(declared)
    assert {k.cls.__name__: (k.exit_code, k.http_status) for k in KINDS} == {
        "InvalidInputError": (2, 422),
        "NotFoundError": (3, 404),
        "ConflictError": (4, 409),
        "PermissionDeniedError": (5, 403),
        "TemporaryError": (6, 503),
        "KernelError": (7, 502),
        "DriftError": (8, 502),
        "BugError": (70, 500),
    }
    # the exit codes are the ones the README documents, each used once
    assert len({k.exit_code for k in KINDS}) == len(KINDS)
    assert (exit_code(HyperfenceError("x")), http_status(HyperfenceError("x"))) == (1, 500)


def test_a_subclass_maps_as_its_nearest_class_in_the_table() -> None:
    class Refused(ConflictError):
        pass

    assert (exit_code(Refused("x")), http_status(Refused("x"))) == (4, 409)
    assert to_wire(Refused("no"))["error_kind"] == "ConflictError"


def make(cls: type[HyperfenceError]) -> HyperfenceError:
    if cls is InvalidInputError:
        return InvalidInputError(
            "p.yaml has 2 problem(s)",
            [Problem("rules[0].ports", "range 80-70 is reversed"), Problem("", "a problem with no path")],
        )
    if cls is TemporaryError:
        return TemporaryError("the store is locked", retry_after=2.5)
    return cls(f"a {cls.__name__} with\ntwo lines")


@pytest.mark.parametrize("cls", EVERY_CLASS, ids=[c.__name__ for c in EVERY_CLASS])
def test_every_class_survives_the_wire_as_json(cls: type[HyperfenceError]) -> None:
    e = make(cls)
    wire = json.loads(json.dumps(to_wire(e)))
    assert wire["ok"] is False and wire["error"] == str(e)  # what an old client reads
    back = from_wire(wire)
    assert type(back) is cls and str(back) == str(e)
    assert exit_code(back) == exit_code(e) and http_status(back) == http_status(e)
    if isinstance(e, InvalidInputError):
        assert isinstance(back, InvalidInputError)
        assert back.problems == e.problems and back.summary == e.summary
    if isinstance(e, TemporaryError):
        assert isinstance(back, TemporaryError) and back.retry_after == 2.5


@pytest.mark.parametrize("cls", EVERY_CLASS, ids=[c.__name__ for c in EVERY_CLASS])
def test_prefixed_keeps_the_kind_and_the_details(cls: type[HyperfenceError]) -> None:
    e = prefixed(make(cls), "the daemon could not apply generation 3: ")
    assert type(e) is cls and str(e).startswith("the daemon could not apply generation 3: ")
    if isinstance(e, InvalidInputError):
        assert [str(p) for p in e.problems] == [
            "rules[0].ports: range 80-70 is reversed",
            "a problem with no path",
        ]
        assert str(e).splitlines()[1:] == [
            "  rules[0].ports: range 80-70 is reversed",
            "  a problem with no path",
        ]
    if isinstance(e, TemporaryError):
        assert e.retry_after == 2.5


def test_a_reply_of_an_older_daemon_or_a_garbled_one_still_makes_an_error() -> None:
    old = from_wire({"ok": False, "error": "nftables refused the batch"}, default=KernelError)
    assert type(old) is KernelError and str(old) == "nftables refused the batch"
    assert type(from_wire({"ok": False, "error": "x", "error_kind": "SystemExit"})) is HyperfenceError
    assert type(from_wire({"ok": False, "error": "x", "error_kind": "Problem"})) is HyperfenceError
    garbled = from_wire(
        {"ok": False, "error": 7, "error_kind": "InvalidInputError", "problems": "no", "message": None}
    )
    assert type(garbled) is InvalidInputError and str(garbled) == "the daemon refused without saying why"
    retry = from_wire({"error": "busy", "error_kind": "TemporaryError", "retry_after": float("nan")})
    assert isinstance(retry, TemporaryError) and retry.retry_after == 1.0
    negative = from_wire({"error": "busy", "error_kind": "TemporaryError", "retry_after": -3})
    assert isinstance(negative, TemporaryError) and negative.retry_after == 0.0
    long = from_wire({"error": "x" * 10_000_000, "error_kind": "NotFoundError"})
    assert type(long) is NotFoundError and len(str(long)) == errors.MAX_WIRE_TEXT


def test_a_problem_list_is_bounded_and_skips_what_is_not_a_problem() -> None:
    wire = to_wire(InvalidInputError("many", [Problem(f"p{i}", "bad") for i in range(5000)]))
    wire["problems"].insert(0, "not a mapping")
    back = from_wire(wire)
    assert isinstance(back, InvalidInputError) and len(back.problems) == errors.MAX_WIRE_PROBLEMS - 1


@pytest.mark.parametrize(
    "cls", [ConflictError, NotFoundError, PermissionDeniedError, DriftError, BugError, KernelError]
)
def test_the_wire_message_has_no_problems_and_error_has_everything(cls: type[HyperfenceError]) -> None:
    wire = to_wire(cls("text"))
    assert (wire["message"], wire["error"], wire["error_kind"]) == ("text", "text", cls.__name__)
    assert "problems" not in wire and "retry_after" not in wire
