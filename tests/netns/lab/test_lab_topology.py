"""The lab on the real kernel: namespaces, bridge, routing + masquerade, DHCP, idempotence, cleanup.

Every test makes labs with fresh random names through the `make_lab` fixture, which destroys them whatever
happens; nothing outside ``hf-<random>-*`` namespaces is touched.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hyperfence.errors import ConflictError, InvalidInputError, NotFoundError
from hyperfence.lab.plan import LabPlan, plan_lab
from hyperfence.lab.topology import (
    NETNS_DIR,
    create_lab,
    destroy_lab,
    lab_status,
    popen_in_outside,
    popen_in_vm,
    read_lab,
    run_in_host,
    run_in_outside,
    run_in_vm,
    state_dir,
    state_file,
    stop_process,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

MakeLab = Callable[..., LabPlan]
UDHCPC = ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "2", "-T", "1", "-s", "/bin/true"]
PEER_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, peer = s.accept()
c.sendall(b"hello")
print(peer[0], flush=True)
c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(5).decode())
"""


def _fresh_name() -> str:
    return "t" + secrets.token_hex(3)


@pytest.fixture
def make_lab() -> Iterator[MakeLab]:
    """Create labs (`make(vms, only=..., name=...)`); every lab made is destroyed at the end, even on failure."""
    names: list[str] = []

    def make(vms: int = 3, *, only: int | None = None, name: str | None = None) -> LabPlan:
        plan = plan_lab(name or _fresh_name(), vms)
        if plan.name not in names:
            names.append(plan.name)  # before creating: a half-made lab is destroyed too
        create_lab(plan, only=only)
        return plan

    try:
        yield make
    finally:
        errors = []
        for name in names:
            try:
                destroy_lab(name)
            except Exception as exc:  # destroy every lab, then report
                errors.append(exc)
        assert not errors, errors
        for name in names:
            assert not [ns for ns in os.listdir(NETNS_DIR) if ns.startswith(f"hf-{name}-")]


def _ping(plan: LabPlan, vm: str, address: object) -> int:
    return run_in_vm(plan, vm, ["ping", "-c", "1", "-W", "1", str(address)], timeout=10).returncode


def _netns_inode(netns: str) -> int:
    return (NETNS_DIR / netns).stat().st_ino


def _ifindexes(plan: LabPlan) -> dict[str, int]:
    links = json.loads(run_in_host(plan, ["ip", "-j", "link", "show"]).stdout)
    return {link["ifname"]: link["ifindex"] for link in links}


