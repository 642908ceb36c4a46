"""Builders for nft JSON statements, in the numeric form `nft -j` lists them (see ir.py)."""

from __future__ import annotations

from hyperfence.model.policy import AddressRange
from hyperfence.policy.syntax import format_range
from hyperfence.ruleset.ir import JSON

COUNTER: JSON = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT: JSON = {"accept": None}
DROP: JSON = {"drop": None}
RETURN: JSON = {"return": None}


# The ethertype field as a raw link-layer payload (bytes 12-13 of the Ethernet header). Written raw because
# nft 1.0.6 sends and lists its `ether type` symbols byte-swapped in numeric mode (0x8100 as 129); the raw
# form puts the right bytes in the kernel, and nft lists it back as `ether type` with the right numbers,
# which readback maps back to this form (`readback.LISTED_ETHER_TYPE`). In the bridge family the kernel
# rebuilds a VLAN tag that the NIC or the stack has already moved out of the frame, so this reads 0x8100
# or 0x88a8 for a tagged frame, whatever `meta protocol` says.
ETHER_TYPE: JSON = {"payload": {"base": "ll", "offset": 96, "len": 16}}
VLAN_TPIDS = (0x8100, 0x88A8)  # 802.1Q, 802.1ad (QinQ's outer tag)


def vlan_tagged() -> JSON:
    """Matches a frame that carries an 802.1Q or 802.1ad tag."""
    return match(ETHER_TYPE, {"set": list(VLAN_TPIDS)})


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
