from __future__ import annotations

from hyperfence.ruleset import expr as x
from hyperfence.ruleset.ir import canonical
from hyperfence.ruleset.readback import parse_listing


def _listed_rule(expr: list[object]) -> dict[str, object]:
    return {
        "rule": {
            "family": "bridge",
            "table": "hyperfence",
            "chain": "guard",
            "handle": 4,
            "comment": "sys:vlan-tagged",
            "expr": expr,
        }
    }


def test_the_raw_ethertype_the_compiler_writes_reads_back_as_written() -> None:
    """nft lists the raw link-layer payload as `ether type` (with the right numbers): readback maps it back,
    so the rule compares equal to the compiled one."""
    verdict = x.vmap("iifname", "guard_ports")
    listed = {"payload": {"protocol": "ether", "field": "type"}}
    actual = parse_listing([_listed_rule([x.match(listed, {"set": [33024, 34984]}), verdict])])
    (rule,) = actual.ruleset.rules
    assert rule.expr == canonical([x.vlan_tagged(), verdict])
    other = parse_listing([_listed_rule([x.match(x.payload("ip", "version"), 4), verdict])])
    assert other.ruleset.rules[0].expr == canonical([x.match(x.payload("ip", "version"), 4), verdict])
