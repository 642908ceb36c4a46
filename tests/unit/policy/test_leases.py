"""Which DHCP messages teach or take back a VM's address, and the policy with learned addresses."""

from __future__ import annotations

from ipaddress import IPv4Address

from hyperfence.codec.bootp import parse_dhcp
from hyperfence.model.lease import Lease, LeaseSource, NetworkLease
from hyperfence.policy.leases import (
    GRACE_SECONDS,
    MAX_LEASE_SECONDS,
    MAX_LEASES_PER_VM,
    Ignored,
    Learned,
    Released,
    apply_leases,
    expire,
    from_libvirt,
    read_message,
    with_lease,
    without,
)
from hyperfence.policy.parse import parse_policy
from tests.unit.adapters.dhcp_frames import VM_MAC, ack, bootp, dhcp_options, ip_udp
from tests.unit.policy.test_parse import BASE

LEARNER = {"name": "vm3", "port": "vp3", "mac": VM_MAC}
POLICY = parse_policy(
    {
        **BASE,
        "vms": [*BASE["vms"], LEARNER, {**LEARNER, "name": "vm4", "port": "vp4", "mac": "02:77:00:00:00:0e"}],
    }
)
VM3 = POLICY.vm_by_name("vm3")
assert VM3 is not None
IP = IPv4Address("10.77.0.13")


def lease(ip: str = "10.77.0.13", *, vm: str = "vm3", mac: str = VM_MAC, learned: float = 100.0) -> Lease:
    return Lease(vm, mac, IPv4Address(ip), learned + 3600, learned, IPv4Address("10.77.0.1"))


def test_an_ack_for_the_vms_mac_teaches_its_address_for_the_lease_time() -> None:
    got = read_message(VM3, parse_dhcp(ack()), inbound=True, now=100.0)
    assert got == Learned(Lease("vm3", VM_MAC, IP, 3700.0, 100.0, IPv4Address("10.77.0.1")))


def test_an_ack_for_another_mac_an_offer_or_no_lease_time_teaches_nothing() -> None:
    for frame in (
        ack(chaddr="02:77:00:00:00:0c"),
        ack(options=dhcp_options(2)),  # an OFFER
        ack(options=dhcp_options(5, lease=None)),
        ack(yiaddr="0.0.0.0"),
        ip_udp(bootp(op=1)),  # a client's message sent to the VM
    ):
        assert isinstance(read_message(VM3, parse_dhcp(frame), inbound=True, now=0), Ignored)


def test_an_infinite_lease_lasts_at_most_the_cap() -> None:
    got = read_message(VM3, parse_dhcp(ack(options=dhcp_options(5, lease=0xFFFFFFFF))), inbound=True, now=0)
    assert isinstance(got, Learned) and got.lease.expires == MAX_LEASE_SECONDS


def test_a_nak_to_the_vm_and_a_release_from_it_give_addresses_back() -> None:
    nak = read_message(VM3, parse_dhcp(ack(options=dhcp_options(6, lease=None))), inbound=True, now=0)
    assert nak == Released("vm3", None, "DHCPNAK from 10.77.0.1")
    frame = ip_udp(bootp(op=1, ciaddr=str(IP), options=dhcp_options(7, lease=None)), sport=68, dport=67)
    assert read_message(VM3, parse_dhcp(frame), inbound=False, now=0) == Released(
        "vm3", IP, "DHCPRELEASE from the VM"
    )
    # a release for another MAC releases nothing; an ACK the VM sends teaches nothing
    other = ip_udp(bootp(op=1, chaddr="02:77:00:00:00:0c", ciaddr=str(IP), options=dhcp_options(7)), sport=68)
    assert isinstance(read_message(VM3, parse_dhcp(other), inbound=False, now=0), Ignored)
    assert isinstance(read_message(VM3, parse_dhcp(ack()), inbound=False, now=0), Ignored)


