"""Collecting every problem of an input, each located by its path (`rules[2].ports[0]: ...`).

Two rules keep the list to the point:

* one bad field hides nothing else: an item is validated field by field (`Collector.fields`), so a rule with
  a bad `priority` still has its selectors and ports checked;
* one mistake is reported once: an item that is itself wrong is marked (`Collector.mark_reported`), and a
  reference to it elsewhere (`vm:web` in a rule, when the VM `web` has a bad MAC) is not reported again as
  "not declared".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hyperfence.errors import Problem

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

ALL = "*"  # `mark_reported(kind, ALL)`: the whole section is wrong, so is every reference into it


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def loc(parts: Iterable[int | str]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + p
    return out


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a message quotes what it got, never a whole huge value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:/-]+")


def key_path(path: str, key: object) -> str:
    """The path of a mapping's entry: `labels.role`, or `labels['a b']` when the key is not plain text."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{shown(key)}]"


def one_or_list(value: Any, path: str) -> list[tuple[str, Any]]:
    """The items of a field that takes one value or a list of them, each with its path."""
    if isinstance(value, list):
        return [(f"{path}[{j}]", item) for j, item in enumerate(value)]
    return [(path, value)]


class Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self._reported: set[tuple[str, str]] = set()

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def mark_reported(self, kind: str, name: str = ALL) -> None:
        """The `kind` item `name` (or, with ALL, every item of that kind) has problems reported already."""
        self._reported.add((kind, name))

    def is_reported(self, kind: str, name: str) -> bool:
        """True when a reference to `name` needs no problem of its own (see `mark_reported`)."""
        return (kind, name) in self._reported or (kind, ALL) in self._reported

    def fields(
        self, cls: type[M], data: Any, path: str, *, required: tuple[str, ...] = ()
    ) -> tuple[M, frozenset[str]] | None:
        """`data` (a mapping) validated field by field: a bad field is reported and left out, so that the
        item's other fields are still checked. Returns the document, where each bad field holds its
        default, and the names of the bad fields (skip the checks that need them); None when `data` is
        not a mapping.

        Every field of `cls` needs a default; the `required` ones (names as written in the input) are
        checked here, so that a missing one is a problem of its own and the others are still validated.
        """
        if not isinstance(data, dict):
            expected = f"a mapping with {', '.join(required)}" if required else "a mapping"
            self.add(path, f"expected {expected} (got {shown(data)})")
            return None
        bad = {name for name in required if data.get(name) is None}
        for name in sorted(bad, key=required.index):
            self.add(_join(path, name), "missing (a required field; see docs/policy.md)")
        try:
            return cls.model_validate(data), frozenset(bad)
        except ValidationError as e:
            self._add_errors(e, path)
            bad |= {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        try:
            kept = {k: v for k, v in data.items() if str(k) not in bad}
            return cls.model_validate(kept), frozenset(bad)
        except ValidationError:  # not expected: every field has a default, and the good ones validated
            return None

    def value(self, fn: Callable[[Any], T], arg: Any, path: str) -> T | None:
        try:
            return fn(arg)
        except ValueError as e:
            self.add(path, str(e))
            return None

    def _add_errors(self, e: ValidationError, path: str) -> None:
        for err in e.errors():
            parts = list(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; see docs/policy.md)"
            elif err["type"] == "invalid_key" or (parts and parts[-1] == "[key]"):  # a key, not a value
                if parts[-1] == "[key]":
                    parts.pop()
                key = parts.pop() if parts else err["input"]
                parts.append(str(key))
                msg = f"the key {shown(key)} is not a string (expected a name)"
            else:
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] != "missing":
                    msg = f"{msg} (got {shown(err['input'])})"
            self.add(_join(path, loc(parts)), msg)


def _join(path: str, sub: str) -> str:
    if not sub:
        return path
    if not path or sub.startswith("["):
        return path + sub
    return f"{path}.{sub}"
