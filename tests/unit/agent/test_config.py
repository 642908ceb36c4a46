"""The agent config: every channel type, defaults, and errors that name the field, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hyperfence.agent.config import (
    DEFAULT_AUTH_LOGS,
    Config,
    ConfigError,
    TlsChannel,
    UnixChannel,
    VirtioChannel,
    load_config,
)

KEY_HEX = "ab" * 32


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def doc(**over: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "vm": "vm-1",
        "key": KEY_HEX,
        "channel": {"type": "unix", "path": "/run/x.sock"},
        **over,
    }


def test_a_minimal_config_takes_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, doc()))
    assert config == Config(vm="vm-1", key=bytes.fromhex(KEY_HEX), channel=UnixChannel("/run/x.sock"))
    assert (config.interval, config.backlog, config.state, config.auth_logs) == (
        1.0,
        600,
        None,
        DEFAULT_AUTH_LOGS,
    )


def test_every_field(tmp_path: Path) -> None:
    full = doc(
        interval=0.5,
        state="/var/lib/hf/state",
        backlog=10,
        auth_logs=[],
        channel={"type": "tls", "host": "10.0.0.1", "port": 7000, "ca": "/etc/ca.pem", "server_name": "hf"},
    )
    config = load_config(write(tmp_path, full))
    assert config.channel == TlsChannel(host="10.0.0.1", port=7000, ca="/etc/ca.pem", server_name="hf")
    assert (config.interval, config.state, config.backlog, config.auth_logs) == (
        0.5,
        "/var/lib/hf/state",
        10,
        (),
    )


def test_channel_defaults(tmp_path: Path) -> None:
    virtio = load_config(write(tmp_path, doc(channel={"type": "virtio"})))
    assert virtio.channel == VirtioChannel("org.hyperfence.agent.0")
    tls = load_config(write(tmp_path, doc(channel={"type": "tls", "host": "hf.example", "ca": "/ca.pem"})))
    assert tls.channel == TlsChannel(host="hf.example", port=7474, ca="/ca.pem", server_name="hf.example")


def test_every_problem_is_reported_at_once_and_the_key_is_never_echoed(tmp_path: Path) -> None:
    bad = doc(
        version=2,
        key="zz" + "ab" * 31,
        interval=0,
        backlog=-1,
        colour="red",
        channel={"type": "tls", "port": 0},
    )
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad))
    text = str(err.value)
    for expected in (
        "version: 2 (expected 1",
        "key: not hexadecimal",
        "interval: 0 (expected seconds",
        "backlog: -1 (expected an integer from 1",
        "colour: unknown field",
        "channel.host: missing",
        "channel.port: 0",
        "channel.ca: missing",
    ):
        assert expected in text
    assert "zzab" not in text


def test_a_short_key_says_how_long_it_must_be(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key: 16 bytes \(expected 64 hex digits"):
        load_config(write(tmp_path, doc(key="ab" * 16)))


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        (None, "channel: missing"),
        ({"type": "vsock"}, "channel.type: 'vsock' (expected unix, virtio or tls)"),
        ({"type": "unix", "path": "relative.sock"}, "expected an absolute path"),
        ({"type": "virtio", "name": "x", "path": "/p"}, "channel.path: unknown field for a virtio channel"),
    ],
)
def test_bad_channels(tmp_path: Path, channel: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, doc(channel=channel)))
    assert message in str(err.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the config.*hyperfence vm enroll"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="a JSON list"):
        load_config(write(tmp_path, [1]))
    with pytest.raises(ConfigError, match="auth_logs: 'x'"):
        load_config(write(tmp_path, doc(auth_logs="x")))