def test_learned_addresses_become_the_vms_addresses() -> None:
    policy, ignored = apply_leases(POLICY, (lease(),))
    assert ignored == ()
    vm3 = policy.vm_by_name("vm3")
    assert vm3 is not None and vm3.ips == (IP,) and vm3.learns
    assert policy.vm_by_name("vm1") is POLICY.vm_by_name("vm1")  # the others are untouched


def test_declared_addresses_win_and_bad_addresses_are_left_out() -> None:
    cases = {
        "10.77.0.11": "declared by VM vm1",
        "10.77.0.1": "the gateway",
        "10.77.3.255": "broadcast address",
        "10.9.0.5": "is not in network",
    }
    for ip, why in cases.items():
        policy, ignored = apply_leases(POLICY, (lease(ip),))
        assert policy.vm_by_name("vm3").ips == ()  # type: ignore[union-attr]
        assert len(ignored) == 1 and why in ignored[0][1], (ip, ignored)
    # a lease for the VM's old MAC, for a VM that declares its addresses, for no VM
    for bad in (lease(mac="02:00:00:00:00:99"), lease(vm="vm1", mac="02:77:00:00:00:0b"), lease(vm="gone")):
        assert apply_leases(POLICY, (bad,))[0] == POLICY


def test_one_address_leased_to_two_learning_vms_goes_to_the_later_lease() -> None:
    first = lease(learned=100)
    later = lease(vm="vm4", mac="02:77:00:00:00:0e", learned=200)
    policy, ignored = apply_leases(POLICY, (later, first))
    assert policy.vm_by_name("vm4").ips == (IP,) and policy.vm_by_name("vm3").ips == ()  # type: ignore[union-attr]
    assert ignored == ((first, "10.77.0.13 was leased to VM vm4 later"),)


def test_leases_are_replaced_bounded_released_and_expired() -> None:
    held = with_lease((), lease(learned=100))
    held = with_lease(held, lease(learned=200))  # a renewal replaces
    assert held == (lease(learned=200),)
    for k in range(10):
        held = with_lease(held, lease(f"10.77.0.{20 + k}", learned=300 + k))
    assert len(held) == MAX_LEASES_PER_VM and lease("10.77.0.29", learned=309) in held
    assert without(held, "vm3", IPv4Address("10.77.0.29")) == tuple(
        le for le in held if le.ip != IPv4Address("10.77.0.29")
    )
    assert without(held, "vm3") == ()
    one = (lease(learned=0),)  # ends at 3600
    assert expire(one, 3600 + GRACE_SECONDS) == (one, ())
    assert expire(one, 3600 + GRACE_SECONDS + 0.1) == ((), one)


NOW = 10_000.0


def listed(
    ip: str = "10.77.0.13", *, mac: str = VM_MAC, end: float | None = NOW + 3600, bridge: str = "br0"
) -> NetworkLease:
    return NetworkLease("default", bridge, mac, IPv4Address(ip), end)


def test_libvirt_lists_teach_a_learning_vm_its_address_and_take_it_back_when_no_longer_listed() -> None:
    first = from_libvirt(
        POLICY, (), (listed(), listed("10.77.0.12", mac="02:77:00:00:00:0c")), complete=True, now=NOW
    )
    # vm2 declares its address: libvirt's lease for its MAC teaches nothing
    (le,) = first.leases
    assert (le.vm, le.ip, le.expires, le.source, le.server) == (
        "vm3",
        IP,
        NOW + 3600,
        LeaseSource.LIBVIRT,
        None,
    )
    assert first.learned == ((le, False),) and first.released == () and first.ignored == ()
    # read again: nothing new, nothing changes (the same tuple, so the engine does not converge)
    again = from_libvirt(POLICY, first.leases, (listed(),), complete=True, now=NOW + 30)
    assert again.leases == first.leases and again.learned == ()
    # renewed: a later end, learned now
    renewed = from_libvirt(POLICY, first.leases, (listed(end=NOW + 7200),), complete=True, now=NOW + 60)
    assert renewed.leases[0].expires == NOW + 7200 and renewed.learned[0][1] is True
    # a read cut short by a bound releases nothing; a complete one that lacks it releases it
    assert from_libvirt(POLICY, renewed.leases, (), complete=False, now=NOW + 90).leases == renewed.leases
    gone = from_libvirt(POLICY, renewed.leases, (), complete=True, now=NOW + 90)
    assert gone.leases == () and gone.released == ((renewed.leases[0], "libvirt no longer lists it"),)


