"""The firewall against the real kernel: lab namespaces, real packets, real nftables."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from hyperfence.errors import KernelError
from hyperfence.lab import topology
from hyperfence.lab.experiment import run_experiment
from hyperfence.lab.plan import LabVm
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.compile import TABLES, vm_sid
from hyperfence.ruleset.readback import rule_counters
from tests.netns.firewall.daemon_process import start_daemon

pytestmark = pytest.mark.kernel


@contextlib.contextmanager
def traffic_log(lab: LabSession) -> Iterator[str]:
    """The daemon's traffic log running for `lab` (NFLOG -> traffic.jsonl) while the block runs; its path."""
    from hyperfence.reconcile.traffic import TRAFFIC_FILE, run_traffic_log

    assert lab.engine is not None
    stop = threading.Event()
    reader = threading.Thread(target=run_traffic_log, args=(lab.engine, stop), daemon=True)
    reader.start()
    try:
        time.sleep(0.5)  # the reader has bound its NFLOG group
        yield os.path.join(lab.state_dir, TRAFFIC_FILE)
    finally:
        stop.set()
        reader.join(timeout=5)


PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
UDP_2_1 = {"id": "udp5000", "from": "vm:vm2", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}
UDP_3_1 = {"id": "udp3-5000", "from": "vm:vm3", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}
UDP_3_2 = {"id": "udp7000", "from": "vm:vm3", "to": "vm:vm2", "protocol": "udp", "ports": [7000]}


def counter(s: LabSession, chain_suffix: str, comment: str) -> int:
    assert s.engine is not None
    objs = []
    for t in TABLES:
        objs.extend(s.engine.nft.list({"table": {"family": t.family, "name": t.name}}))
    return sum(
        p
        for (_, chain, c), (p, _) in rule_counters(objs).items()
        if chain.endswith(chain_suffix) and c == comment
    )


def test_the_papers_experiment(lab: LabSession) -> None:
    observations = run_experiment(lab)
    failed = [f"{o.step}: {o.check}: expected {o.expected}, got {o.got}" for o in observations if not o.ok]
    assert not failed, failed
    assert len(observations) >= 15


def test_kernel_reads_back_identical_and_a_second_converge_writes_nothing(lab: LabSession) -> None:
    lab.apply([PING_1_2, UDP_2_1])
    assert lab.engine is not None
    _, again = lab.engine.converge(full=True)
    assert again is not None and not again.changed and again.drift == []


