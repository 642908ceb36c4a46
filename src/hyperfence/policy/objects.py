"""A policy document as objects with their own versions (pure).

The repository keeps a policy as the objects it is made of, not as one text: each VM, network, rule, limit,
heartbeat and IP set is one object, and so is `settings`. A change is then the objects it touches — what the
REST API (one rule at a time) and a cluster key-value store write — and a whole document applied with
`hyperfence policy apply` becomes the set of object changes it implies (`diff`). The daemon learns what
changed from the repository and patches the document it holds (`patch`), so that a one-rule change is read,
validated, resolved and compiled as itself.

An object's key is (section, name):

    (K, "#")          the head of top-level key K: what K is (a list, a mapping, or a plain value, held)
    (K, NAME)         an item of a list section (`networks`, `vms`: its `name`; `rules`, `limits`,
                      `heartbeats`: its `id`), or an entry of a mapping section (`ipsets`: its key, with
                      one more '#' in front when it starts with one; its body is [key, value])
    (K, "#<i>")       an item of a list section without a usable name (none, not text, starting with '#',
                      or taken by an earlier item): named by its position

Each object also has its position in its section (`pos`), so that `assemble(split(doc)) == doc`, order
included: an item that moves is a changed object.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import orjson

from hyperfence.errors import InvalidInputError, NotFoundError, Problem
from hyperfence.policy.collector import shown
from hyperfence.policy.document import DEPTH_MESSAGE, is_too_deep
from hyperfence.policy.memo import Recent

HEAD = "#"
# The field that names an item of each list section (items of other lists are named by position).
NAMED_BY = {"networks": "name", "vms": "name", "rules": "id", "limits": "id", "heartbeats": "id"}
MAP_SECTIONS = frozenset({"ipsets"})
LIST_HEAD: dict[str, Any] = {"list": True}
MAP_HEAD: dict[str, Any] = {"map": True}

Key = tuple[str, str]


@dataclass(frozen=True)
class ObjectChange:
    """One object written (`body`, at `pos` of its section) or deleted (`deleted`; `pos` -1)."""

    section: str
    name: str
    pos: int
    body: Any = None
    deleted: bool = False

    @property
    def key(self) -> Key:
        return (self.section, self.name)


class Stored(NamedTuple):
    """An object as the repository holds it: its position and its canonical JSON text. (A tuple: a store
    builds one per object of a section it diffs.)"""

    pos: int
    text: str


def canonical(body: Any) -> str:
    """The text an object is stored and compared as: JSON with sorted keys."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()


def item_names(section: str, items: list[Any]) -> list[str]:
    """The name of each item of list section `section` (see the module's docstring)."""
    field = NAMED_BY.get(section)
    if field is None:
        return [f"#{i}" for i in range(len(items))]
    names = [item.get(field) if type(item) is dict else None for item in items]
    # The common case at C speed: every item named by distinct text not starting with '#'.
    if (
        set(map(type, names)) <= {str}
        and len(set(names)) == len(names)
        and not any(map(_unusable, cast(list[str], names)))
    ):
        return cast(list[str], names)
    out: list[str] = []
    taken: set[str] = set()
    for i, given in enumerate(names):
        name = given if isinstance(given, str) and not _unusable(given) and given not in taken else f"#{i}"
        taken.add(name)
        out.append(name)
    return out


# Per list section: the last lists of items whose names were looked up, and each name's position (newest
# first; a writer edits a version and the engine makes the same version again from it: two are kept). A list
# that `patch` makes from one of them by editing items in place (same names) and appending is given them
# carried, so a one-rule write finds its rule among 10,000 at the size of the change. (Replaced whole.)
# (A list's items are only of one section: one memo for all.)
_NAMED: Recent[list[Any], dict[str, int]] = Recent(4)


def item_position(section: str, items: list[Any], name: str) -> int | None:
    """The position of the item named `name` among `items` of list section `section` (`item_names`);
    None when none is."""
    at = _NAMED.get(items)
    if at is None:
        at = {n: i for i, n in enumerate(item_names(section, items))}
        _NAMED.put(items, at)
    return at.get(name)


