"""The agent's loop: in-process with a fake clock (seqs, dropped counts, collector errors) and as a real
process from the built zipapp against a receiver that verifies every frame."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfence.agent.build import build_zipapp
from hyperfence.agent.channel import UnixTransport
from hyperfence.agent.config import Config, UnixChannel
from hyperfence.agent.main import SEQ_RESERVE, Agent, SeqStore
from tests.unit.agent.fake_proc import FakeProc, sock_line
from tests.unit.agent.receiver import KEY, VM, FakeClock, Receiver


def python39() -> str | None:
    """A Python 3.9 to run the zipapp with (the oldest the agent supports), if this machine has one."""
    found = shutil.which("python3.9")
    candidates = glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))
    for exe in [*candidates, *([found] if found else [])]:
        if subprocess.run([exe, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return exe
    return None


GUEST_PYTHON = python39() or sys.executable


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(unix_path=tmp_path / "vm.sock").start()
    yield r
    r.stop()


def config(path: Path, **over: Any) -> Config:
    fields: dict[str, Any] = {
        "vm": VM,
        "key": KEY,
        "channel": UnixChannel(str(path)),
        "auth_logs": (),
        **over,
    }
    return Config(**fields)


def test_hello_beats_and_bye_in_process(tmp_path: Path, receiver: Receiver) -> None:
    fake = FakeProc(tmp_path / "root")
    fake.sockets(tcp=[sock_line("0.0.0.0", 22, "0.0.0.0", 0, state=0x0A, inode=100)], udp=[])
    clock = FakeClock()
    assert receiver.unix_path is not None
    agent = Agent(
        config(receiver.unix_path),
        clock=clock,
        transport=UnixTransport(str(receiver.unix_path)),
        root=str(fake.root),
    )
    agent.hello()
    clock.advance(1.0)
    fake.stat(user=200, system=100, idle=900, iowait=50)
    agent.beat()
    clock.advance(1.0)
    agent.beat()
    agent.stop_reason = "SIGTERM"
    agent.bye(agent.stop_reason)
    msgs = receiver.wait_for(lambda m: len(m) == 4)
    assert [m["kind"] for m in msgs] == ["hello", "beat", "beat", "bye"]
    assert msgs[0]["data"]["boot"] == "0f0e0d0c-0000-4000-8000-000000000001"
    assert msgs[0]["data"]["interval"] == 1.0
    first, second = msgs[1]["data"], msgs[2]["data"]
    assert first["res"]["cpu"] == 60.0 and first["res"]["dt"] == 1.0
    assert first["events"] == [
        {
            "type": "listen",
            "proto": "tcp",
            "addr": "0.0.0.0",
            "port": 22,
            "uid": 0,
            "pid": None,
            "comm": None,
            "exe": None,
            "initial": True,
        }
    ]
    assert second["events"] == [] and second["dropped"] == 0
    assert msgs[3]["data"] == {"reason": "SIGTERM"}
    assert [m["t"] for m in msgs] == [clock.wall - 2, clock.wall - 1, clock.wall, clock.wall]


def test_the_run_loop_stops_on_its_event_and_says_bye(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock()
    assert receiver.unix_path is not None
    agent = Agent(
        config(receiver.unix_path, interval=0.5),
        clock=clock,
        transport=UnixTransport(str(receiver.unix_path)),
    )
    original = agent.beat

    def beat_then_stop() -> None:
        original()
        if agent.beats == 3:
            agent.stop.set()

    agent.beat = beat_then_stop  # type: ignore[method-assign]
    agent.run()
    assert receiver.wait_for(lambda m: len(m) == 5) and receiver.kinds() == [
        "hello",
        "beat",
        "beat",
        "beat",
        "bye",
    ]
    assert clock.mono == pytest.approx(1001.5)


def test_frames_dropped_while_down_are_counted_in_the_next_beat(tmp_path: Path, receiver: Receiver) -> None:
    clock = FakeClock()
    assert receiver.unix_path is not None
    agent = Agent(
        config(receiver.unix_path, backlog=3), clock=clock, transport=UnixTransport(str(receiver.unix_path))
    )
    agent.hello()
    receiver.wait_for(lambda m: len(m) == 1)
    receiver.stop()
    for _ in range(6):  # 6 beats, backlog 3: 3 dropped (the count rides in later beats)
        clock.advance(1.0)
        agent.beat()
    receiver.start()
    clock.advance(30.0)  # past any backoff
    agent.beat()
    msgs = receiver.wait_for(lambda m: len(m) == 4)
    beats = [m["data"] for m in msgs[1:]]
    assert sum(b["dropped"] for b in beats) == 3 and beats[-1]["dropped_total"] == 3
    assert receiver.errors == []
    agent.channel.close()


def test_a_failing_collector_is_an_event_at_most_once_a_minute(tmp_path: Path, receiver: Receiver) -> None:
    fake = FakeProc(tmp_path / "root")
    (fake.root / "proc/meminfo").unlink()
    clock = FakeClock()
    assert receiver.unix_path is not None
    agent = Agent(
        config(receiver.unix_path),
        clock=clock,
        transport=UnixTransport(str(receiver.unix_path)),
        root=str(fake.root),
    )
    agent.hello()
    for _ in range(61):
        clock.advance(1.0)
        agent.beat()
    msgs = receiver.wait_for(lambda m: len(m) == 62)
    flagged = [
        i for i, m in enumerate(msgs[1:]) if any(e["type"] == "collector_error" for e in m["data"]["events"])
    ]
    assert flagged == [0, 60]
    event = next(e for e in msgs[1]["data"]["events"] if e["type"] == "collector_error")
    assert event["what"] == "mem" and "FileNotFoundError" in event["error"]
    assert all("mem" not in m["data"]["res"] and "cpu" in m["data"]["res"] for m in msgs[1:])
    agent.channel.close()


def test_seqs_never_repeat_across_restarts_even_if_the_clock_goes_back(tmp_path: Path) -> None:
    state = str(tmp_path / "state" / "seq.json")
    first = SeqStore(state)
    used = [first.next(1_700_000_000.0 + i) for i in range(5)]
    assert used == sorted(set(used))
    assert json.loads(Path(state).read_text())["seq"] == used[0] + SEQ_RESERVE
    second = SeqStore(state)  # restarted with the clock an hour behind
    assert second.next(1_700_000_000.0 - 3600) > used[-1]
    assert SeqStore(None).next(1_700_000_000.0 - 3600) < used[-1]  # (without a state file it would repeat)


def agent_config(tmp_path: Path, sock: Path, *, interval: float = 0.2) -> Path:
    doc = {
        "version": 1,
        "vm": VM,
        "key": KEY.hex(),
        "interval": interval,
        "channel": {"type": "unix", "path": str(sock)},
        "state": str(tmp_path / "agent-state.json"),
        "auth_logs": [],
    }
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def start_agent(app: Path, cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([GUEST_PYTHON, str(app), "--config", str(cfg)], stderr=subprocess.PIPE, text=True)


def stop_agent(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_the_zipapp_as_a_process(tmp_path: Path, receiver: Receiver) -> None:
    assert receiver.unix_path is not None
    app = build_zipapp(tmp_path / "hyperfence-agent.pyz")
    cfg = agent_config(tmp_path, receiver.unix_path)
    proc = start_agent(app, cfg)
    try:
        msgs = receiver.wait_for(lambda m: sum(x["kind"] == "beat" for x in m) >= 3)
        assert msgs[0]["kind"] == "hello" and msgs[0]["data"]["pid"] == proc.pid
        assert msgs[0]["data"]["python"].startswith(
            subprocess.check_output(
                [GUEST_PYTHON, "-c", "import platform; print(platform.python_version())"], text=True
            ).strip()
        )
        res = msgs[1]["data"]["res"]
        assert {"cpu", "mem", "load", "disk", "net", "tcp", "udp", "procs", "uptime"} <= set(res)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]

            def listened(ms: list[dict[str, Any]]) -> bool:
                return any(
                    e["type"] == "listen" and e["port"] == port
                    for m in ms
                    if m["kind"] == "beat"
                    for e in m["data"]["events"]
                )

            msgs = receiver.wait_for(listened)
        (event,) = [
            e for m in msgs if m["kind"] == "beat" for e in m["data"]["events"] if e.get("port") == port
        ]
        assert event["pid"] == os.getpid() and "initial" not in event
        err = stop_agent(proc)
        assert proc.returncode == 0, err
        msgs = receiver.wait_for(lambda m: m[-1]["kind"] == "bye")
        assert msgs[-1]["data"] == {"reason": "SIGTERM"}
        last_seq = msgs[-1]["seq"]

        proc = start_agent(
            app, cfg
        )  # a restart: seqs continue above the last run's (the receiver checks too)
        msgs = receiver.wait_for(lambda m: m[-1]["kind"] == "beat" and len(m) > len(msgs) + 1)
        restarted = [m for m in msgs if m["seq"] > last_seq]
        assert restarted[0]["kind"] == "hello"
        assert receiver.errors == []
        assert "Traceback" not in err
    finally:
        stop_agent(proc)


def test_a_bad_config_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    app = build_zipapp(tmp_path / "a.pyz")
    (tmp_path / "bad.json").write_text('{"version": 1, "vm": "x", "key": "00"}', encoding="utf-8")
    done = subprocess.run(
        [GUEST_PYTHON, str(app), "--config", str(tmp_path / "bad.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert (
        "key: 1 bytes" in done.stderr and "channel: missing" in done.stderr and "Traceback" not in done.stderr
    )
