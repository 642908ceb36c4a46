"""The lab plan: deterministic names, MACs and addresses; bad input rejected with located problems."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import PurePath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfence.errors import InvalidInputError, NotFoundError
from hyperfence.lab.plan import (
    MAX_VMS,
    LabPlan,
    dnsmasq_command,
    is_lab_netns,
    nat_ruleset,
    plan_from_dict,
    plan_lab,
    plan_to_dict,
    validate_lab_name,
)

lab_names = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)


def test_default_plan_names_and_addresses() -> None:
    plan = plan_lab()

    assert plan.name == "lab"
    assert (plan.host_netns, plan.outside_netns) == ("hf-lab-host", "hf-lab-out")
    assert (plan.bridge, plan.bridge_mac) == ("br0", "02:77:00:00:00:01")
    assert plan.subnet == IPv4Network("10.77.0.0/22")
    assert plan.gateway == IPv4Address("10.77.0.1")
    assert (plan.uplink, plan.uplink_ip, plan.uplink_mac) == (
        "up0",
        IPv4Address("10.78.0.1"),
        "02:78:00:00:00:01",
    )
    assert (plan.outside_ifname, plan.outside_ip) == ("eth0", IPv4Address("10.78.0.2"))
    assert plan.outside_subnet == IPv4Network("10.78.0.0/24")
    assert plan.nat_table == "hflab_nat"
    assert [(vm.index, vm.name, vm.netns, vm.port, vm.ifname, vm.mac, str(vm.ip)) for vm in plan.vms] == [
        (1, "vm1", "hf-lab-vm1", "vp1", "eth0", "02:77:00:00:00:0b", "10.77.0.11"),
        (2, "vm2", "hf-lab-vm2", "vp2", "eth0", "02:77:00:00:00:0c", "10.77.0.12"),
        (3, "vm3", "hf-lab-vm3", "vp3", "eth0", "02:77:00:00:00:0d", "10.77.0.13"),
    ]
    assert plan.netns_names == ("hf-lab-host", "hf-lab-out", "hf-lab-vm1", "hf-lab-vm2", "hf-lab-vm3")


def test_addresses_cross_octets_up_to_1000_vms() -> None:
    plan = plan_lab("big", MAX_VMS)

    assert len(plan.vms) == 1000
    assert (str(plan.vms[244].ip), plan.vms[244].mac) == ("10.77.0.255", "02:77:00:00:00:ff")
    assert (str(plan.vms[245].ip), plan.vms[245].mac) == ("10.77.1.0", "02:77:00:00:01:00")
    last = plan.vms[-1]
    assert (last.name, last.port, str(last.ip), last.mac) == (
        "vm1000",
        "vp1000",
        "10.77.3.242",
        "02:77:00:00:03:f2",
    )


def test_same_inputs_give_equal_plans_and_names_separate_labs() -> None:
    assert plan_lab("a1", 5) == plan_lab("a1", 5)
    assert plan_lab("a1", 5).vms[:3] == plan_lab("a1", 3).vms  # growing keeps the existing VMs
    assert plan_lab("a1").host_netns != plan_lab("a2").host_netns
    assert plan_lab("a1").vms[0].ip == plan_lab("a2").vms[0].ip  # labs are separate namespaces


@given(name=lab_names, vms=st.integers(min_value=1, max_value=MAX_VMS))
def test_every_plan_has_unique_addresses_inside_the_subnet(name: str, vms: int) -> None:
    plan = plan_lab(name, vms)

    ips = [vm.ip for vm in plan.vms]
    macs = [plan.bridge_mac, *(vm.mac for vm in plan.vms)]
    assert len(set(ips)) == vms
    assert len(set(macs)) == vms + 1
    assert all(ip in plan.subnet and ip not in {plan.gateway, plan.subnet.broadcast_address} for ip in ips)
    assert all(int(mac[:2], 16) & 0b11 == 0b10 for mac in macs)  # locally administered unicast
    assert all(len(vm.port) <= 15 and len(vm.netns) <= 255 for vm in plan.vms)
    assert all(is_lab_netns(name, ns) for ns in plan.netns_names)


@pytest.mark.parametrize("name", ["", "Lab", "lab-1", "toolong99", "lab_1", "läb", " lab"])
def test_bad_lab_name_is_rejected_with_its_value(name: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_lab(name, 3)

    assert [p.path for p in info.value.problems] == ["name"]
    assert repr(name) in str(info.value)
    assert "[a-z0-9]" in str(info.value)


@pytest.mark.parametrize(
    ("vms", "expected"),
    [
        (0, "vms: 0 is out of range (expected 1..1000)"),
        (1001, "vms: 1001 is out of range (expected 1..1000)"),
        (-3, "vms: -3 is out of range (expected 1..1000)"),
        (True, "vms: True is not an integer (expected 1..1000)"),
        ("3", "vms: '3' is not an integer (expected 1..1000)"),
    ],
)
def test_bad_vm_count_is_rejected_with_range(vms: object, expected: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_lab("lab", vms)  # type: ignore[arg-type]

    assert [str(p) for p in info.value.problems] == [expected]


def test_every_bad_input_is_reported_at_once() -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_lab("BAD", 0)

    assert [p.path for p in info.value.problems] == ["name", "vms"]


def test_validate_lab_name() -> None:
    assert validate_lab_name("t0a1b2") == "t0a1b2"
    with pytest.raises(InvalidInputError, match=r"'\.\./x'"):
        validate_lab_name("../x")
    with pytest.raises(InvalidInputError, match="None"):
        validate_lab_name(None)


def test_vm_lookup_by_name() -> None:
    plan = plan_lab("lab", 3)

    assert plan.vm("vm2") is plan.vms[1]
    for missing in ("vm4", "vm0", "vm01", "VM1", "eth0"):
        with pytest.raises(NotFoundError, match=r"expected vm1\.\.vm3"):
            plan.vm(missing)


@pytest.mark.parametrize(
    ("netns", "expected"),
    [
        ("hf-lab-host", True),
        ("hf-lab-out", True),
        ("hf-lab-vm1", True),
        ("hf-lab-vm1000", True),
        ("hf-lab-vm0", False),
        ("hf-lab-vm01", False),
        ("hf-lab-vm1001", False),
        ("hf-lab-h", False),
        ("hf-lab-hostx", False),
        ("hf-lab-other", False),
        ("hf-lab2-host", False),
        ("hf-la-host", False),
        ("xhf-lab-host", False),
    ],
)
def test_is_lab_netns_matches_exact_names_only(netns: str, expected: bool) -> None:
    assert is_lab_netns("lab", netns) is expected


def test_record_round_trips_through_json() -> None:
    plan = plan_lab("r1", 4)

    data = json.loads(json.dumps(plan_to_dict(plan)))

    assert plan_from_dict(data) == plan
    assert data["vms"][0] == {
        "index": 1,
        "name": "vm1",
        "netns": "hf-r1-vm1",
        "port": "vp1",
        "ifname": "eth0",
        "mac": "02:77:00:00:00:0b",
        "ip": "10.77.0.11",
    }


def test_record_that_disagrees_with_the_plan_is_rejected_and_located() -> None:
    data = plan_to_dict(plan_lab("r1", 2))
    data["gateway"] = "10.77.0.254"
    data["extra"] = 1

    with pytest.raises(InvalidInputError) as info:
        plan_from_dict(data)

    assert [p.path for p in info.value.problems] == ["gateway", "extra"]
    assert "'10.77.0.254'" in str(info.value)


@pytest.mark.parametrize("vms", [None, [], "vm1"])
def test_record_without_vms_is_rejected(vms: object) -> None:
    data = plan_to_dict(plan_lab("r1", 2))
    data["vms"] = vms

    with pytest.raises(InvalidInputError, match="vms: "):
        plan_from_dict(data)


def test_dnsmasq_serves_only_the_planned_macs_in_the_foreground() -> None:
    plan = plan_lab("d1", 3)

    argv = dnsmasq_command(plan, state_dir=PurePath("/run/x/d1"))

    assert argv[:2] == ("dnsmasq", "-k")
    assert "--interface=br0" in argv
    assert "--port=0" in argv
    assert "--dhcp-range=10.77.0.0,static,255.255.252.0,1h" in argv
    assert [a for a in argv if a.startswith("--dhcp-host=")] == [
        "--dhcp-host=02:77:00:00:00:0b,10.77.0.11",
        "--dhcp-host=02:77:00:00:00:0c,10.77.0.12",
        "--dhcp-host=02:77:00:00:00:0d,10.77.0.13",
    ]
    assert "--dhcp-leasefile=/run/x/d1/leases" in argv
    assert "--pid-file=/run/x/d1/dnsmasq.pid" in argv


def test_dnsmasq_declares_every_planned_vm_of_a_big_plan() -> None:
    argv = dnsmasq_command(plan_lab("d1", MAX_VMS), state_dir=PurePath("/s"))

    assert sum(a.startswith("--dhcp-host=") for a in argv) == MAX_VMS
    assert "--dhcp-host=02:77:00:00:03:f2,10.77.3.242" in argv


def test_nat_ruleset_replaces_its_own_table_and_masquerades_the_vm_subnet() -> None:
    text = nat_ruleset(plan_lab("n1", 2))

    lines = text.splitlines()
    assert lines[:2] == ["add table ip hflab_nat", "delete table ip hflab_nat"]
    assert "type nat hook postrouting priority srcnat; policy accept;" in text
    assert 'ip saddr 10.77.0.0/22 oifname "up0" masquerade' in text
    assert "flush ruleset" not in text


def test_plan_is_frozen() -> None:
    plan: LabPlan = plan_lab()

    with pytest.raises(AttributeError):
        plan.name = "other"  # type: ignore[misc]
