"""hyperfence on a stock Debian 12 kernel: the host-root guest (`lab/hostroot.py`, docs/hostroot.md) boots
`linux-image-6.1.0-N-amd64` under QEMU TCG with its modules and this host's userland, and runs hyperfence's
own kernel tests there, with their lab (namespaces, bridge, dnsmasq) nested in the guest.

What differs from this machine's kernel (which has no modules, no bridge conntrack and no bridge reject):
nothing loads br_netfilter at boot (the daemon and the lab load it), and the kernel loads
`nf_conntrack_bridge` and `nft_reject_bridge` when the probe asks for them.

The boot files are made once under /var/lib/hyperfence/images/hostroot (or $HF_IMAGE_DIR/hostroot).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hyperfence.lab.hostroot_guest import HostrootBoot, HostrootRun, prepare_boot, run_in_hostroot
from hyperfence.lab.image import DEFAULT_OUT

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="the guest's boot files and QEMU need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

REPO = str(Path(__file__).resolve().parents[2])
FW = "tests/netns/firewall/"
# The firewall's acceptance on Debian's kernel, ~2.5 min under TCG: the papers' experiment; stateful TCP,
# UDP and ICMP replies (through a reject, and established flows that outlive a new deny or reject); the
# stateful path broken and repaired (bridge-nf-call-iptables); a reject answering its sender (TCP reset,
# ICMP port unreachable, switched and routed); anti-spoofing (IP, MAC, ARP).
SUBSET = (
    FW + "test_firewall.py::test_the_papers_experiment",
    FW + "test_firewall.py::test_spoofed_source_ip_mac_and_arp_are_dropped",
    FW + "test_firewall.py::test_reject_answers_the_sender_at_once",
    FW
    + "test_reject_flows.py::test_a_reject_in_the_receivers_egress_never_answers_its_replies_to_allowed_flows",
    FW + "test_reject_flows.py::test_a_new_deny_or_reject_never_cuts_established_flows",
    FW + "test_reject_routed.py::test_reject_answers_routed_senders_and_the_host",
)
# Per data plane flavour (model/kernel.py), chosen in the guest through HYPERFENCE_FLAVOUR (the lab, its
# engine and every `hyperfence` process the tests start honour it): br_netfilter's own preconditions; for
# bridge_native (no br_netfilter loaded at all: the lab loads none for it) the connection cap of a VM, for
# what it opens and for what is routed to it from the outside (capped in inet: docs/host.md), and a reject's
# ICMP answer that needs no ARP between the host and the VM (as `can` says for this flavour), and the chaddr
# guard's raw payload match on a DHCP request, and the overlays' rate limit and shield.
FLAVOUR_TESTS = {
    "br_netfilter": ((FW + "test_preconditions.py",), 10),  # the parametrized test counts twice, 3 here
    "bridge_native": (
        (
            FW
            + "test_conntrack_cap.py::test_a_flooding_vm_holds_at_most_its_cap_and_its_neighbour_keeps_working",
            FW + "test_conntrack_cap.py::test_a_flood_from_outside_at_a_vm_is_capped_on_that_vm",
            FW + "test_arp.py::test_the_host_resolves_a_vm_for_its_icmp_answers_only_where_it_sends_them",
            FW
            + "test_dhcp_chaddr.py::test_a_dhcp_request_naming_another_mac_gets_no_offer_and_is_logged[0.0.0.0]",
            # overlays (docs/overlays.md): a rate limit and a shield on bridge conntrack
            FW + "test_overlays.py::test_an_operator_rate_limit_holds_a_flooding_vm_to_its_rate",
            FW + "test_overlays.py::test_a_shield_cuts_new_inbound_connections_and_keeps_an_established_one",
        ),
        13,
    ),
}
SUBSET_TIMEOUT = 840.0


@pytest.fixture(scope="module")
def boot() -> HostrootBoot:
    return prepare_boot(Path(os.environ.get("HF_IMAGE_DIR", str(DEFAULT_OUT))))


def explain(run: HostrootRun) -> str:
    return (
        f"status {run.status}, timed out {run.timed_out}, {run.seconds} s\n--- output\n{run.output[-4000:]}"
        f"\n--- console\n{run.console}"
    )


def test_the_probe_finds_bridge_conntrack_and_reject_and_the_daemon_loads_br_netfilter(
    boot: HostrootBoot,
) -> None:
    run = run_in_hostroot(
        [sys.executable, "-m", "tests.guest.kernel_report"], cwd=REPO, boot=boot, timeout=300
    )
    assert run.status == 0, explain(run)
    report = json.loads(run.output.strip().splitlines()[-1])
    assert report["release"] == boot.release
    # a stock kernel: nothing loaded these at boot
    assert not any(report["loaded_at_boot"].values()), report["loaded_at_boot"]
    before = report["probe_before"]
    assert before["bridge_conntrack"] is True, before
    assert before["bridge_reject"] is True, before
    assert before["br_netfilter"] is False and before["bridge_nf_call_iptables"] is None, before
    # the probe's dry runs made the kernel load the modules it asked for (modprobe from the module tree)
    after_probe = report["loaded_after_probe"]
    assert after_probe["nf_conntrack_bridge"] and after_probe["nft_reject_bridge"], after_probe
    assert not after_probe["br_netfilter"], after_probe
    # left to choose, the daemon builds bridge_native and needs (and loads) no br_netfilter
    assert report["auto_flavour"] == "bridge_native", report
    assert report["auto_status"]["stateful"] == "ok" and report["auto_status"]["flavour"] == "bridge_native"
    assert report["auto_status"]["summary"].startswith("data plane bridge_native;"), report
    assert not report["loaded_after_auto"]["br_netfilter"], report
    # forced to br_netfilter, the daemon's start-up loads br_netfilter and turns the sysctl on
    ensure = report["ensure"]
    assert ensure["br_netfilter"] is True and ensure["bridge_nf_call_iptables"] is True, ensure
    assert ensure["bridge_conntrack"] is True and ensure["bridge_reject"] is True, ensure
    assert report["loaded_after_ensure"]["br_netfilter"], report
    assert [(e["what"], e["was"]) for e in report["events"]] == [("br_netfilter", "not loaded")], report


@pytest.mark.timeout(SUBSET_TIMEOUT + 60)
@pytest.mark.parametrize("flavour", sorted(FLAVOUR_TESTS))
def test_the_firewall_acceptance_subset_passes_on_the_debian_kernel(
    boot: HostrootBoot, tmp_path: Path, flavour: str
) -> None:
    extra, expected = FLAVOUR_TESTS[flavour]
    pytest_argv = shlex.join([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"])
    status = shlex.join([sys.executable, "-m", "tests.guest.flavour_report"])
    script = (
        f'uname -r > "$HF_GUEST_OUT/release"; {pytest_argv} --junitxml="$HF_GUEST_OUT/junit.xml" "$@"; '
        f'rc=$?; {status} > "$HF_GUEST_OUT/flavour.json"; exit $rc'
    )
    run = run_in_hostroot(
        ["sh", "-c", script, "guest-pytest", *SUBSET, *extra],
        cwd=REPO,
        boot=boot,
        env={"HYPERFENCE_FLAVOUR": flavour},
        timeout=SUBSET_TIMEOUT,
        run_dir=tmp_path,
    )
    print(f"guest boot {run.boot_seconds} s, whole run {run.seconds} s")
    assert run.status == 0, explain(run)
    assert (tmp_path / "release").read_text().strip() == boot.release
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")  # noqa: S314 - written by our pytest
    assert suite is not None, explain(run)
    counts = {k: int(suite.get(k, "-1")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": expected, "failures": 0, "errors": 0, "skipped": 0}, explain(run)
    # the lab's engine built the flavour asked for (and bridge_native ran with no br_netfilter at all)
    seen = json.loads((tmp_path / "flavour.json").read_text())
    assert seen["flavour"] == flavour, seen
    assert seen["br_netfilter_loaded"] is (flavour == "br_netfilter"), seen
