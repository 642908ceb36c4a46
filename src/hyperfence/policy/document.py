"""Policy text (YAML or JSON) -> plain data, bounded before and while it is parsed.

Whatever a person feeds `hyperfence policy check`, the answer is located problems (an `InvalidInputError`),
never a traceback or an exhausted machine. So a document is refused, with the place that broke a limit, when

* it is larger than `MAX_POLICY_BYTES` (64 MiB; a policy of 1,000 VMs and 1,000 rules is ~300 kB), checked
  before parsing;
* it nests lists and mappings deeper than `MAX_POLICY_DEPTH` (32; a policy needs 5): the YAML and JSON
  parsers recurse once per level and would die of a RecursionError near 1,000 levels. JSON is measured
  before parsing, YAML while it is composed;
* its YAML aliases expand to more than `MAX_ALIAS_NODES` nodes: a few hundred bytes of aliases of aliases
  ("billion laughs") would otherwise make validation walk billions of values;
* it is not UTF-8.

YAML is read as PyYAML's safe loader reads it (YAML 1.1), except that `52:54:00:00:00:02` stays the MAC
address and `22:80` the text it is, not the base-60 numbers YAML 1.1 makes of them (YAML 1.2 dropped those).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from hyperfence.errors import InvalidInputError, Problem

MAX_POLICY_BYTES = 64 * 1024 * 1024
MAX_POLICY_DEPTH = 32
MAX_ALIAS_NODES = 1_000_000


def load_document(text: str | bytes, *, source: str = "policy") -> Any:
    """YAML (a superset of JSON) -> plain data. Every refusal is one `InvalidInputError` with a location."""
    size = len(text) if isinstance(text, bytes) or text.isascii() else len(text.encode())
    if size > MAX_POLICY_BYTES:
        raise InvalidInputError(
            f"{source} is larger than {MAX_POLICY_BYTES // 2**20} MiB ({MAX_POLICY_BYTES:,} bytes), the most a "
            "policy may be (expected a smaller file: write long address lists as CIDRs and ranges)"
        )
    if isinstance(text, bytes):
        text = _decode(text, source)
    try:
        if text.lstrip().startswith("{"):
            return _load_json(text, source)
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader (see _BoundedLoader)
    except _Limit as e:
        raise InvalidInputError(f"{source} {e.what}", [Problem(e.where, e.message)]) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (e.g. a NUL byte)
        raise InvalidInputError(
            f"{source} is not valid YAML",
            [
                Problem(
                    _where(text, e.position),
                    f"character {_codepoint(e.character)} is not allowed in YAML text",
                )
            ],
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise InvalidInputError(
            f"{source} is not valid YAML", [Problem(where, str(getattr(e, "problem", e)))]
        ) from None


def _load_json(text: str, source: str) -> Any:
    """JSON, the fast way; a mapping in YAML's flow style (`{networks: [...]}`) also starts with `{`.
    The depth is measured on the loaded data (json.loads itself gives up with a RecursionError near 1,000
    levels); only a document that is too deep is scanned again, for the place to report."""
    try:
        data = json.loads(text)
        too_deep = is_too_deep(data)
    except RecursionError:
        too_deep = True
    except json.JSONDecodeError as e:
        json_error = InvalidInputError(
            f"{source} is not valid JSON", [Problem(f"line {e.lineno} column {e.colno}", e.msg)]
        )
        try:
            return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader (see _BoundedLoader)
        except yaml.YAMLError:
            raise json_error from None
    if too_deep:
        offset = _json_nesting_over_limit(text)
        raise _Limit("is nested too deeply", "" if offset is None else _where(text, offset), DEPTH_MESSAGE)
    return data


def is_too_deep(data: Any) -> bool:
    """True when lists and mappings nest deeper than `MAX_POLICY_DEPTH` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_POLICY_DEPTH:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return False


DEPTH_MESSAGE = (
    f"more than {MAX_POLICY_DEPTH} nested lists or mappings (expected at most {MAX_POLICY_DEPTH}; "
    "a policy needs 5)"
)


class _Limit(Exception):
    """A document that breaks one of the limits above, and where."""

    def __init__(self, what: str, where: str, message: str) -> None:
        super().__init__(message)
        self.what, self.where, self.message = what, where, message


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise InvalidInputError(
            f"{source} is not UTF-8 text",
            [
                Problem(
                    f"line {line} column {column}", f"byte {data[e.start]:#04x} is not UTF-8 (expected text)"
                )
            ],
        ) from None


def _codepoint(char: object) -> str:
    """`U+0000`: how a character that cannot be shown is named (PyYAML gives it as a number or a string)."""
    number = (
        char if isinstance(char, int) else ord(char) if isinstance(char, str) and len(char) == 1 else None
    )
    return repr(char) if number is None else f"U+{number:04X}"


def _where(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"line {line} column {offset - text.rfind(chr(10), 0, offset)}"


# A JSON string (skipped whole, brackets inside it do not count) or a bracket.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _json_nesting_over_limit(text: str) -> int | None:
    """The offset of the first bracket nested deeper than `MAX_POLICY_DEPTH`, or None."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        char = text[m.start()]
        if char in "[{":
            depth += 1
            if depth > MAX_POLICY_DEPTH:
                return m.start()
        elif char in "]}":
            depth -= 1
    return None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (only plain data: no Python objects), bounded while it composes the document:
    its depth, and the nodes its aliases stand for."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0  # nodes composed so far, each alias counted as the nodes it stands for
        self._aliased = 0  # of which, nodes that aliases stand for
        self._sizes: dict[str, int] = {}  # anchor -> the nodes it stands for

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            anchor = event.anchor
            size = self._sizes.get(anchor) if anchor is not None else None
            if size is None and anchor in self.anchors:
                raise _Limit(
                    "is not a policy",
                    _mark(event.start_mark),
                    f"alias *{anchor} is inside its own anchor &{anchor} (expected no recursive aliases)",
                )
            self._nodes += size or 0
            self._aliased += size or 0
            if self._aliased > MAX_ALIAS_NODES:
                raise _Limit(
                    "is too large once its aliases are expanded",
                    _mark(event.start_mark),
                    f"aliases stand for more than {MAX_ALIAS_NODES:,} values (expected fewer: write "
                    "the values out, or use fewer aliases of aliases)",
                )
            return super().compose_node(parent, index)  # an undefined alias is a YAML error there
        nests = not isinstance(event, yaml.ScalarEvent)  # lists and mappings nest; as in JSON, text does not
        self._depth += nests
        if self._depth > MAX_POLICY_DEPTH:
            raise _Limit("is nested too deeply", _mark(event.start_mark), DEPTH_MESSAGE)
        start = self._nodes
        self._nodes += 1
        node = super().compose_node(parent, index)
        self._depth -= nests
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._sizes[anchor] = self._nodes - start
        return node


# YAML 1.1's int and float forms without the base-60 ones (`1:30` is 90 in YAML 1.1), as PyYAML writes them.
_INT = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_NO_BASE_60 = {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, _NO_BASE_60.get(tag, regexp)) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _mark(mark: Any) -> str:
    return "" if mark is None else f"line {mark.line + 1} column {mark.column + 1}"
