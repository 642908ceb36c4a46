"""`hyperfence policy check`, `policy apply` and `daemon` options, run as the real command: what a person
typing them sees (exit code, the exact located messages on stderr), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hyperfence.adapters.store import Store
from hyperfence.model.kernel import FLAVOUR_ENV

HYPERFENCE = os.path.join(os.path.dirname(sys.executable), "hyperfence")

POLICY = """\
networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]
vms:
  - {name: web, port: vp1, mac: 52:54:00:zz:00:01, ips: [10.77.0.11]}
  - {name: db, port: vp2, mac: 52:54:00:00:00:02, ips: [10.77.0.12]}
rules:
  - {from: vm:web, to: vm:db, protocol: tcp, ports: [5432]}
  - {from: vm:db, to: [vm:ghost, "[/x]"], protocol: bogus, ports: [80-70], priority: x}
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HYPERFENCE, "--state-dir", str(cwd / "state"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_policy_check_lists_each_mistake_once_on_its_own_line(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    r = run("policy", "check", "p.yaml", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [
        "error: p.yaml has 6 problem(s)",
        "  vms[0].mac: '52:54:00:zz:00:01' is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)",
        "  rules[1].priority: Input should be a valid integer (got 'x')",
        "  rules[1].to[0]: VM 'ghost' is not declared (expected one of: db)",
        "  rules[1].to[1]: '[/x]' is not a selector (expected vm:NAME, label:KEY=VALUE, vms, ipset:NAME, a CIDR "
        "(10.0.0.0/24), a range (10.0.0.5-10.0.0.9), an address, host, outside or any)",
        "  rules[1].ports[0]: range 80-70 is reversed (expected 70-80)",
        "  rules[1].protocol: 'bogus' is not a protocol (expected tcp, udp, icmp, arp, dhcp, dhcp-server, any, "
        "a number 0-255 or one of igmp, gre, esp, ah, sctp)",
    ]
    # policy apply refuses the same file with the same list, before it touches the store or the kernel
    r = run("policy", "apply", "p.yaml", cwd=tmp_path)
    assert (
        r.returncode == 2
        and r.stderr.splitlines()[1:]
        == run("policy", "check", "p.yaml", cwd=tmp_path).stderr.splitlines()[1:]
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"networks": ' + "[" * 100_000 + "]" * 100_000 + "}",
            [
                "error: p.yaml is nested too deeply",
                "  line 1 column 45: more than 32 nested lists or mappings (expected at most 32; a policy needs 5)",
            ],
        ),
        (
            "networks:\n" + "".join("  " * i + "-\n" for i in range(1, 3000)),
            [
                "error: p.yaml is nested too deeply",
                "  line 33 column 65: more than 32 nested lists or mappings (expected at most 32; a policy needs 5)",
            ],
        ),
        (
            b"networks: [\xff]",
            ["error: p.yaml is not UTF-8 text", "  line 1 column 12: byte 0xff is not UTF-8 (expected text)"],
        ),
        (
            "a: &a [*a]",
            [
                "error: p.yaml is not a policy",
                "  line 1 column 8: alias *a is inside its own anchor &a (expected no recursive aliases)",
            ],
        ),
    ],
    ids=["deep-json", "deep-yaml", "not-utf8", "recursive-alias"],
)
def test_documents_past_a_limit_get_a_located_error(
    tmp_path: Path, content: str | bytes, expected: list[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = run("policy", "check", "p.yaml", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (2, expected)


def test_an_endless_file_is_refused_after_64_mib(tmp_path: Path) -> None:
    r = run("policy", "check", "/dev/zero", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (
        2,
        [
            "error: /dev/zero is larger than 64 MiB (67,108,864 bytes), the most a policy may be (expected a "
            "smaller file: write long address lists as CIDRs and ranges)"
        ],
    )


def test_a_good_policy_checks_ok_and_usage_mistakes_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.split("rules:", maxsplit=1)[0].replace("zz", "00"))
    r = run("policy", "check", "p.yaml", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("p.yaml: ok — 2 VMs, 0 rules, 0 IP sets -> ")
    r = run("policy", "check", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (2, "Error: Missing argument 'file'.")
    r = run("policy", "chek", "p.yaml", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()[-1]) == (
        2,
        "Error: No such command 'chek'. Did you mean 'check'?",
    )


@pytest.mark.parametrize(
    ("option", "value", "example"),
    [
        ("--poll", "0", "0.2"),
        ("--poll", "-0.5", "0.2"),
        ("--resync", "-1", "10"),
        ("--resync", "nan", "10"),
        ("--poll", "1e308", "0.2"),
    ],
)
def test_daemon_refuses_intervals_that_are_not_above_zero(
    tmp_path: Path, option: str, value: str, example: str
) -> None:
    r = run("daemon", option, value, cwd=tmp_path)
    shown = f"{float(value):g}"
    assert (r.returncode, r.stderr.splitlines()) == (
        2,
        [
            f"error: {option}: {shown} is not an interval in seconds (expected a number above 0 and at most 86400, e.g. {example})"
        ],
    )
    assert not (tmp_path / "state" / "daemon.pid").exists()  # refused before it started anything


def test_policy_show_names_a_generation_that_is_not_there(tmp_path: Path) -> None:
    from hyperfence.reconcile.engine import Engine
    from tests.unit.policy.test_parse import doc

    engine = Engine(netns=None, state_dir=str(tmp_path / "state"))
    engine.store_policy(doc(), source="test")
    engine.close()
    r = run("policy", "show", "--generation", "5", cwd=tmp_path)
    assert (r.returncode, r.stderr.splitlines()) == (
        3,
        ["error: --generation: there is no generation 5 (the latest is 1)"],
    )
    r = run("policy", "show", "--generation", "1", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("# generation 1 from test\n")


def test_can_asks_about_an_icmp_query_with_code_0_as_ping_sends_it(tmp_path: Path) -> None:
    """A rule for `icmp/8/0` allows what ping sends; `can` asks with code 0 unless told otherwise (found by
    the differential test: `can` asked with no code and answered denied)."""
    (tmp_path / "p.yaml").write_text(
        "networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]\n"
        "vms:\n"
        "  - {name: a, port: vp1, mac: '52:54:00:00:00:01', ips: [10.77.0.11]}\n"
        "  - {name: b, port: vp2, mac: '52:54:00:00:00:02', ips: [10.77.0.12]}\n"
        "rules:\n"
        "  - {id: echo, from: vm:a, to: vm:b, services: [icmp/8/0]}\n"
    )
    ok = run("can", "a", "b", "--policy", "p.yaml", cwd=tmp_path)
    assert ok.returncode == 0 and "allowed by echo" in ok.stdout, ok.stdout + ok.stderr
    other = run("can", "a", "b", "--icmp-code", "1", "--policy", "p.yaml", cwd=tmp_path)
    assert other.returncode == 1 and "denied" in other.stdout, other.stdout + other.stderr


def test_can_says_a_learning_vm_has_no_address_yet(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]\n"
        "vms:\n"
        "  - {name: a, port: vp1, mac: '52:54:00:00:00:01'}\n"
        "  - {name: b, port: vp2, mac: '52:54:00:00:00:02', ips: [10.77.0.12]}\n"
    )
    r = run("can", "b", "a", "--policy", "p.yaml", cwd=tmp_path)
    assert r.returncode == 3 and "VM a has no address yet" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr
    )


def test_can_answers_for_the_data_plane_forced_or_last_applied(tmp_path: Path) -> None:
    """A rejected VM on a network without a gateway: br_netfilter (the default) has no address there to
    answer from, bridge_native's bridge answers it. `can` asks the forced flavour, else the one last applied
    to the state dir's kernel (the store's `applied` event; a running daemon's status comes before it)."""
    (tmp_path / "p.yaml").write_text(
        "networks: [{name: lab, bridge: br0, subnet: 10.77.0.0/22}]\n"
        "vms:\n"
        "  - {name: a, port: vp1, mac: '52:54:00:00:00:01', ips: [10.77.0.11]}\n"
        "  - {name: b, port: vp2, mac: '52:54:00:00:00:02', ips: [10.77.0.12]}\n"
        "rules:\n"
        "  - {id: rej, from: vm:a, to: vm:b, services: [udp/53], action: reject}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != FLAVOUR_ENV}

    ask = ["can", "a", "b", "--port", "53/udp", "--policy", "p.yaml"]

    def answer(*extra: str) -> str:
        r = subprocess.run(
            [HYPERFENCE, "--state-dir", str(tmp_path / "state"), *extra, *ask],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**env, "COLUMNS": "200"},
        )
        assert r.returncode == 1, r.stdout + r.stderr
        return r.stdout

    native = "a egress: reject by rej (the sender gets ICMP port unreachable)"
    assert "no answer: the host has no address on the sender's network" in answer()
    assert native in answer("--flavour", "bridge_native")
    store = Store(str(tmp_path / "state"))
    store.add_event("applied", {"policy": "gen:1", "flavour": "bridge_native"})
    store.close()
    assert native in answer()
    assert "no answer" in answer("--flavour", "br_netfilter")