def _carry_names(source: list[Any], new: list[Any], kept: bool, added: dict[str, int]) -> None:
    """`new` is `source` with items edited in place keeping their names (`kept`: only such edits) and the
    items `added` (name -> position) appended: carry `source`'s names to it, if they were looked up."""
    at = _NAMED.get(source)
    if at is not None and kept:
        _NAMED.put(new, {**at, **added} if added else at)


def _unusable(name: str) -> bool:
    return not name or name[0] == "#"


def _map_name(key: str) -> str:
    return "#" + key if key.startswith("#") else key


def _head(section: str, value: Any) -> Any:
    if isinstance(value, list):
        return LIST_HEAD
    if isinstance(value, dict) and section in MAP_SECTIONS:
        return MAP_HEAD
    return {"value": value}


def split(document: Any, *, only: Collection[str] | None = None) -> dict[Key, tuple[int, Any]]:
    """Every object of `document` (a mapping of sections), by key, with its position and body; with `only`,
    the items of those sections only (and every section's head)."""
    if not isinstance(document, dict):
        raise ValueError(f"a policy document is a mapping of sections, not {type(document).__name__}")
    out: dict[Key, tuple[int, Any]] = {}
    for pos, (section, value) in enumerate(document.items()):
        head = out[(section, HEAD)] = (pos, _head(section, value))
        if only is not None and section not in only:
            continue
        if head[1] == LIST_HEAD:
            out.update(
                ((section, name), (i, item))
                for i, (name, item) in enumerate(zip(item_names(section, value), value, strict=True))
            )
        elif head[1] == MAP_HEAD:
            out.update(((section, _map_name(k)), (i, [k, v])) for i, (k, v) in enumerate(value.items()))
    return out


def stored(document: Any) -> dict[Key, Stored]:
    """`split`, each body as its canonical text (what `diff` compares)."""
    return {key: Stored(pos, canonical(body)) for key, (pos, body) in split(document).items()}


def section_texts(document: dict[str, Any]) -> dict[str, bytes]:
    """Each section's canonical text (what a writer keeps to diff the next whole document against)."""
    return {section: orjson.dumps(value, option=orjson.OPT_SORT_KEYS) for section, value in document.items()}


def section_changes(section: str, old: Any, new: Any, new_text: bytes) -> list[ObjectChange] | None:
    """The item changes from `old` to `new` values of one list or mapping section when they are edits in
    place (an item keeps its name) and appends (compared as values, then checked against `new_text`, the
    new section's canonical text, so that `1` and `true` never pass for each other); None for anything else
    (diff by objects)."""
    if isinstance(old, list) and isinstance(new, list):
        old_items, new_items = old, new
    elif isinstance(old, dict) and isinstance(new, dict) and section in MAP_SECTIONS:
        old_items, new_items = [[k, v] for k, v in old.items()], [[k, v] for k, v in new.items()]
    else:
        return None
    n = len(old_items)
    if len(new_items) < n:
        return None
    at = [i for i, (a, b) in enumerate(zip(old_items, new_items[:n], strict=True)) if a != b]
    field = NAMED_BY.get(section)
    for i in at:  # an edit in place keeps the item's name (a name depends only on the items up to it)
        a, b = old_items[i], new_items[i]
        if isinstance(new, dict):
            if a[0] != b[0]:
                return None
        elif (
            field is None
            or not (isinstance(a, dict) and isinstance(b, dict))
            or canonical(a.get(field)) != canonical(b.get(field))
        ):
            return None
    at += range(n, len(new_items))
    rebuilt = list(old_items)
    for i in at:
        if i < n:
            rebuilt[i] = new_items[i]
        else:
            rebuilt.append(new_items[i])
    made = rebuilt if isinstance(new, list) else dict(rebuilt)
    if orjson.dumps(made, option=orjson.OPT_SORT_KEYS) != new_text:
        return None
    names = item_names(section, new) if isinstance(new, list) else [_map_name(k) for k in new]
    return [ObjectChange(section, names[i], i, new_items[i]) for i in at]


