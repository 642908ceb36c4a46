"""`hyperfence vm enroll|list|events` against a real store (no daemon, no kernel)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hyperfence import errors
from hyperfence.agent.config import load_config
from hyperfence.cli.main import app
from hyperfence.cli.vm import fw_cfg_dir
from hyperfence.health.tracker import AgentRecord
from hyperfence.reconcile.conntrack import VmConnections
from hyperfence.reconcile.engine import Engine
from tests.unit.policy.test_parse import doc

runner = CliRunner()


def store_policy(state: Path, **extra: object) -> None:
    engine = Engine(netns=None, state_dir=str(state))
    engine.store_policy(doc(**extra), source="test")
    engine.close()


def test_enroll_writes_a_config_the_agent_accepts(tmp_path: Path) -> None:
    store_policy(tmp_path, heartbeats=[{"vms": "vms", "interval": 2}])
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "agents" / "vm1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_config(str(path))
    assert config.interval == 2.0
    raw = json.loads(path.read_text())
    assert raw["channel"]["type"] == "unix" and len(raw["key"]) == 64
    engine = Engine(netns=None, state_dir=str(tmp_path))
    assert engine.store.agents()[raw["vm"]].key.hex() == raw["key"]
    engine.close()
    again = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1"])
    assert again.exit_code == 0
    assert json.loads(path.read_text())["key"] != raw["key"]  # a new enrolment is a new key


def test_enroll_refuses_an_unknown_vm_and_a_tls_channel_without_endpoint(tmp_path: Path) -> None:
    store_policy(tmp_path)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "ghost"])
    assert isinstance(r.exception, errors.NotFoundError) and "ghost" in str(r.exception)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1", "--channel", "tls"])
    assert isinstance(r.exception, errors.InvalidInputError) and "agent_endpoint" in str(r.exception)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1", "--channel", "pigeon"])
    assert isinstance(r.exception, errors.InvalidInputError) and "pigeon" in str(r.exception)
    assert not (tmp_path / "agents" / "vm1.json").exists()


def test_enroll_tls_writes_the_ca_and_endpoint(tmp_path: Path) -> None:
    store_policy(tmp_path, settings={"agent_endpoint": "10.77.0.1:7474"})
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm2", "--channel", "tls"])
    assert r.exit_code == 0, r.output
    config = load_config(str(tmp_path / "agents" / "vm2.json"))
    raw = json.loads((tmp_path / "agents" / "vm2.json").read_text())
    assert raw["channel"] == {
        "type": "tls",
        "host": "10.77.0.1",
        "port": 7474,
        "ca": str(tmp_path / "tls" / "ca.pem"),
        "server_name": "10.77.0.1",
    }
    assert config.vm == raw["vm"]
    assert (tmp_path / "tls" / "server.pem").exists()
    assert stat.S_IMODE((tmp_path / "tls" / "server.key").stat().st_mode) == 0o600


def test_list_without_a_daemon_reads_the_store(tmp_path: Path) -> None:
    store_policy(tmp_path)
    runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1"])
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output.strip().splitlines()[0])
    assert row["status"] == "daemon not running" and row["isolated"] is None
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "events", "vm1"])
    assert r.exit_code == 0 and r.output == ""


def test_what_a_guest_chose_is_printed_as_text_never_as_markup_or_control(tmp_path: Path) -> None:
    """A guest names a process `[/x]` (rich markup that would raise), sends terminal escapes in its event
    type and agent version: `vm events` and `vm list` print them escaped, exit 0, and show no traceback."""
    import subprocess
    import sys
    import time

    from hyperfence import wire
    from hyperfence.reconcile.agents import AgentMonitor

    store_policy(tmp_path)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "agents" / "vm1.json").read_text())
    key, vm = bytes.fromhex(config["key"]), config["vm"]
    engine = Engine(netns=None, state_dir=str(tmp_path))
    monitor = AgentMonitor(engine)
    now = time.time()
    hello = wire.message(vm, 1, "hello", {"agent": "[bold]1.0\x1b]0;pwned\x07"}, now)
    event = {"type": "listen\x1b[2J[/x]", "comm": "[/x]", "exe": "[red]sshd\nFAKE LINE", "port": 22}
    beat = wire.message(vm, 2, "beat", {"res": {}, "events": [event]}, now)
    for body in (hello, beat):
        monitor._on_frame(vm, wire.encode(key, body)[4:])
    monitor.save()
    monitor.hub.close()
    engine.close()

    cli = [os.path.join(os.path.dirname(sys.executable), "hyperfence"), "--state-dir", str(tmp_path), "vm"]
    shown = subprocess.run([*cli, "events", "vm1"], check=False, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "agent:listen\\x1b[2J[/x]" in shown.stdout  # the kind, escaped, its markup as text
    assert '"comm": "[/x]"' in shown.stdout and "FAKE LINE" in shown.stdout
    assert "\x1b" not in shown.stdout and "\nFAKE" not in shown.stdout
    listed = subprocess.run(
        [*cli, "list"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert listed.returncode == 0, listed.stderr
    assert "[bold]1.0\\x1b]0;pwned\\x07" in listed.stdout and "\x1b" not in listed.stdout


# --- --fw-cfg: where QEMU can read the config ---------------------------------------------------------


def test_fw_cfg_configs_have_a_directory_of_their_own_beside_the_state_directory(tmp_path: Path) -> None:
    assert fw_cfg_dir("/var/lib/hyperfence") == Path("/var/lib/hyperfence-fw-cfg")
    assert fw_cfg_dir(str(tmp_path / "state") + "/") == tmp_path / "state-fw-cfg"


def test_list_shows_every_vm_of_the_policy_with_its_connections(tmp_path: Path, monkeypatch: Any) -> None:
    store_policy(tmp_path, limits=[{"vms": "vm:vm1", "connections": 300}])
    runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "enroll", "vm1"])
    seen: dict[str, Any] = {}

    def fake_read(resolved: Any, *, netns: str | None) -> tuple[dict[str, VmConnections], list[str]]:
        seen["netns"] = netns
        caps = {vp.vm.id: vp.connection_cap.connections for vp in resolved.vms}
        vm1, vm2 = (vp.vm.id for vp in resolved.vms)
        return (
            {vm1: VmConnections(caps[vm1], 300, 1234), vm2: VmConnections(caps[vm2], None, 0)},
            ["tracked connections unavailable: [bold]no[/bold]"],
        )

    monkeypatch.setattr("hyperfence.cli.vm.read_vm_connections", fake_read)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows["vm1"]["connections"] == {"cap": 300, "tracked": 300, "cap_drops": 1234}
    assert rows["vm2"]["status"] == "no agent"  # not enrolled, listed all the same
    assert rows["vm2"]["connections"] == {"cap": 16384, "tracked": None, "cap_drops": 0}
    assert "tracked connections unavailable" in r.stderr and seen["netns"] is None
    monkeypatch.setattr("hyperfence.cli.vm.out", Console(width=200, markup=False))  # no wrapped cells
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list"])
    assert r.exit_code == 0, r.output
    assert "300 / 300" in r.stdout and "1234" in r.stdout and "? / 16384" in r.stdout
    assert "[bold]no[/bold]" in r.stderr  # printed as text, never as markup


def test_events_of_a_vm_out_of_the_policy_are_found_by_its_domain_name(tmp_path: Path) -> None:
    """A libvirt VM that lost its address is not in the policy any more: its events are still shown, by the
    domain name the inventory recorded them with, or by its id."""
    store_policy(tmp_path)
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store.add_event("address-lost", {"domain": "web1", "was": ["10.77.0.21"]}, vm="uuid-web1")
    engine.store.add_event("isolated", {"reason": "silent"}, vm="uuid-web1")
    engine.close()
    for name in ("web1", "uuid-web1"):
        r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "events", name])
        assert r.exit_code == 0, (r.output, r.exception)
        assert "address-lost" in r.output and "10.77.0.21" in r.output and "isolated" in r.output
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "events", "ghost"])
    assert isinstance(r.exception, errors.NotFoundError)
    assert "neither in the policy nor enrolled" in str(r.exception)
    assert "no events are recorded" in str(r.exception)


def test_vm_label_refuses_bad_input_before_touching_libvirt(tmp_path: Path) -> None:
    nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    argv = [
        "vm",
        "label",
        "web1",
        "tier=web",
        "bad label=x",
        "novalue",
        "--remove",
        "a b",
        "--ip",
        "10.0.0.300",
    ]
    r = runner.invoke(app, ["--state-dir", str(tmp_path), *argv, "--libvirt", nowhere])
    assert isinstance(r.exception, errors.InvalidInputError), r.output
    text = str(r.exception)
    for found in (
        "labels[1]: 'bad label=x'",
        "labels[2]: 'novalue'",
        "--remove: 'a b'",
        "--ip: '10.0.0.300'",
    ):
        assert found in text
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "label", "web1", "--libvirt", nowhere])
    assert isinstance(r.exception, errors.TemporaryError)  # valid input: now libvirt is asked


def test_list_and_events_show_learned_addresses_and_their_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from ipaddress import IPv4Address

    from hyperfence.model.lease import Lease
    from tests.unit.policy.test_parse import BASE

    learner = {"name": "vm3", "port": "vp3", "mac": "02:77:00:00:00:0d"}
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store_policy(doc(vms=[*BASE["vms"], learner]), source="test")
    ends = time.time() + 1800
    engine.store.save_leases((Lease("vm3", learner["mac"], IPv4Address("10.77.0.13"), ends, ends - 3600),))
    engine.store.add_event(
        "lease-learned", {"ip": "10.77.0.13", "expires": "2030-01-01T00:00:00+00:00"}, vm="vm3"
    )
    engine.close()
    monkeypatch.setattr("hyperfence.cli.vm.read_vm_connections", lambda resolved, *, netns: ({}, []))
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows["vm3"]["learned"] == [{"ip": "10.77.0.13", "expires": ends, "server": None}]
    assert "learned" not in rows["vm1"]  # it declares its addresses
    monkeypatch.setattr("hyperfence.cli.vm.out", Console(width=300, markup=False))
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list"])
    assert r.exit_code == 0, r.output
    assert "10.77.0.13 until" in r.stdout and "(30 min)" in r.stdout
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "events", "vm3"])
    assert r.exit_code == 0 and "lease-learned" in r.output and "10.77.0.13" in r.output


def test_list_on_a_narrow_terminal_folds_ids_and_never_cuts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an 80-column terminal the ten columns do not fit: a VM's UUID is folded onto more lines of its
    cell, every character of it still there (cut, it would end in `…` and no longer name the VM)."""
    from hyperfence.cli.output import table

    store_policy(tmp_path)
    uuid = "13f98949-f4a7-4def-8935-e872a363f62c"
    engine = Engine(netns=None, state_dir=str(tmp_path))
    engine.store.enroll_agent(AgentRecord(vm=uuid, key=b"k" * 32))
    engine.close()
    monkeypatch.setattr("hyperfence.cli.vm.read_vm_connections", lambda *_a, **_k: ({}, []))
    terminal = Console(width=80, force_terminal=True, color_system=None, markup=False, soft_wrap=True)
    monkeypatch.setattr("hyperfence.cli.vm.out", terminal)
    with terminal.capture() as captured:
        r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list"])
    assert r.exit_code == 0, r.output
    text = captured.get()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    # the id column (the second) of the first row's lines, read top to bottom, is the whole UUID
    body = [line for line in text.splitlines() if line.startswith("│")]
    # a row's first line is the one with its state ("-"); the lines up to the next row's are its own
    first_row = body[: next(i for i, line in enumerate(body[1:], 1) if line.split("│")[3].strip())]
    assert "".join(line.split("│")[2].strip() for line in first_row) == uuid
    assert table("a").columns[0].overflow == "fold"