def _readline(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline().decode().strip()


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in {"Z", "X"}


def _group_members(pgid: int) -> list[int]:
    """Every process (zombies included) in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def test_lab_comes_up_as_planned(make_lab: MakeLab) -> None:
    plan = make_lab(3)

    status = lab_status(plan.name)
    assert status.is_healthy, status
    assert (status.planned_vms, status.created_vms) == (3, 3)
    assert read_lab(plan.name) == plan
    assert json.loads(state_file(plan.name).read_text())["dnsmasq_pid"] == status.dnsmasq_pid
    for vm in plan.vms:
        (eth,) = json.loads(run_in_vm(plan, vm.name, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        assert eth["address"] == vm.mac
        assert eth["operstate"] == "UP"
        assert {(a["local"], a["prefixlen"]) for a in eth["addr_info"] if a["family"] == "inet"} == {
            (str(vm.ip), 22)
        }
        routes = json.loads(run_in_vm(plan, vm.name, ["ip", "-j", "route", "show", "default"]).stdout)
        assert [r["gateway"] for r in routes] == [str(plan.gateway)]
    links = json.loads(run_in_host(plan, ["ip", "-j", "link", "show", "master", "br0"]).stdout)
    assert sorted(link["ifname"] for link in links) == ["vp1", "vp2", "vp3"]
    forward = run_in_host(plan, ["sysctl", "-n", "net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"])
    assert forward.stdout.split() == [b"1", b"1"]


def test_vm_reaches_peer_and_gateway_over_the_bare_bridge(make_lab: MakeLab) -> None:
    plan = make_lab(3)

    assert _ping(plan, "vm1", plan.vm("vm2").ip) == 0
    assert _ping(plan, "vm1", plan.gateway) == 0
    assert _ping(plan, "vm3", plan.vm("vm1").ip) == 0
    assert _ping(plan, "vm1", "10.77.0.99") != 0  # nobody has it: a failure is visible


def test_vm_reaches_outside_through_the_host_masqueraded(make_lab: MakeLab) -> None:
    plan = make_lab(2)
    server = popen_in_outside(
        plan, [sys.executable, "-c", PEER_SERVER, str(plan.outside_ip), "8080"], stdout=subprocess.PIPE
    )
    try:
        assert _readline(server) == "ready"

        reply = run_in_vm(
            plan, "vm1", [sys.executable, "-c", CLIENT, str(plan.outside_ip), "8080"], timeout=10
        )

        assert reply.stdout.decode().strip() == "hello", reply.stderr
        assert _readline(server) == str(plan.uplink_ip)  # the outside saw the host's address, not 10.77.0.11
    finally:
        stop_process(server)
    assert _ping(plan, "vm2", plan.outside_ip) == 0
    # and the outside reaches a VM by its own address (routed, not NATed)
    assert run_in_outside(plan, ["ping", "-c", "1", "-W", "1", str(plan.vm("vm2").ip)]).returncode == 0


def test_vm_gets_its_static_address_by_dhcp(make_lab: MakeLab) -> None:
    plan = make_lab(2)

    done = run_in_vm(plan, "vm1", UDHCPC, timeout=15)

    assert done.returncode == 0, done.stderr
    assert f"lease of {plan.vm('vm1').ip} obtained".encode() in done.stderr
    leases = (state_dir(plan.name) / "leases").read_text()
    assert f" {plan.vm('vm1').mac} {plan.vm('vm1').ip} " in leases
    assert plan.vm("vm2").mac not in leases


def test_unplanned_mac_gets_no_lease_and_create_repairs_the_mac(make_lab: MakeLab) -> None:
    plan = make_lab(2)
    assert (
        run_in_vm(plan, "vm2", ["ip", "link", "set", "eth0", "address", "02:99:00:00:00:02"]).returncode == 0
    )

    refused = run_in_vm(plan, "vm2", UDHCPC, timeout=15)
    create_lab(plan)
    granted = run_in_vm(plan, "vm2", UDHCPC, timeout=15)

    assert refused.returncode != 0
    assert granted.returncode == 0, granted.stderr


def test_create_twice_is_a_no_op(make_lab: MakeLab) -> None:
    plan = make_lab(3)
    before = (lab_status(plan.name), _ifindexes(plan), [_netns_inode(ns) for ns in plan.netns_names])

    create_lab(plan)

    after = (lab_status(plan.name), _ifindexes(plan), [_netns_inode(ns) for ns in plan.netns_names])
    assert after == before
    assert after[0].is_healthy


def test_create_repairs_missing_pieces(make_lab: MakeLab) -> None:
    plan = make_lab(2)
    old_pid = lab_status(plan.name).dnsmasq_pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    run_in_host(plan, ["nft", "delete", "table", "ip", plan.nat_table])
    run_in_vm(plan, "vm2", ["ip", "addr", "flush", "dev", "eth0"])
    run_in_host(plan, ["ip", "link", "set", "vp1", "nomaster"])
    broken = lab_status(plan.name)
    assert not broken.dnsmasq_alive
    assert not broken.nat_present
    assert [vm.port_bridged for vm in broken.vms] == [False, True]
    assert _ping(plan, "vm1", plan.vm("vm2").ip) != 0

    create_lab(plan)

    repaired = lab_status(plan.name)
    assert repaired.is_healthy, repaired
    assert repaired.dnsmasq_pid != old_pid
    assert not _is_alive(old_pid)
    assert _ping(plan, "vm1", plan.vm("vm2").ip) == 0
    assert _ping(plan, "vm2", plan.outside_ip) == 0
    assert run_in_vm(plan, "vm2", UDHCPC, timeout=15).returncode == 0


def test_growing_adds_vms_and_keeps_the_old_ones(make_lab: MakeLab) -> None:
    small = make_lab(2)
    before = _ifindexes(small)

    big = make_lab(4, name=small.name)

    after = _ifindexes(big)
    assert {k: after[k] for k in ("br0", "vp1", "vp2")} == {k: before[k] for k in ("br0", "vp1", "vp2")}
    assert {"vp3", "vp4"} <= after.keys()
    assert lab_status(big.name).is_healthy
    assert _ping(big, "vm4", big.vm("vm1").ip) == 0
    assert run_in_vm(big, "vm4", UDHCPC, timeout=15).returncode == 0  # dnsmasq knows the new VMs


def test_a_big_plan_can_create_only_its_first_vms(make_lab: MakeLab) -> None:
    plan = make_lab(1000, only=2)

    status = lab_status(plan.name)
    assert (status.planned_vms, status.created_vms, len(status.vms)) == (1000, 2, 2)
    assert status.is_healthy
    assert not (NETNS_DIR / plan.vm("vm3").netns).exists()
    with pytest.raises(NotFoundError, match=r"hf-\w+-vm3 does not exist"):
        run_in_vm(plan, "vm3", ["true"])
    assert _ping(plan, "vm2", plan.vm("vm1").ip) == 0


def test_plan_with_fewer_vms_conflicts(make_lab: MakeLab) -> None:
    plan = make_lab(3)

    with pytest.raises(ConflictError, match="already declares 3 VMs"):
        create_lab(plan_lab(plan.name, 2))
    with pytest.raises(InvalidInputError, match="only"):
        create_lab(plan, only=4)
    assert lab_status(plan.name).created_vms == 3


def test_two_labs_coexist_and_are_destroyed_separately(make_lab: MakeLab) -> None:
    first = make_lab(2)
    second = make_lab(2)
    assert first.vm("vm1").ip == second.vm("vm1").ip

    assert _ping(first, "vm1", first.vm("vm2").ip) == 0
    assert _ping(second, "vm2", second.vm("vm1").ip) == 0
    destroy_lab(first.name)

    assert lab_status(second.name).is_healthy
    assert _ping(second, "vm1", second.vm("vm2").ip) == 0
    assert not lab_status(first.name).recorded


def test_destroy_removes_everything_it_made_and_nothing_else(make_lab: MakeLab) -> None:
    plan = make_lab(2)
    foreign = f"hf-{plan.name}-other"  # a look-alike that is not a lab namespace
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        server = popen_in_vm(plan, "vm1", ["sleep", "60"])
        pid = lab_status(plan.name).dnsmasq_pid
        assert pid is not None

        destroy_lab(plan.name)

        assert [ns for ns in os.listdir(NETNS_DIR) if ns.startswith(f"hf-{plan.name}-")] == [foreign]
        assert not state_file(plan.name).exists()
        assert not state_dir(plan.name).exists()
        assert not Path(f"/proc/{pid}").exists()  # stopped and reaped, not a zombie
        assert server.returncode is not None
        assert read_lab(plan.name) is None
        destroy_lab(plan.name)  # idempotent
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


def test_destroy_without_a_record_sweeps_the_lab_names(make_lab: MakeLab) -> None:
    plan = make_lab(2)
    pid = lab_status(plan.name).dnsmasq_pid
    assert pid is not None
    state_file(plan.name).unlink()

    destroy_lab(plan.name)

    assert not [ns for ns in os.listdir(NETNS_DIR) if ns.startswith(f"hf-{plan.name}-")]
    assert not _is_alive(pid)


def test_unreadable_record_is_a_conflict_and_destroy_still_cleans_up(make_lab: MakeLab) -> None:
    plan = make_lab(1)
    pid = lab_status(plan.name).dnsmasq_pid
    assert pid is not None
    state_file(plan.name).write_text("{not json")

    with pytest.raises(ConflictError, match="unreadable"):
        read_lab(plan.name)
    destroy_lab(plan.name)

    assert not [ns for ns in os.listdir(NETNS_DIR) if ns.startswith(f"hf-{plan.name}-")]
    assert not state_file(plan.name).exists()
    assert not _is_alive(pid)  # found by its PID file


def test_run_in_vm_kills_a_command_that_times_out(make_lab: MakeLab) -> None:
    plan = make_lab(1)

    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_in_vm(plan, "vm1", ["sh", "-c", "echo $$; sleep 30 & sleep 30"], timeout=0.5)
    done = run_in_vm(plan, "vm1", ["cat"], input=b"in the vm")

    session = int(info.value.output)
    assert _group_members(session) == []  # killed and reaped: no zombie left for PID 1
    assert done.stdout == b"in the vm"
    with pytest.raises(NotFoundError, match="vm2"):
        run_in_vm(plan, "vm2", ["true"])


def test_stop_process_stops_and_reaps_the_whole_session(make_lab: MakeLab) -> None:
    plan = make_lab(1)
    server = popen_in_vm(
        plan, "vm1", ["sh", "-c", "sleep 60 & sleep 60 & echo $$; wait"], stdout=subprocess.PIPE
    )
    session = int(_readline(server))
    assert len(_group_members(session)) == 3

    status = stop_process(server)

    assert status == -signal.SIGTERM
    assert _group_members(session) == []
    assert server.stdout is not None
    assert server.stdout.closed


def test_status_of_an_unknown_lab() -> None:
    status = lab_status(_fresh_name())

    assert not status.recorded
    assert not status.is_healthy
    assert status.vms == ()