def test_hand_flush_is_repaired_and_reported(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.ping("vm1", "vm2")[0] == 2
    lab.run("host", ["nft", "flush", "ruleset"]).check_returncode()
    assert lab.engine is not None
    _, result = lab.engine.converge(full=True)
    assert result is not None and result.changed
    assert any("missing" in d for d in result.drift)
    assert lab.engine.store.events(kind="drift-repaired")
    # the filter's heartbeat: every VM whose chains were gone is told so
    repaired = {e["vm"] for e in lab.engine.store.events(kind="filter-repaired")}
    assert repaired == {v.id for v in lab.engine.current.policy.vms}  # type: ignore[union-attr]
    assert lab.ping("vm1", "vm2")[0] == 2
    assert lab.ping("vm3", "vm2")[0] == 0


def test_one_vms_deleted_chain_is_repaired_and_reported_on_that_vm(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.engine is not None and lab.engine.current is not None
    vm2 = next(v for v in lab.engine.current.policy.vms if v.name == "vm2")
    chain = f"{vm_sid(vm2.id)}_in"
    lab.run("host", ["nft", "flush", "chain", "bridge", "hyperfence", chain]).check_returncode()
    assert lab.ping("vm1", "vm2")[0] == 0  # the flushed chain falls through to the base chain's drop
    _, result = lab.engine.converge(full=True)
    assert result is not None and result.changed
    events = lab.engine.store.events(kind="filter-repaired")
    assert [e["vm"] for e in events] == [vm2.id]
    assert chain in events[0]["drift"][0]
    assert lab.ping("vm1", "vm2")[0] == 2


def test_failing_batch_leaves_previous_ruleset_in_place(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    assert lab.engine is not None
    before = lab.run("host", ["nft", "-s", "list", "ruleset"]).stdout
    bad = {
        "nftables": [
            {
                "add": {
                    "element": {
                        "family": "bridge",
                        "table": "hyperfence",
                        "name": "in_ports",
                        "elem": [["vp9", {"jump": {"target": "no_such_chain"}}]],
                    }
                }
            },
            {"delete": {"table": {"family": "bridge", "name": "hyperfence"}}},
        ]
    }
    with pytest.raises(KernelError):
        lab.engine.nft.apply(bad)
    assert lab.run("host", ["nft", "-s", "list", "ruleset"]).stdout == before
    assert lab.ping("vm1", "vm2")[0] == 2


def test_unknown_port_on_the_bridge_gets_nothing(lab: LabSession) -> None:
    lab.apply([{"id": "any", "from": "vms", "to": "any", "services": ["any", "arp"]}])
    ns = f"hf-{lab.plan.name}-vm9"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        host = ["ip", "-n", lab.plan.host_netns]
        subprocess.run(
            [*host, "link", "add", "vp9", "type", "veth", "peer", "name", "eth0", "netns", ns], check=True
        )
        subprocess.run([*host, "link", "set", "vp9", "master", "br0", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "10.77.0.99/22", "dev", "eth0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "2", "-i", "0.2", "-W", "1", "10.77.0.11"],
            capture_output=True,
            check=False,
        )
        assert b" 0 received" in r.stdout
        assert counter(lab, "guard", "sys:unknown-port") > 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# A raw packet socket on the VM's eth0 sees every frame that reaches the interface, whatever its ethertype,
# destination MAC or VLAN tag, before the VM's own stack could ignore it. It counts the frames that carry
# the marker `HFPROBE:<kind>;`, by kind, and stops once it has `argv[1]` frames of kind `argv[2]`: the kind
# sent last, so nothing sent before it is still on its way (or after `argv[3]` seconds).
FRAME_LISTENER = r"""
import json, select, socket, sys, time
want, last, end = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind(("eth0", 0))
counts = {}
def take():
    data, addr = s.recvfrom(65535)
    i = data.find(b"HFPROBE:")
    if addr[2] != socket.PACKET_OUTGOING and i >= 0:
        kind = data[i + 8 :].split(b";")[0].decode()
        counts[kind] = counts.get(kind, 0) + 1
print("ready", flush=True)
while counts.get(last, 0) < want and time.monotonic() < end:
    if select.select([s], [], [], 0.2)[0]:
        take()
s.setblocking(False)
while True:
    try:
        take()
    except BlockingIOError:
        break
print(json.dumps(counts), flush=True)
"""


LISTEN_FOR = 150


def _frames_seen(
    lab: LabSession, receiver: str, sends: list[tuple[str, dict[str, str]]], *, count: int = 3
) -> dict[str, int]:
    """How many frames of each kind reach `receiver`'s eth0 while each `(sender, {kind: scapy frame})` of
    `sends` sends, in order, `count` frames of each kind (the frame gets a `HFPROBE:<kind>;` payload).

    The kind sent last must be one that arrives (a control): the listener waits for it, so a frame sent
    earlier cannot be missed because the listener stopped too soon."""
    last = list(sends[-1][1])[-1]
    listener = topology.popen_in_vm(
        lab.plan,
        receiver,
        # Waits for the control at most LISTEN_FOR s: the senders' scapy starts take seconds each, and tens
        # of seconds in the Debian-kernel guest under TCG on a busy machine (a 30 s wait once ended before
        # the control was sent). It returns as soon as the control arrives, so passing runs do not wait.
        [sys.executable, "-c", FRAME_LISTENER, str(count), last, str(LISTEN_FOR)],
        stdout=subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == b"ready"
        for sender, frames in sends:
            _scapy(
                lab,
                sender,
                "\n".join(
                    f"sendp({frame}/Raw(b'HFPROBE:{kind};'), iface='eth0', count={count}, verbose=0)"
                    for kind, frame in frames.items()
                ),
            )
        out, _ = listener.communicate(timeout=LISTEN_FOR + 10)
    finally:
        topology.stop_process(listener)
    assert listener.returncode == 0 and out, f"the frame listener in {receiver} failed: {out!r}"
    counts: dict[str, int] = json.loads(out.splitlines()[-1])
    return counts


def _scapy(lab: LabSession, vm: str, script: str) -> None:
    """Run a scapy `script` in lab VM `vm`, or in namespace NS for `netns:NS`."""
    argv = [sys.executable, "-c", "from scapy.all import *\n" + script]
    if vm.startswith("netns:"):
        r = subprocess.run(
            ["ip", "netns", "exec", vm[6:], *argv], capture_output=True, timeout=LISTEN_FOR, check=False
        )
    else:
        r = lab.run(vm, argv, timeout=LISTEN_FOR)
    assert r.returncode == 0, r.stderr.decode()


def test_spoofed_source_ip_mac_and_arp_are_dropped(lab: LabSession) -> None:
    # vm1 takes UDP 5000 from vm2 and vm3 may send UDP 5000 to vm1 (and ARP with it): a datagram from vm3
    # with vm2's address passes both rule chains, so only the anti-spoofing stands in its way.
    lab.apply([UDP_2_1, PING_1_2, UDP_3_1])
    vm1, vm2, vm3 = lab.plan.vms
    assert lab.ping("vm1", "vm2")[0] == 2  # vm1 now holds vm2's real MAC in its neighbour table
    datagram = f"IP(src='{vm2.ip}', dst='{vm1.ip}')/UDP(sport=4000, dport=5000)"
    arp = f"Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(hwsrc='{vm3.mac}', psrc='{vm2.ip}', pdst='{vm1.ip}'"
    forged = {
        "ip": f"Ether(src='{vm3.mac}', dst='{vm1.mac}')/{datagram}",  # vm2's IP with vm3's MAC
        "mac-and-ip": f"Ether(src='{vm2.mac}', dst='{vm1.mac}')/{datagram}",  # vm2's MAC and IP
        "arp-reply": f"{arp}, op=2)",  # "vm2's IP is at vm3's MAC"
        "arp-request": f"{arp}, op=1)",  # the same claim in a request, which vm1 always takes
    }
    # the control, sent last: vm2 itself sends the same datagram and it arrives
    genuine = {"genuine": f"Ether(src='{vm2.mac}', dst='{vm1.mac}')/{datagram}"}
    seen = _frames_seen(lab, "vm1", [("vm3", forged), ("vm2", genuine)])
    assert seen == {"genuine": 3}, seen
    assert counter(lab, "guard", "sys:spoof") >= 3 * len(forged)
    neigh = lab.run("vm1", ["ip", "neigh", "show", str(vm2.ip)]).stdout.decode()
    assert vm2.mac in neigh and vm3.mac not in neigh, neigh  # the forged ARP did not poison vm1


def test_a_vm_cannot_act_as_dhcp_server(lab: LabSession) -> None:
    lab.apply(
        [
            {"id": "dhcp", "from": "vms", "to": "host", "services": ["dhcp"]},
            {"id": "all", "from": "vm:vm3", "to": "vms", "services": ["any"]},
        ]
    )
    vm3 = lab.plan.vms[2]
    _scapy(
        lab,
        "vm3",
        f"sendp(Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/IP(src='{vm3.ip}', "
        f"dst='255.255.255.255')/UDP(sport=67, dport=68)/BOOTP(op=2, yiaddr='10.77.0.99')/"
        f"DHCP(options=[('message-type','offer'), 'end']), iface='eth0', count=3, verbose=0)",
    )
    assert counter(lab, "_out", "sys:no-dhcp-server") >= 3
    assert lab.dhcp("vm1")  # the real server still works


def test_a_vm_dhcp_server_answers_only_the_clients_its_rule_names(lab: LabSession) -> None:
    """`{from: vm3, to: vm1, services: [dhcp-server]}`: vm3 serves vm1 (vm1 takes its offers), and
    nobody else: an offer to vm2 is dropped at vm3's port although vm2 would take UDP 68 from vm3."""
    vm1, vm2, vm3 = lab.plan.vms
    lab.apply(
        [
            {"id": "srv", "from": "vm:vm3", "to": "vm:vm1", "services": ["dhcp-server"]},
            {"id": "vm2-takes-68", "from": str(vm3.ip), "to": "vm:vm2", "services": ["udp/68"]},
            UDP_3_2,
        ]
    )
    offer = "UDP(sport=67, dport=68)/BOOTP(op=2)"

    def unicast(dst: LabVm, l4: str) -> str:
        return f"Ether(src='{vm3.mac}', dst='{dst.mac}')/IP(src='{vm3.ip}', dst='{dst.ip}')/{l4}"

    allowed = unicast(vm2, "UDP(dport=7000)")
    seen = _frames_seen(lab, "vm2", [("vm3", {"offer": unicast(vm2, offer), "allowed": allowed})])
    assert seen == {"allowed": 3}, seen
    assert _frames_seen(lab, "vm1", [("vm3", {"offer": unicast(vm1, offer)})]) == {"offer": 3}


def test_reloads_under_traffic_lose_no_packets(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    ping = topology.popen_in_vm(
        lab.plan,
        "vm1",
        ["ping", "-n", "-q", "-i", "0.002", "-c", "1500", str(lab.plan.vms[1].ip)],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.3)
    for i in range(20):
        lab.apply(
            [
                PING_1_2,
                {
                    "id": f"extra{i % 2}",
                    "from": "vm:vm3",
                    "to": "any",
                    "protocol": "tcp",
                    "ports": [1000 + i],
                },
            ]
        )
    out, _ = ping.communicate(timeout=30)
    text = out.decode()
    assert "1500 packets transmitted, 1500 received" in text, text


def _monitor_mark(lab: LabSession, path: str, tag: str, *, wait: float = 10) -> str:
    """What `nft monitor` (printing to `path`) printed before a marker: a scratch table `tag` added and
    deleted in the lab's host namespace now. The kernel reports changes in order, so once the marker is in
    the file, every change made before it is too. Raises AssertionError if the marker is not seen in time."""
    lab.run("host", ["nft", "add", "table", "ip", tag]).check_returncode()
    lab.run("host", ["nft", "delete", "table", "ip", tag]).check_returncode()
    deadline = time.monotonic() + wait
    while True:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        start = text.find(f"add table ip {tag}\n")
        if text.find(f"delete table ip {tag}\n") > start >= 0:
            return text[:start]
        assert time.monotonic() < deadline, f"nft monitor did not print {tag}: {text!r}"
        time.sleep(0.05)


def _changes_since(monitor_text: str, tag: str) -> list[str]:
    """The kernel changes `nft monitor` printed after the marker `tag` (without its `# new generation` lines)."""
    rest = monitor_text[monitor_text.index(f"delete table ip {tag}\n") :].split("\n", 1)[1]
    return [line for line in rest.splitlines() if line and not line.startswith("# new generation")]


def test_daemon_kill_9_changes_nothing_and_restart_writes_nothing(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    monitor_path = os.path.join(lab.state_dir, "monitor.txt")
    daemon, key = start_daemon(lab)
    with open(monitor_path, "wb") as out:
        monitor = topology.popen_in_host(lab.plan, ["nft", "monitor"], stdout=out)
    try:
        # The monitor listens once it prints a marker (retried: a marker made before it subscribed is lost).
        for attempt in range(1, 21):
            try:
                _monitor_mark(lab, monitor_path, f"hfsync{attempt}", wait=1)
                break
            except AssertionError:
                assert attempt < 20, "nft monitor never printed a marker"
        _monitor_mark(lab, monitor_path, "hfbefore")
        ruleset = lab.run("host", ["nft", "-a", "-s", "list", "ruleset"]).stdout  # with handles
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        assert lab.ping("vm1", "vm2")[0] == 2
        assert lab.ping("vm3", "vm2")[0] == 0
        daemon, restarted_key = start_daemon(lab)
        assert restarted_key == key
        written = _changes_since(_monitor_mark(lab, monitor_path, "hfafter"), "hfbefore")
        assert written == [], written  # the restart wrote nothing to the kernel
        assert lab.run("host", ["nft", "-a", "-s", "list", "ruleset"]).stdout == ruleset  # same handles
        assert lab.ping("vm1", "vm2")[0] == 2
        # the control: a real change is seen by the monitor
        lab.apply([PING_1_2, UDP_2_1])
        assert _changes_since(_monitor_mark(lab, monitor_path, "hfchanged"), "hfafter")
    finally:
        topology.stop_process(monitor)
        daemon.kill()
        daemon.wait()


def test_the_daemon_under_umask_000_repairs_and_keeps_its_state_private(lab: LabSession) -> None:
    """What an older version left readable is repaired at start (and said so); what the daemon creates
    (pid file, control socket, traffic log) is 0600 although its umask is 000."""
    lab.apply([PING_1_2])
    state = lab.state_dir
    os.chmod(state, 0o755)  # noqa: S103 - what `lab image` used to leave
    os.chmod(os.path.join(state, "hyperfence.db"), 0o644)
    os.chmod(os.path.join(state, "hyperfence.db-wal"), 0o644)  # the test's engine keeps the store open
    hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", state]
    daemon = subprocess.Popen([*hf, "daemon", "--resync", "3600"], stderr=subprocess.PIPE, umask=0)
    names = ("hyperfence.db", "hyperfence.db-wal", "hyperfence.db-shm", "daemon.pid", "daemon.sock")
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(os.path.join(state, n)) for n in (*names, "traffic.jsonl")):
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        modes = {n: stat.S_IMODE(os.lstat(os.path.join(state, n)).st_mode) for n in (*names, "traffic.jsonl")}
        assert modes == dict.fromkeys((*names, "traffic.jsonl"), 0o600)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    text = err.decode()
    for repaired in (
        f"{state}: mode 0755, now 0700",
        f"{os.path.join(state, 'hyperfence.db')}: mode 0644, now 0600",
        f"{os.path.join(state, 'hyperfence.db-wal')}: mode 0644, now 0600",
    ):
        assert f"WARNING hyperfence.state: state repaired: {repaired}" in text, text


def test_reject_answers_the_sender_at_once(lab: LabSession) -> None:
    lab.serve("vm2", tcp=[22, 80], udp=[53])
    lab.apply(
        [
            {
                "id": "ssh-rejected",
                "from": "vm:vm1",
                "to": "vm:vm2",
                "protocol": "tcp",
                "ports": [22],
                "action": "reject",
                "priority": 10,
            },
            {
                "id": "dns-rejected",
                "from": "vm:vm1",
                "to": "vm:vm2",
                "protocol": "udp",
                "ports": [53],
                "action": "reject",
                "priority": 10,
            },
            {"id": "vm1-web", "from": "vm:vm1", "to": "vm:vm2", "protocol": "tcp", "ports": [80, 22]},
            # vm3 may send anything on tcp/80, but vm2 rejects it at its ingress
            {"id": "vm3-out", "from": "vm:vm3", "to": "any", "protocol": "tcp", "ports": [80]},
            {
                "id": "no-vm3",
                "from": "vm:vm3",
                "to": "vm:vm2",
                "protocol": "tcp",
                "ports": [80],
                "action": "reject",
            },
            {"id": "arp", "from": "vm:vm3", "to": "vm:vm2", "services": ["arp"]},
            {"id": "arp2", "from": "vm:vm2", "to": "vm:vm3", "services": ["arp"]},
        ]
    )
    assert lab.tcp("vm1", "vm2", 80) == "OK"  # not everything is rejected
    assert lab.tcp("vm1", "vm2", 22, timeout=5) == "REFUSED"  # egress reject: a TCP reset, not a timeout
    assert lab.udp("vm1", "vm2", 53, timeout=5) == "REFUSED"  # ICMP port unreachable
    assert lab.tcp("vm3", "vm2", 80, timeout=5) == "REFUSED"  # the receiver's ingress reject
    assert lab.tcp("vm3", "vm1", 80) in ("TIMEOUT", "UNREACHABLE")  # vm1 never allowed it: plain deny
    assert counter(lab, "_rej_out", "rule:ssh-rejected#1") >= 1
    assert lab.engine is not None
    _, again = lab.engine.converge(full=True)
    assert again is not None
    assert not again.changed  # the netdev chains read back identical too


def test_selectors_priorities_and_default_deny_with_real_packets(lab: LabSession) -> None:
    """Labels, IP sets, CIDRs, host, priorities, ICMP types and IP protocol numbers."""
    lab.labels = {"vm1": {"tier": "app"}, "vm2": {"tier": "db"}}
    lab.serve("vm2", tcp=[5432, 6000], udp=[7000])
    lab.apply(
        [
            {
                "id": "app-db",
                "from": "label:tier=app",
                "to": "label:tier=db",
                "protocol": "tcp",
                "ports": [5432],
            },
            {
                "id": "deny-6000",
                "from": "10.77.0.0/22",
                "to": "vm:vm2",
                "protocol": "tcp",
                "ports": [6000],
                "action": "deny",
                "priority": 10,
            },
            {"id": "any-6000", "from": "vms", "to": "vms", "protocol": "tcp", "ports": [6000]},
            {
                "id": "udp-from-set",
                "from": "ipset:friends",
                "to": "vm:vm2",
                "protocol": "udp",
                "ports": [7000],
            },
            {"id": "udp-out", "from": "vm:vm3", "to": "vm:vm2", "protocol": "udp", "ports": [7000]},
            {
                "id": "echo-only",
                "from": "vm:vm3",
                "to": "host",
                "protocol": "icmp",
                "icmp_type": "echo-request",
            },
        ],
        ipsets={"friends": ["10.77.0.13"]},
    )
    assert lab.tcp("vm1", "vm2", 5432) == "OK"  # label to label
    assert lab.tcp("vm3", "vm2", 5432) in ("TIMEOUT", "UNREACHABLE")  # vm3 has no label
    assert lab.tcp("vm1", "vm2", 6000) in ("TIMEOUT", "UNREACHABLE")  # the priority-10 deny wins
    assert lab.udp("vm3", "vm2", 7000) == "OK"  # from the IP set (and vm3's own egress rule)
    assert lab.udp("vm1", "vm2", 7000) in ("TIMEOUT", "UNREACHABLE")  # vm1 is not in the set
    assert lab.ping("vm3", "host")[0] == 2  # ICMP echo to the host


def _frames_from_vm3_to_vm2(lab: LabSession, frames: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """What vm2's eth0 gets of `frames` (scapy, by kind) from vm3, sent 3 times each: first on the bare
    bridge (before hyperfence writes any rule: the control, which must see every kind), then under a policy
    that lets vm3 send UDP 7000 to vm2 and nothing else. A datagram it does allow (kind "allowed") is sent
    last each time, so the listener is known to be up until everything sent before it has arrived."""
    _, vm2, vm3 = lab.plan.vms
    allowed = f"Ether(src='{vm3.mac}', dst='{vm2.mac}')/IP(src='{vm3.ip}', dst='{vm2.ip}')/UDP(dport=7000)"
    sends = [("vm3", {**frames, "allowed": allowed})]
    bare = _frames_seen(lab, "vm2", sends)
    lab.apply([UDP_3_2])
    return bare, _frames_seen(lab, "vm2", sends)


def test_broadcast_multicast_ipv6_and_other_ethertypes_are_dropped(lab: LabSession) -> None:
    """What a VM may not send never reaches another VM's interface, whatever its ethertype or destination.
    A raw socket on the receiver's eth0 is the witness: it would see any of these frames that got through."""
    _, vm2, vm3 = lab.plan.vms
    to_vm2 = f"Ether(src='{vm3.mac}', dst='{vm2.mac}')"
    udp = "UDP(sport=9999, dport=9999)"
    frames = {
        "broadcast": f"Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/"
        f"IP(src='{vm3.ip}', dst='{lab.plan.subnet.broadcast_address}')/{udp}",
        "multicast": f"Ether(src='{vm3.mac}', dst='01:00:5e:01:01:01')/IP(src='{vm3.ip}', dst='239.1.1.1')/{udp}",
        "ipv6": f"{to_vm2}/IPv6(src='fe80::1', dst='fe80::2')/{udp}",
        "ipv6-multicast": f"Ether(src='{vm3.mac}', dst='33:33:00:00:00:01')/IPv6(src='fe80::1', dst='ff02::1')/{udp}",
        "ethertype-0x88b5": f"Ether(src='{vm3.mac}', dst='{vm2.mac}', type=0x88b5)",
        # two tags around a datagram the policy allows untagged
        "802.1ad+802.1q": f"{to_vm2}/Dot1AD(vlan=5)/Dot1Q(vlan=6)/IP(src='{vm3.ip}', dst='{vm2.ip}')/UDP(dport=7000)",
    }
    bare, policed = _frames_from_vm3_to_vm2(lab, frames)
    assert bare == dict.fromkeys([*frames, "allowed"], 3), bare  # the control: each kind can arrive
    assert policed == {"allowed": 3}, policed


def test_vlan_tagged_frames_are_dropped(lab: LabSession) -> None:
    """A VM's port is an access port: a tagged frame is dropped even when the datagram inside it would be
    allowed untagged (it could reach a VLAN of the receiver that the policy knows nothing about). The drop
    is counted in `vlan_out` as `sys:vlan`."""
    _, vm2, vm3 = lab.plan.vms
    inner = f"IP(src='{vm3.ip}', dst='{vm2.ip}')/UDP(dport=7000)"
    to_vm2 = f"Ether(src='{vm3.mac}', dst='{vm2.mac}')"
    frames = {"802.1q": f"{to_vm2}/Dot1Q(vlan=5)/{inner}", "802.1ad": f"{to_vm2}/Dot1AD(vlan=5)/{inner}"}
    bare, policed = _frames_from_vm3_to_vm2(lab, frames)
    assert bare == dict.fromkeys([*frames, "allowed"], 3), bare  # the control: each kind can arrive
    assert policed == {"allowed": 3}, policed
    assert counter(lab, "vlan_out", "sys:vlan") == 6


def test_an_uplink_is_a_trunk_but_its_tagged_frames_never_reach_a_vm(lab: LabSession) -> None:
    """A bridge port declared as an uplink may carry tagged frames (it leads to a physical network), but a
    tagged frame from it is dropped at a VM's port, even when the datagram inside would be allowed."""
    _, vm2, _ = lab.plan.vms
    ns, port, far = f"hf-{lab.plan.name}-vm8", "vp8", "10.77.0.200"
    host = ["ip", "-n", lab.plan.host_netns]
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            [*host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True
        )
        subprocess.run([*host, "link", "set", port, "master", "br0", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        assert lab.engine is not None
        document = lab.document([{"id": "far", "from": far, "to": "vm:vm2", "services": ["udp/7000"]}])
        document["networks"][0]["uplinks"] = [port]
        lab.engine.store_policy(document, source="test")
        lab.engine.converge()
        _, again = lab.engine.converge(full=True)
        assert again is not None and not again.changed and again.drift == []  # `ether type` reads back
        inner = f"IP(src='{far}', dst='{vm2.ip}')/UDP(dport=7000)"
        to_vm2 = f"Ether(src='02:77:00:00:00:c8', dst='{vm2.mac}')"
        frames = {
            "802.1q": f"{to_vm2}/Dot1Q(vlan=5)/{inner}",
            "802.1ad": f"{to_vm2}/Dot1AD(vlan=5)/{inner}",
            "allowed": f"{to_vm2}/{inner}",
        }
        assert _frames_seen(lab, "vm2", [(f"netns:{ns}", frames)]) == {"allowed": 3}
        assert counter(lab, "vlan_in", "sys:vlan") == 6
        assert counter(lab, "vlan_out", "sys:vlan") == 0  # the uplink is a trunk: its tagged frames pass
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_policy_check_with_mistakes_touches_nothing(lab: LabSession, tmp_path: object) -> None:
    lab.apply([PING_1_2])
    before = lab.run("host", ["nft", "-s", "list", "ruleset"]).stdout
    bad = os.path.join(str(tmp_path), "bad.yaml")
    with open(bad, "w", encoding="utf-8") as f:
        f.write(
            "networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]\n"
            "vms: [{name: vm1, port: vp1, mac: '02:77:00:00:00:0b', ips: [10.77.0.11]}]\n"
            "rules:\n  - {from: vm:vm1, to: vm:nope, protocol: tcp, ports: ['80-70']}\n"
            "  - {from: vm:vm1, to: any, protocol: udp, ports: [false]}\n"
        )
    hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]
    for verb in ("check", "apply"):
        r = subprocess.run([*hf, "policy", verb, bad], capture_output=True, check=False)
        assert r.returncode == 2
        err = r.stderr.decode()
        assert "rules[0].to" in err and "rules[0].ports[0]: range 80-70 is reversed" in err
        assert "rules[1].ports[0]" in err
        assert "Traceback" not in err
    assert lab.run("host", ["nft", "-s", "list", "ruleset"]).stdout == before
    assert lab.engine is not None
    assert lab.engine.store.latest_generation() == 1


def test_traffic_log_names_vm_rule_and_verdict_and_is_rate_limited(lab: LabSession) -> None:
    lab.apply([{**PING_1_2, "log": True}])
    with traffic_log(lab) as path:
        assert lab.ping("vm1", "vm2")[0] == 2
        # a deny flood from vm3: 1,000 UDP datagrams in well under a second
        vm3 = lab.plan.vms[2]
        _scapy(
            lab,
            "vm3",
            f"sendp(Ether(src='{vm3.mac}', dst='{lab.plan.vms[1].mac}')/IP(src='{vm3.ip}', "
            f"dst='{lab.plan.vms[1].ip}')/UDP(sport=1234, dport=4321), iface='eth0', count=1000, "
            f"verbose=0)",
        )
        time.sleep(1.5)
    with open(path, encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    allowed = [e for e in events if e["rule"] == "ping" and e["verdict"] == "allow"]
    assert {(e["vm"], e["direction"]) for e in allowed} == {("vm1", "out"), ("vm2", "in")}
    assert allowed[0]["protocol"] == "icmp" and allowed[0]["src"] == str(lab.plan.vms[0].ip)
    flood = [e for e in events if e["vm"] == "vm3" and e["verdict"] == "deny" and e.get("dport") == 4321]
    # vm3's egress default deny logs at 10/s with a burst of 20: the flood of 1,000 yields a few dozen events
    assert 1 <= len(flood) <= 60, len(flood)
    assert flood[0]["rule"] == "sys:default-deny"


def test_the_longest_ids_are_kept_whole_by_the_kernel(lab: LabSession) -> None:
    """Ids of `MAX_ID_LENGTH` characters: nft takes every comment and log prefix, reads them back unchanged
    (a second converge finds no drift), and packets still pass and are counted under the whole id."""
    from hyperfence.model.policy import MAX_ID_LENGTH

    longest = "x" * MAX_ID_LENGTH
    services = [*(f"tcp/{p}" for p in range(1, 10)), "icmp", "dhcp"]  # icmp #10, dhcp #11 (paired)
    rules = [
        {"id": longest, "from": "vm:vm1", "to": "vm:vm2", "services": services, "log": True},
        {
            "id": "y" * MAX_ID_LENGTH,
            "from": "vm:vm3",
            "to": "vm:vm1",
            "services": ["tcp/80"],
            "action": "reject",
        },
    ]
    assert lab.engine is not None
    document = {
        **lab.document(rules),
        "limits": [{"id": "z" * MAX_ID_LENGTH, "vms": "vms", "new_flows": 1000}],
    }
    lab.engine.store_policy(document, source="test")
    _, first = lab.engine.converge(full=True)
    assert first is not None and first.changed
    _, again = lab.engine.converge(full=True)
    assert again is not None and not again.changed and again.drift == []
    listed = lab.run("host", ["nft", "list", "ruleset"]).stdout.decode()
    assert f'comment "rule:{longest}#11:pair:log"' in listed
    vm1, vm2 = (vm_sid(f"{lab.plan.name}-{vm}") for vm in ("vm1", "vm2"))
    assert f'log prefix "hf:{vm1}:in:allow:rule:{longest}#11:pair"' in listed  # the DHCP reply to vm1
    assert f'log prefix "hf:{vm2}:in:allow:rule:{longest}#10"' in listed
    assert lab.ping("vm1", "vm2")[0] == 2
    # the pings are one flow: its first packet passes the rule, the second the established shortcut
    assert counter(lab, "_in", f"rule:{longest}#10") == 1


def test_the_fail_closed_batch_shuts_every_vm_port_until_the_ruleset_is_back(lab: LabSession) -> None:
    """After a flush the repair first commits only the bridge's dropping base chains (ruleset/closed.py):
    with just that batch in the kernel, nothing passes between VMs, allowed or not; the full converge after
    it brings the policy back (the allowed ping works, the other does not)."""
    from hyperfence.ruleset.closed import fail_closed
    from hyperfence.ruleset.ir import Ruleset

    lab.apply([PING_1_2])
    assert lab.engine is not None and lab.engine.current is not None
    assert lab.ping("vm1", "vm2")[0] == 2 and lab.ping("vm3", "vm2")[0] == 0
    assert lab.run("host", ["nft", "flush", "ruleset"]).returncode == 0
    assert lab.ping("vm3", "vm2")[0] == 2  # the hole a flush opens (the control)
    closing = fail_closed(lab.engine.current.ruleset, Ruleset((), (), (), ()))
    assert closing is not None
    lab.engine.nft.apply(closing.batch())
    assert lab.ping("vm1", "vm2")[0] == 0 and lab.ping("vm3", "vm2")[0] == 0
    _, result = lab.engine.converge(full=True)
    assert result is not None and result.drift
    assert lab.ping("vm1", "vm2")[0] == 2 and lab.ping("vm3", "vm2")[0] == 0
    assert lab.run("host", ["nft", "list", "ruleset"]).stdout.count(b"sys:closed") == 0
