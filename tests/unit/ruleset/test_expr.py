"""The nft JSON statement builders (ruleset/expr.py): each in the numeric form `nft -j` lists it, so that what
the compiler builds compares equal to what readback parses."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from hyperfence.model.policy import AddressRange
from hyperfence.ruleset import expr
from hyperfence.ruleset.ir import canonical


def rng(first: str, last: str) -> AddressRange:
    return AddressRange(IPv4Address(first), IPv4Address(last))


@pytest.mark.parametrize(
    ("first", "last", "element"),
    [
        ("10.0.0.7", "10.0.0.7", "10.0.0.7"),  # one address: bare
        ("10.0.0.0", "10.0.0.255", {"prefix": {"addr": "10.0.0.0", "len": 24}}),  # a CIDR: a prefix
        ("0.0.0.0", "255.255.255.255", {"prefix": {"addr": "0.0.0.0", "len": 0}}),
        ("10.0.0.4", "10.0.0.5", {"prefix": {"addr": "10.0.0.4", "len": 31}}),
        ("10.0.0.1", "10.0.0.5", {"range": ["10.0.0.1", "10.0.0.5"]}),  # anything else: a range
        ("10.0.0.2", "10.0.0.5", {"range": ["10.0.0.2", "10.0.0.5"]}),  # 4 addresses, not aligned
    ],
)
def test_an_address_range_is_the_element_nft_lists(first: str, last: str, element: object) -> None:
    assert expr.range_element(rng(first, last)) == element


def test_a_port_is_bare_and_a_port_range_a_range() -> None:
    assert expr.port_value(443, 443) == 443
    assert expr.port_value(8000, 8080) == {"range": [8000, 8080]}


def test_a_one_element_anonymous_set_is_its_bare_value() -> None:
    assert expr.anon_set([22]) == 22
    assert expr.anon_set([22, 80]) == {"set": [22, 80]}


def test_matches_and_their_operators() -> None:
    assert expr.match(expr.meta("iifname"), "p-a") == {
        "match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "p-a"}
    }
    assert expr.match(expr.payload("ip", "saddr"), "10.0.0.1", op="!=")["match"]["op"] == "!="
    assert expr.mark_is_set(0x10) == {
        "match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x10]}, "right": 0x10}
    }
    assert expr.ct_unconfirmed() == {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": 8}}


def test_the_vlan_match_reads_the_raw_ethertype_bytes_for_both_tag_protocols() -> None:
    """Raw link-layer bytes 12-13, not nft's `ether type` symbol (byte-swapped by nft 1.0.6 in numeric
    mode): 0x8100 (802.1Q) and 0x88a8 (802.1ad)."""
    assert expr.vlan_tagged() == {
        "match": {
            "op": "==",
            "left": {"payload": {"base": "ll", "offset": 96, "len": 16}},
            "right": {"set": [0x8100, 0x88A8]},
        }
    }


def test_verdicts_and_dispatch() -> None:
    assert expr.jump("vm_a_in") == {"jump": {"target": "vm_a_in"}}
    assert expr.goto("vm_a_in") == {"goto": {"target": "vm_a_in"}}
    assert expr.vmap("oifname", "in_ports") == {
        "vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@in_ports"}
    }
    assert expr.payload_vmap("ip", "daddr", "m") == {
        "vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}}, "data": "@m"}
    }
    assert [expr.ACCEPT, expr.DROP, expr.RETURN] == [{"accept": None}, {"drop": None}, {"return": None}]


def test_limits_logs_and_the_connection_count() -> None:
    assert expr.limit(10, 20) == {"limit": {"rate": 10, "burst": 20, "per": "second"}}
    assert expr.limit_over(10, 20) == {"limit": {"rate": 10, "burst": 20, "per": "second", "inv": True}}
    assert expr.log("hf:", 7) == {"log": {"prefix": "hf:", "group": 7}}
    assert expr.ct_count_over(100) == {"ct count": {"val": 100, "inv": True}}


def test_a_counter_s_numbers_do_not_make_a_rule_differ() -> None:
    listed = [{"counter": {"packets": 12, "bytes": 3400}}, expr.ACCEPT]
    assert canonical([expr.COUNTER, expr.ACCEPT]) == canonical(listed)
