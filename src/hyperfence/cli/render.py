"""Text for people: the IR in nft syntax. Pure. (The counters per rule are `services/ruleset.py`'s
`stats_rows`, data that every front end shows; kept importable from here.)"""

from __future__ import annotations

import json

from hyperfence.ruleset.ir import JSON, Ruleset
from hyperfence.services.ruleset import stats_rows

__all__ = ["ruleset_text", "statement_text", "stats_rows"]


def _value(v: JSON) -> str:
    if isinstance(v, dict):
        if "set" in v:
            return "{ " + ", ".join(_value(x) for x in v["set"]) + " }"
        if "range" in v:
            return f"{_value(v['range'][0])}-{_value(v['range'][1])}"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "payload" in v:
            p = v["payload"]
            if "base" in p:  # a raw payload (the ethertype as bytes 12-13 of the frame), as nft writes it
                return f"@{p['base']},{p['offset']},{p['len']}"
            return f"{p['protocol']} {p['field']}"
        if "meta" in v:
            return f"meta {v['meta']['key']}"
        if "ct" in v:
            return f"ct {v['ct']['key']}"
        for op in ("&", "|"):
            if op in v:
                return f"{_value(v[op][0])} {op} {_value(v[op][1])}"
        if "concat" in v:
            return " . ".join(_value(x) for x in v["concat"])
        if "jump" in v:
            return f"jump {v['jump']['target']}"
        if len(v) == 1 and next(iter(v.values())) is None:
            return str(next(iter(v)))
        return json.dumps(v, sort_keys=True)  # a form this renderer does not know: shown, never a crash
    if isinstance(v, list):
        return "{ " + ", ".join(_value(x) for x in v) + " }"
    if isinstance(v, int) and v > 0xFFFF:
        return hex(v)
    return str(v)


def statement_text(stmt: JSON) -> str:
    ((key, body),) = stmt.items()
    kind = str(key)
    if kind == "match":
        op = "" if body["op"] in ("==", "in") else f"{body['op']} "
        return f"{_value(body['left'])} {op}{_value(body['right'])}"
    if kind == "counter":
        return f"counter packets {body.get('packets', 0)} bytes {body.get('bytes', 0)}" if body else "counter"
    if kind == "vmap":
        return f"{_value(body['key'])} vmap {body['data']}"
    if kind == "limit":
        return f"limit rate {body['rate']}/{body.get('per', 'second')} burst {body.get('burst', 0)} packets"
    if kind == "log":
        return f'log prefix "{body.get("prefix", "")}" group {body.get("group", 0)}'
    if kind == "ct count":
        return f"ct count {'over ' if body.get('inv') else ''}{body['val']}"
    if kind == "mangle":
        return f"{_value(body['key'])} set {_value(body['value'])}"
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if body is None:
        return kind
    return f"{kind} {json.dumps(body)}"


def ruleset_text(rs: Ruleset) -> str:
    lines: list[str] = []
    rules = rs.chain_rules()
    for t in rs.tables:
        lines.append(f"table {t.family} {t.name} {{")
        for s in rs.sets:
            if s.table != t:
                continue
            typ = s.key_type + (f" : {s.map_type}" if s.map_type else "")
            flags = f" flags {','.join(s.flags)};" if s.flags else ""
            elems = sorted(
                _value(json.loads(e)) if not s.map_type else " : ".join(_value(x) for x in json.loads(e))
                for e in s.elements
            )
            lines.append(f"  {s.kind} {s.name} {{ type {typ};{flags} elements = {{ {', '.join(elems)} }} }}")
        for c in rs.chains:
            if c.table != t:
                continue
            lines.append(f"  chain {c.name} {{")
            if c.is_base:
                lines.append(f"    type {c.type} hook {c.hook} priority {c.priority}; policy {c.policy};")
            for r in rules.get((t, c.name), []):
                text = " ".join(statement_text(s) for s in r.statements())
                lines.append(f'    {text} comment "{r.comment}"')
            lines.append("  }")
        lines.append("}")
    return "\n".join(lines)