def diff(
    old: Mapping[Key, Stored], document: Any, *, only: Collection[str] | None = None
) -> list[ObjectChange]:
    """The object changes that turn the objects `old` into `document`: objects whose position or body
    differs, then deletions. With `only`, the items of the other sections are known to be unchanged: `old`
    need hold only every head and those sections' items."""
    new = split(document, only=only)
    changes: list[ObjectChange] = []
    for key, (pos, body) in new.items():
        was = old.get(key)
        if was is None or was.pos != pos or was.text != canonical(body):
            changes.append(ObjectChange(key[0], key[1], pos, body))
    changes.extend(ObjectChange(key[0], key[1], -1, deleted=True) for key in old.keys() - new.keys())
    return changes


def assemble(objects: Iterable[tuple[Key, int, Any]]) -> dict[str, Any]:
    """The document made of `objects` ((key, pos, body) of every object, in any order)."""
    heads: dict[str, tuple[int, Any]] = {}
    items: dict[str, list[tuple[int, Any]]] = {}
    for (section, name), pos, body in objects:
        if name == HEAD:
            heads[section] = (pos, body)
        else:
            items.setdefault(section, []).append((pos, body))
    document: dict[str, Any] = {}
    for section, (_, head) in sorted(heads.items(), key=lambda kv: kv[1][0]):
        members = [body for _, body in sorted(items.get(section, ()), key=lambda pb: pb[0])]
        if head == LIST_HEAD:
            document[section] = members
        elif head == MAP_HEAD:
            document[section] = dict(members)
        else:
            document[section] = head["value"]
    return document


def _listed(ch: ObjectChange, items: list[Any], names: dict[str, int]) -> str | None:
    """Make `ch` in list `items` (a copy) if it is an item edited where it is or appended: "kept" (an edit
    whose item keeps its name), "edited" (another edit), "appended"; None if not. A named item is checked by
    its own name (the repository's keys are unique: no pass over the section); one named by its position
    needs every name before it (`names`: the section's, filled the first time)."""
    field = NAMED_BY.get(ch.section)
    if ch.name.startswith(HEAD):
        if not names:
            names.update((n, i) for i, n in enumerate(item_names(ch.section, items)))
        edit = names.get(ch.name) == ch.pos
    else:
        here = items[ch.pos] if ch.pos < len(items) else None
        edit = field is not None and isinstance(here, dict) and here.get(field) == ch.name
    if edit:
        items[ch.pos] = ch.body
        named = field is not None and isinstance(ch.body, dict) and ch.body.get(field) == ch.name
        return "kept" if named else "edited"
    if ch.pos == len(items) and ch.name not in names:
        items.append(ch.body)
        if names:
            names[ch.name] = ch.pos
        return "appended"
    return None


def patch(document: dict[str, Any], changes: Iterable[ObjectChange]) -> dict[str, Any] | None:
    """`document` with `changes` made, sharing every untouched section and item with it (same objects: what
    lets the parser see at a glance what did not change). Handles the changes one write makes most: items
    edited in place and items appended (lists), entries edited or added (mappings), plain sections
    replaced. None for any other (deletions, moves, a section changing kind): assemble the document from
    the repository instead."""
    out = dict(document)
    order = list(out)
    copied: dict[str, dict[str, int]] = {}  # section -> its items' positions by name (once copied)
    lists: dict[str, tuple[list[Any], bool, dict[str, int]]] = {}  # list section -> (source, kept, added)
    for ch in changes:
        if ch.deleted:
            return None
        current = out.get(ch.section)
        if ch.name == HEAD:
            if ch.section not in out or order.index(ch.section) != ch.pos:
                return None
            now = _head(ch.section, current)
            if ch.body in (LIST_HEAD, MAP_HEAD) or now in (LIST_HEAD, MAP_HEAD):
                if ch.body != now:  # a list or mapping stays what it is (its items are objects)
                    return None
                continue
            out[ch.section] = ch.body["value"]
        elif isinstance(current, list):
            if ch.section not in copied:
                lists[ch.section] = (current, True, {})
                current = out[ch.section] = list(current)
                copied[ch.section] = {}
            how = _listed(ch, current, copied[ch.section])
            if how is None:
                return None
            source, kept, added = lists[ch.section]
            if how == "appended":
                added[ch.name] = ch.pos
            lists[ch.section] = (source, kept and how != "edited", added)
        elif isinstance(current, dict) and ch.section in MAP_SECTIONS:
            if not (isinstance(ch.body, list) and len(ch.body) == 2 and isinstance(ch.body[0], str)):
                return None
            k, v = ch.body
            if ch.section not in copied:
                current = out[ch.section] = dict(current)
                copied[ch.section] = {_map_name(key): i for i, key in enumerate(current)}
            at = copied[ch.section]
            if _map_name(k) != ch.name or at.get(ch.name, len(at)) != ch.pos:
                return None
            current[k] = v
            at[ch.name] = ch.pos
        else:
            return None
    for section, (source, kept, added) in lists.items():
        _carry_names(source, out[section], kept, added)
    return out


