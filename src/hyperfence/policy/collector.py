"""Collecting every problem of an input, each located by its path (`rules[2].ports[0]: ...`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hyperfence.errors import Problem

T = TypeVar("T")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def loc(parts: Iterable[int | str]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + ("from" if p == "from_" else p)
    return out


class Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def model(self, cls: type[T], data: Any, path: str) -> T | None:
        try:
            return cls.model_validate(data)  # type: ignore[attr-defined, no-any-return]
        except ValidationError as e:
            for err in e.errors():
                sub = loc(err["loc"])
                where = f"{path}.{sub}" if sub and path else (sub or path)
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] not in ("missing", "extra_forbidden"):
                    msg = f"{msg} (got {err['input']!r})"
                if err["type"] == "extra_forbidden":
                    msg = "unknown field (check the spelling; see docs/policy.md)"
                self.add(where, msg)
            return None

    def value(self, fn: Callable[[Any], T], arg: Any, path: str) -> T | None:
        try:
            return fn(arg)
        except ValueError as e:
            self.add(path, str(e))
            return None
