"""Builders for nft JSON statements, in the numeric form `nft -j` lists them (see ir.py)."""

from __future__ import annotations

from hyperfence.model.policy import AddressRange
from hyperfence.policy.syntax import format_range
from hyperfence.ruleset.ir import JSON

COUNTER: JSON = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT: JSON = {"accept": None}
DROP: JSON = {"drop": None}
RETURN: JSON = {"return": None}


def payload(protocol: str, field: str) -> JSON:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> JSON:
    return {"meta": {"key": key}}


def match(left: JSON, right: JSON, op: str = "==") -> JSON:
    return {"match": {"op": op, "left": left, "right": right}}


def anon_set(values: list[JSON]) -> JSON:
    """A literal; nft lists a one-element anonymous set as the bare value."""
    return values[0] if len(values) == 1 else {"set": values}


def mark_is_set(mark: int) -> JSON:
    return match({"&": [meta("mark"), mark]}, mark)


def goto(chain: str) -> JSON:
    return {"goto": {"target": chain}}


def vmap(key: str, map_name: str) -> JSON:
    return {"vmap": {"key": meta(key), "data": f"@{map_name}"}}


def payload_vmap(protocol: str, field: str, map_name: str) -> JSON:
    return {"vmap": {"key": payload(protocol, field), "data": f"@{map_name}"}}


def ct_unconfirmed() -> JSON:
    """`ct status ! confirmed`: the first packet of a connection, before conntrack confirms (inserts) it at
    the end of the hooks; false for every later packet, and for packets conntrack does not track."""
    return match({"ct": {"key": "status"}}, 8, op="!")


def ct_count_over(connections: int) -> JSON:
    """Matches while the rule's own list of connections holds more than `connections` (this one included):
    nft_connlimit adds the packet's connection to the list, then compares."""
    return {"ct count": {"val": connections, "inv": True}}


def jump(chain: str) -> JSON:
    return {"jump": {"target": chain}}


def limit(rate: int, burst: int) -> JSON:
    return {"limit": {"rate": rate, "burst": burst, "per": "second"}}


def limit_over(rate: int, burst: int) -> JSON:
    """Matches the packets beyond `rate` a second (bursts up to `burst`)."""
    return {"limit": {"rate": rate, "burst": burst, "per": "second", "inv": True}}


def log(prefix: str, group: int) -> JSON:
    return {"log": {"prefix": prefix, "group": group}}


def range_element(r: AddressRange) -> JSON:
    """One element of an `ipv4_addr` interval set, as nft lists it."""
    text = format_range(r)
    if "/" in text:
        addr, _, length = text.partition("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    if "-" in text:
        return {"range": [str(r.first), str(r.last)]}
    return text


def port_value(first: int, last: int) -> JSON:
    return first if first == last else {"range": [first, last]}