def fold(batches: Iterable[Iterable[ObjectChange]]) -> list[ObjectChange]:
    """The net change of consecutive batches (oldest first): the last write or deletion of each object,
    section by section, heads first, items in position order (as `patch` takes them)."""
    last: dict[Key, ObjectChange] = {}
    for batch in batches:
        for ch in batch:
            last[ch.key] = ch
    return sorted(last.values(), key=lambda ch: (ch.section, ch.name != HEAD, ch.pos))


def changed(objects: dict[Key, Stored], changes: Iterable[ObjectChange]) -> None:
    """Make `changes` in `objects` (in place)."""
    for ch in changes:
        if ch.deleted:
            objects.pop(ch.key, None)
        else:
            objects[ch.key] = Stored(ch.pos, canonical(ch.body))


# The sections of a policy document (policy/parse.py PolicyDoc), and what an item of each is.
SECTIONS = ("version", "settings", "networks", "vms", "ipsets", "rules", "limits", "heartbeats")


def _section(section: object) -> str:
    if section not in SECTIONS:
        raise InvalidInputError(
            "no such policy section",
            [
                Problem(
                    "section",
                    f"{shown(section)} is not a policy section (expected one of {', '.join(SECTIONS)})",
                )
            ],
        )
    return str(section)


def check_depth(item: Any) -> None:
    """`InvalidInputError` at `item` when it nests lists and mappings deeper than a policy may
    (`policy/document.py`): what a writer checks before the item meets anything that recurses."""
    if isinstance(item, dict | list) and is_too_deep(item):
        raise InvalidInputError("the item is nested too deeply", [Problem("item", DEPTH_MESSAGE)])


def write_item(document: dict[str, Any], section: str, item: Any) -> list[ObjectChange]:
    """The object changes that write `item` into `document`'s `section`: in a list section, the item named
    as `item` is (`NAMED_BY`) is replaced where it is, or `item` is appended; in `ipsets`, `item` is one
    `{NAME: addresses}` entry, replaced or added; any other section is replaced by `item` whole.
    `InvalidInputError` naming what is wrong with `section` or `item`. (Validating the document they make is
    the caller's: `services/edit.py`.)"""
    section = _section(section)
    check_depth(item)
    current = document.get(section)
    head_pos = list(document).index(section) if section in document else len(document)
    if section in NAMED_BY:
        field = NAMED_BY[section]
        name = item.get(field) if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or name.startswith("#"):
            raise InvalidInputError(
                f"a {section} item needs its {field}",
                [
                    Problem(
                        field,
                        f"{shown(name)} (expected a mapping with its {field}: text not starting with '#')",
                    )
                ],
            )
        if current is None:
            return [ObjectChange(section, HEAD, head_pos, LIST_HEAD), ObjectChange(section, name, 0, item)]
        if not isinstance(current, list):
            raise InvalidInputError(f"section {section} is not a list", [Problem(section, "expected a list")])
        at = item_position(section, current, name)
        return [ObjectChange(section, name, len(current) if at is None else at, item)]
    if section in MAP_SECTIONS:
        if not (isinstance(item, dict) and len(item) == 1):
            raise InvalidInputError(
                f"a {section} entry is one name and its value",
                [Problem(section, f"{shown(item)} (expected a mapping of one name to its addresses)")],
            )
        ((key, value),) = item.items()
        if current is None:
            return [
                ObjectChange(section, HEAD, head_pos, MAP_HEAD),
                ObjectChange(section, _map_name(key), 0, [key, value]),
            ]
        if not isinstance(current, dict):
            raise InvalidInputError(
                f"section {section} is not a mapping", [Problem(section, "expected a mapping")]
            )
        keys = list(current)
        pos = keys.index(key) if key in current else len(keys)
        return [ObjectChange(section, _map_name(key), pos, [key, value])]
    return [ObjectChange(section, HEAD, head_pos, {"value": item})]