def test_a_snooped_lease_wins_over_libvirts_and_is_never_released_by_its_list() -> None:
    snooped = lease(learned=NOW)  # from the VM's own DHCPACK
    both = from_libvirt(POLICY, (snooped,), (listed(end=NOW + 9999),), complete=True, now=NOW)
    assert both.leases == (snooped,) and both.learned == ()
    assert from_libvirt(POLICY, (snooped,), (), complete=True, now=NOW).leases == (snooped,)


def test_libvirt_leases_pass_the_same_checks_as_the_learners() -> None:
    # on another libvirt network than the VM's, in another subnet, the gateway: ignored with the reason
    other = from_libvirt(POLICY, (), (listed(bridge="virbr9"),), complete=True, now=NOW)
    assert other.leases == () and "bridge virbr9" in other.ignored[0][1]
    outside = from_libvirt(POLICY, (), (listed("192.168.1.5"),), complete=True, now=NOW)
    assert outside.leases == () and "not in network" in outside.ignored[0][1]
    declared = from_libvirt(POLICY, (), (listed("10.77.0.11"),), complete=True, now=NOW)
    assert declared.leases == () and "declared by VM vm1" in declared.ignored[0][1]
    # an unknown MAC, and a lease that ended: nothing
    assert from_libvirt(POLICY, (), (listed(mac="02:00:00:00:00:99"),), complete=True, now=NOW).leases == ()
    ended = listed(end=NOW - GRACE_SECONDS - 1)
    assert from_libvirt(POLICY, (), (ended,), complete=True, now=NOW).leases == ()
    # an endless (or too long) lease counts as MAX_LEASE_SECONDS from when it was first read, and keeps that end
    endless = from_libvirt(POLICY, (), (listed(end=None),), complete=True, now=NOW)
    assert endless.leases[0].expires == NOW + MAX_LEASE_SECONDS
    assert (
        from_libvirt(POLICY, endless.leases, (listed(end=None),), complete=True, now=NOW + 50).leases
        == endless.leases
    )
    # a VM takes at most MAX_LEASES_PER_VM, those that end last
    many = tuple(listed(f"10.77.1.{i}", end=NOW + 100 + i) for i in range(1, 10))
    kept = from_libvirt(POLICY, (), many, complete=True, now=NOW).leases
    assert [str(le.ip) for le in kept] == [f"10.77.1.{i}" for i in range(9 - MAX_LEASES_PER_VM + 1, 10)]


def test_two_learning_vms_listed_with_one_address_are_settled_as_the_learners_are() -> None:
    vm4 = "02:77:00:00:00:0e"
    found = (listed(), listed(mac=vm4))
    sync = from_libvirt(POLICY, (), found, complete=True, now=NOW)
    assert {le.vm for le in sync.leases} == {"vm3", "vm4"}
    policy, ignored = apply_leases(POLICY, sync.leases)  # one of them gets it, the other is left out
    holders = [vm.name for vm in policy.vms if IP in vm.ips]
    assert len(holders) == 1 and len(ignored) == 1


def test_a_vm_that_leaves_or_declares_its_addresses_loses_its_libvirt_lease() -> None:
    held = from_libvirt(POLICY, (), (listed(),), complete=True, now=NOW).leases
    without_vm3 = parse_policy({**BASE, "vms": [*BASE["vms"]]})
    gone = from_libvirt(without_vm3, held, (listed(),), complete=False, now=NOW)
    assert gone.leases == () and gone.released[0][1] == "the VM was removed"
    declares = parse_policy({**BASE, "vms": [*BASE["vms"], {**LEARNER, "ips": ["10.77.0.40"]}]})
    assert from_libvirt(declares, held, (listed(),), complete=True, now=NOW).released[0][1] == (
        "the VM declares its addresses"
    )
