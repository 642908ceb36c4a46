"""The firewall against the real kernel: lab namespaces, real packets, real nftables."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hyperfence.errors import KernelError
from hyperfence.lab import topology
from hyperfence.lab.experiment import run_experiment
from hyperfence.lab.session import LabSession
from hyperfence.ruleset.compile import TABLES, vm_sid
from hyperfence.ruleset.readback import rule_counters

pytestmark = pytest.mark.kernel

PING_1_2 = {"id": "ping", "from": "vm:vm1", "to": "vm:vm2", "protocol": "icmp"}
UDP_2_1 = {"id": "udp5000", "from": "vm:vm2", "to": "vm:vm1", "protocol": "udp", "ports": [5000]}


@pytest.fixture
def lab(tmp_path: object) -> Iterator[LabSession]:
    name = "f" + secrets.token_hex(3)
    with LabSession(name, 3, state_dir=os.path.join(str(tmp_path), "state")) as s:
        yield s


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


def _udp_count(lab: LabSession, vm: str, port: int, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        "import socket,time,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',%d))\n"
        "s.settimeout(0.2);n=0;end=time.time()+%f\nprint('ready',flush=True)\nwhile time.time()<end:\n"
        " try:\n  d=s.recv(2048);n+=b'FORGED' in d\n except OSError: pass\nprint(n,flush=True)\n"
        % (port, seconds)
    )
    p = topology.popen_in_vm(lab.plan, vm, [sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


def _scapy(lab: LabSession, vm: str, script: str) -> None:
    r = lab.run(vm, [sys.executable, "-c", "from scapy.all import *\n" + script], timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def test_spoofed_source_ip_mac_and_arp_are_dropped(lab: LabSession) -> None:
    lab.apply([UDP_2_1, PING_1_2])
    vm1, vm2, vm3 = lab.plan.vms
    listener = _udp_count(lab, "vm1", 5000, 3.0)
    # vm3 forges vm2's IP (with its own MAC, then with vm2's MAC): vm1 allows UDP 5000 from vm2 only.
    _scapy(
        lab,
        "vm3",
        f"sendp(Ether(src='{vm3.mac}', dst='{vm1.mac}')/IP(src='{vm2.ip}', dst='{vm1.ip}')/"
        f"UDP(sport=4000, dport=5000)/Raw(b'FORGED'), iface='eth0', count=3, verbose=0)\n"
        f"sendp(Ether(src='{vm2.mac}', dst='{vm1.mac}')/IP(src='{vm2.ip}', dst='{vm1.ip}')/"
        f"UDP(sport=4000, dport=5000)/Raw(b'FORGED'), iface='eth0', count=3, verbose=0)\n"
        f"sendp(Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/ARP(op=2, hwsrc='{vm3.mac}', "
        f"psrc='{vm2.ip}', pdst='{vm1.ip}'), iface='eth0', count=3, verbose=0)",
    )
    # the control: vm2 itself sends the same datagram and it arrives
    _scapy(
        lab,
        "vm2",
        f"sendp(Ether(src='{vm2.mac}', dst='{vm1.mac}')/IP(src='{vm2.ip}', dst='{vm1.ip}')/"
        f"UDP(sport=4000, dport=5000)/Raw(b'FORGED'), iface='eth0', count=2, verbose=0)",
    )
    out, _ = listener.communicate(timeout=10)
    assert int(out.split()[-1]) == 2  # only vm2's two genuine datagrams
    assert counter(lab, "guard", "sys:spoof") >= 9
    neigh = lab.run("vm1", ["ip", "neigh", "show", str(vm2.ip)]).stdout.decode()
    assert vm3.mac not in neigh  # the forged ARP reply did not poison vm1


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


def test_daemon_kill_9_changes_nothing_and_restart_writes_nothing(lab: LabSession) -> None:
    lab.apply([PING_1_2])
    hf = [sys.executable, "-m", "hyperfence", "--netns", lab.plan.host_netns, "--state-dir", lab.state_dir]

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*hf, "daemon", "--resync", "3600"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(lab.state_dir, "daemon.sock")):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return p

    daemon = start()
    try:
        monitor_out = open(os.path.join(lab.state_dir, "monitor.txt"), "wb")  # noqa: SIM115
        monitor = topology.popen_in_host(lab.plan, ["nft", "monitor"], stdout=monitor_out)
        time.sleep(0.3)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        assert lab.ping("vm1", "vm2")[0] == 2
        assert lab.ping("vm3", "vm2")[0] == 0
        daemon = start()
        time.sleep(1.0)  # its first converge (a full read) has run by now
        monitor_out.flush()
        assert os.path.getsize(monitor_out.name) == 0  # the restart wrote nothing to the kernel
        assert lab.ping("vm1", "vm2")[0] == 2
        lab.apply([PING_1_2, UDP_2_1])  # the control: a real change is seen by the monitor
        time.sleep(0.5)
        topology.stop_process(monitor)
        monitor_out.close()
        assert os.path.getsize(monitor_out.name) > 0
    finally:
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
    """Labels, IP sets, CIDRs, host, priorities, ICMP types and IP protocol numbers, and what stays denied:
    broadcast, multicast, IPv6 and other ethertypes."""
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
    listener = _udp_count(lab, "vm1", 9999, 3.0)
    vm1, _, vm3 = lab.plan.vms
    _scapy(
        lab,
        "vm3",
        f"sendp(Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/IP(src='{vm3.ip}', "
        f"dst='10.77.3.255')/UDP(sport=9999, dport=9999)/Raw(b'FORGED'), iface='eth0', count=3, "
        f"verbose=0)\n"
        f"sendp(Ether(src='{vm3.mac}', dst='01:00:5e:01:01:01')/IP(src='{vm3.ip}', "
        f"dst='239.1.1.1')/UDP(sport=9999, dport=9999)/Raw(b'FORGED'), iface='eth0', count=3, "
        f"verbose=0)\n"
        f"sendp(Ether(src='{vm3.mac}', dst='{vm1.mac}', type=0x88b5)/Raw(b'FORGED'*10), "
        f"iface='eth0', count=3, verbose=0)\n"
        f"sendp(Ether(src='{vm3.mac}', dst='{vm1.mac}')/IPv6(src='fe80::1', dst='fe80::2')/"
        f"UDP(sport=9999, dport=9999)/Raw(b'FORGED'), iface='eth0', count=3, verbose=0)",
    )
    out, _ = listener.communicate(timeout=10)
    assert int(out.split()[-1]) == 0
    # the control: without hyperfence's tables the same broadcast does arrive
    for t in ("bridge", "inet", "netdev"):
        lab.run("host", ["nft", "delete", "table", t, "hyperfence"])
    listener = _udp_count(lab, "vm1", 9999, 2.0)
    _scapy(
        lab,
        "vm3",
        f"sendp(Ether(src='{vm3.mac}', dst='ff:ff:ff:ff:ff:ff')/IP(src='{vm3.ip}', "
        f"dst='10.77.3.255')/UDP(sport=9999, dport=9999)/Raw(b'FORGED'), iface='eth0', count=3, "
        f"verbose=0)",
    )
    out, _ = listener.communicate(timeout=10)
    assert int(out.split()[-1]) == 3


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
    import json
    import threading

    from hyperfence.reconcile.traffic import TRAFFIC_FILE, run_traffic_log

    lab.apply([{**PING_1_2, "log": True}])
    assert lab.engine is not None
    stop = threading.Event()
    reader = threading.Thread(target=run_traffic_log, args=(lab.engine, stop), daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
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
    finally:
        stop.set()
        reader.join(timeout=5)
    with open(os.path.join(lab.state_dir, TRAFFIC_FILE), encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    allowed = [e for e in events if e["rule"] == "ping" and e["verdict"] == "allow"]
    assert {(e["vm"], e["direction"]) for e in allowed} == {("vm1", "out"), ("vm2", "in")}
    assert allowed[0]["protocol"] == "icmp" and allowed[0]["src"] == str(lab.plan.vms[0].ip)
    flood = [e for e in events if e["vm"] == "vm3" and e["verdict"] == "deny" and e.get("dport") == 4321]
    # vm3's egress default deny logs at 10/s with a burst of 20: the flood of 1,000 yields a few dozen events
    assert 1 <= len(flood) <= 60, len(flood)
    assert flood[0]["rule"] == "sys:default-deny"