def remove_item(document: dict[str, Any], section: str, name: str) -> list[ObjectChange]:
    """The object changes that remove item `name` from `section` (a list's item by its name, an `ipsets`
    entry by its name, or the whole of any other section: `name` "") — the items after it move up one.
    `NotFoundError` when there is no such item."""
    section = _section(section)
    current = document.get(section)
    if section in NAMED_BY or section in MAP_SECTIONS:
        if isinstance(current, list):
            names = item_names(section, current)
            if name not in names:
                listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise NotFoundError(
                    f"{section} has no item {name!r} ({'it has: ' + listed if names else 'it is empty'})"
                )
            at = names.index(name)
            rest = current[:at] + current[at + 1 :]
            return _moved(
                section,
                list(zip(names, current, strict=True)),
                list(zip(item_names(section, rest), rest, strict=True)),
            )
        if isinstance(current, dict):
            if name not in current:
                raise NotFoundError(f"{section} has no entry {name!r}")
            old = [(_map_name(k), [k, v]) for k, v in current.items()]
            return _moved(section, old, [(n, body) for n, body in old if n != _map_name(name)])
        raise NotFoundError(f"the policy has no section {section}")
    if section not in document:
        raise NotFoundError(f"the policy has no section {section}")
    order = [s for s in document if s != section]
    return [ObjectChange(section, HEAD, -1, deleted=True)] + [
        ObjectChange(s, HEAD, i, _head(s, document[s]))
        for i, s in enumerate(order)
        if list(document).index(s) != i
    ]


def _moved(section: str, old: list[tuple[str, Any]], new: list[tuple[str, Any]]) -> list[ObjectChange]:
    """The changes from `old` to `new` items (name, body) of one section: what left, and what is new or moved."""
    was = {name: (pos, body) for pos, (name, body) in enumerate(old)}
    kept = {name for name, _ in new}
    changes = [ObjectChange(section, name, -1, deleted=True) for name in was if name not in kept]
    for pos, (name, body) in enumerate(new):
        before = was.get(name)
        if (
            before is None
            or before[0] != pos
            or (before[1] is not body and canonical(before[1]) != canonical(body))
        ):
            changes.append(ObjectChange(section, name, pos, body))
    return changes


def replay(held: dict[Key, tuple[int, Any]], changes: Iterable[ObjectChange]) -> None:
    """Make `changes` in `held` (objects as `split` gives them: key -> (pos, body)), in place."""
    for ch in changes:
        if ch.deleted:
            held.pop(ch.key, None)
        else:
            held[ch.key] = (ch.pos, ch.body)


def apply_changes(document: dict[str, Any], changes: list[ObjectChange]) -> dict[str, Any]:
    """`document` with `changes` made: `patch` when it can, else through its objects."""
    patched = patch(document, changes)
    if patched is not None:
        return patched
    held = split(document)
    replay(held, changes)
    return assemble((key, pos, body) for key, (pos, body) in held.items())


def holds(document: dict[str, Any], ch: ObjectChange) -> bool:
    """Whether `document` already holds what `ch` (a write from `write_item`) writes, where it writes it."""
    current = document.get(ch.section)
    if ch.deleted or current is None:
        return False
    if ch.name == HEAD:
        return list(document).index(ch.section) == ch.pos and canonical(ch.body) == canonical(
            _head(ch.section, current)
        )
    if isinstance(current, list):
        return ch.pos < len(current) and canonical(current[ch.pos]) == canonical(ch.body)
    if isinstance(current, dict) and isinstance(ch.body, list) and len(ch.body) == 2:
        keys = list(current)
        key = ch.body[0]
        return (
            key in current and keys.index(key) == ch.pos and canonical(current[key]) == canonical(ch.body[1])
        )
    return False
