"""policy/local.py: only the VMs whose port is on this host's bridges get chains; their peers elsewhere stay
addresses in the sets."""

from __future__ import annotations

from hyperfence.policy.local import with_local
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset.compile import compile_ruleset
from tests.unit.policy.test_parse import doc

RULE = {"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/80"]}


def test_only_vms_on_this_hosts_bridges_get_chains_and_peers_stay_in_sets() -> None:
    resolved = resolve_policy(parse_policy(doc(rules=[RULE])))
    assert with_local(resolved, None) is resolved
    assert with_local(resolved, [("br0", "vp1"), ("br0", "vp2")]) is resolved
    assert with_local(resolved, [("br0", "vp1"), ("br1", "vp2")]) is resolved  # a port counts on any bridge
    here = with_local(resolved, [("br0", "vp1"), ("br0", "nic0"), ("br0", "vp9")])
    assert [vp.vm.name for vp in here.vms] == ["vm1"] and here.vms[0] is resolved.vms[0]
    rs = compile_ruleset(here)
    chains = {c.name for c in rs.chains}
    everything = {c.name for c in compile_ruleset(resolved).chains}
    assert chains < everything and not any(
        "vm2" in r.comment for r in rs.rules if r.comment.startswith("sys:")
    )
    # vm1's egress rule towards vm2 is still there, with vm2's address in its set
    assert any(r.comment == "rule:web#1" for r in rs.rules)
    assert any("10.77.0.12" in e for s in rs.sets for e in s.elements)


def test_the_vms_found_by_port_are_those_a_scan_finds_in_policy_order_for_any_policy() -> None:
    """The port map is the last policy's: a policy with other VMs (another order) gets its own."""
    vms = [
        {"name": f"vm{i}", "port": f"vp{i}", "mac": f"02:77:00:00:01:{i:02x}", "ips": [f"10.77.1.{i}"]}
        for i in range(1, 9)
    ]
    for order in (vms, vms[::-1], vms[2:5]):
        resolved = resolve_policy(parse_policy(doc(vms=order, rules=[])))
        for ports in ([], ["vp3"], ["vp7", "vp2", "vp5"], ["vp4", "nic0", "vp9"]):
            here = with_local(resolved, [("br0", p) for p in ports])
            scanned = [vp for vp in resolved.vms if vp.vm.port in ports]
            assert list(here.vms) == scanned and all(a is b for a, b in zip(here.vms, scanned, strict=True))
            assert here.policy.vms == tuple(vp.vm for vp in scanned)
