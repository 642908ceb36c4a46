"""The agent's config: one JSON file, written on the host by `hyperfence vm enroll VM` and copied into the
guest (mode 0600: it holds the VM's key).

    {
      "version": 1,                       # this format; required
      "vm": "<vm id>",                    # the VM's stable id (libvirt UUID); required
      "key": "<64 hex digits>",           # the per-VM HMAC-SHA256 key, 32 bytes; required
      "interval": 1.0,                    # seconds between beats, 0.1 .. 3600; default 1.0
      "channel": {...},                   # required, one of:
          {"type": "virtio", "name": "org.hyperfence.agent.0"}          # libvirt guests (virtio-serial)
          {"type": "unix", "path": "/run/hyperfence/vm-1.sock"}         # lab VMs
          {"type": "tls", "host": "hf.example", "port": 7474,           # guests reached over the network
           "ca": "/etc/hyperfence/ca.pem", "server_name": "hf.example"} # server_name defaults to host
      "state": "/var/lib/hyperfence-agent/state",  # optional: where the last seq is kept across restarts
      "backlog": 600,                     # messages kept while the channel is down, 1 .. 100000; default 600
      "auth_logs": ["/var/log/auth.log", "/var/log/secure", "/var/log/messages"]   # default: these three
    }

The parsed config is a set of NamedTuples (not dataclasses: importing `dataclasses` costs the agent ~1 MB of
RSS). `load_config` reports every problem at once, each naming the field, the value and what was expected
(`ConfigError`). Unknown fields are refused too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple, Union

FORMAT_VERSION = 1
DEFAULT_AUTH_LOGS = ("/var/log/auth.log", "/var/log/secure", "/var/log/messages")
DEFAULT_VIRTIO_NAME = "org.hyperfence.agent.0"
DEFAULT_TLS_PORT = 7474


class ConfigError(Exception):
    """The config file cannot be used. The message lists every problem, one per line."""


class UnixChannel(NamedTuple):
    path: str


class VirtioChannel(NamedTuple):
    name: str


class TlsChannel(NamedTuple):
    host: str
    port: int
    ca: str
    server_name: str


ChannelConfig = Union[UnixChannel, VirtioChannel, TlsChannel]


class Config(NamedTuple):
    vm: str
    key: bytes
    channel: ChannelConfig
    interval: float = 1.0
    state: str | None = None
    backlog: int = 600
    auth_logs: tuple[str, ...] = DEFAULT_AUTH_LOGS


TOP_FIELDS = ("version", "vm", "key", "interval", "channel", "state", "backlog", "auth_logs")
CHANNEL_FIELDS = {
    "unix": ("type", "path"),
    "virtio": ("type", "name"),
    "tls": ("type", "host", "port", "ca", "server_name"),
}


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config in the file at `path`. Raises ConfigError (never another exception) naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the config ({e.strerror or e}); write it with `hyperfence vm enroll VM` on the host"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not UTF-8 text (expected the JSON written by `hyperfence vm enroll`)"
        ) from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    return parse_config(doc, source=str(path))


def parse_config(doc: Any, *, source: str = "config") -> Config:
    """The Config in a decoded JSON document. Raises ConfigError listing every problem."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a JSON {type(doc).__name__} (expected an object with vm, key, channel)")
    problems: list[str] = []
    for name in sorted(set(doc) - set(TOP_FIELDS)):
        problems.append(f"{name}: unknown field (expected only {', '.join(TOP_FIELDS)})")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        problems.append(f"version: {version!r} (expected {FORMAT_VERSION}; re-run `hyperfence vm enroll`)")
    vm = _text(doc, "vm", problems)
    key = _key(doc.get("key"), problems)
    interval = _number(doc, "interval", 1.0, (0.1, 3600.0), problems)
    backlog = _integer(doc, "backlog", 600, (1, 100_000), problems)
    state = None
    if doc.get("state") is not None:
        state = _text(doc, "state", problems)
    auth_logs = DEFAULT_AUTH_LOGS
    if "auth_logs" in doc:
        logs = doc["auth_logs"]
        if not isinstance(logs, list) or not all(isinstance(p, str) and p.startswith("/") for p in logs):
            problems.append(f"auth_logs: {_show(logs)} (expected a list of absolute paths, may be empty)")
        else:
            auth_logs = tuple(logs)
    channel = _channel(doc.get("channel"), problems)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    assert channel is not None  # noqa: S101 - no problems means a channel was parsed
    return Config(
        vm=vm, key=key, channel=channel, interval=interval, state=state, backlog=backlog, auth_logs=auth_logs
    )


def _channel(raw: Any, problems: list[str]) -> ChannelConfig | None:
    if not isinstance(raw, dict):
        problems.append(f"channel: {_show(raw)} (expected an object with a type: unix, virtio or tls)")
        return None
    kind = raw.get("type")
    if kind not in CHANNEL_FIELDS:
        problems.append(f"channel.type: {_show(kind)} (expected unix, virtio or tls)")
        return None
    before = len(problems)
    for name in sorted(set(raw) - set(CHANNEL_FIELDS[kind])):
        problems.append(
            f"channel.{name}: unknown field for a {kind} channel (expected {', '.join(CHANNEL_FIELDS[kind])})"
        )
    if kind == "unix":
        path = _text(raw, "path", problems, prefix="channel.")
        if path and not path.startswith("/"):
            problems.append(f"channel.path: {path!r} (expected an absolute path)")
        return UnixChannel(path=path) if len(problems) == before else None
    if kind == "virtio":
        name = DEFAULT_VIRTIO_NAME if "name" not in raw else _text(raw, "name", problems, prefix="channel.")
        return VirtioChannel(name=name) if len(problems) == before else None
    host = _text(raw, "host", problems, prefix="channel.")
    port = _integer(raw, "port", DEFAULT_TLS_PORT, (1, 65535), problems, prefix="channel.")
    ca = _text(raw, "ca", problems, prefix="channel.")
    server_name = host if "server_name" not in raw else _text(raw, "server_name", problems, prefix="channel.")
    if len(problems) != before:
        return None
    return TlsChannel(host=host, port=port, ca=ca, server_name=server_name)


def _key(raw: Any, problems: list[str]) -> bytes:
    expected = "expected 64 hex digits: the 32-byte key from `hyperfence vm enroll`"
    if not isinstance(raw, str):
        problems.append(f"key: {'missing' if raw is None else 'a ' + type(raw).__name__} ({expected})")
        return b""
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        problems.append(f"key: not hexadecimal ({expected})")
        return b""
    if len(key) != 32:
        problems.append(f"key: {len(key)} bytes ({expected})")
    return key  # never echo the key itself in a message


def _text(doc: dict[str, Any], name: str, problems: list[str], *, prefix: str = "") -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        problems.append(f"{prefix}{name}: {_show(value)} (expected a non-empty string)")
        return ""
    return value


def _number(
    doc: dict[str, Any], name: str, default: float, bounds: tuple[float, float], problems: list[str]
) -> float:
    value = doc.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not bounds[0] <= value <= bounds[1]:
        problems.append(f"{name}: {_show(value)} (expected seconds between {bounds[0]:g} and {bounds[1]:g})")
        return default
    return float(value)


def _integer(
    doc: dict[str, Any],
    name: str,
    default: int,
    bounds: tuple[int, int],
    problems: list[str],
    *,
    prefix: str = "",
) -> int:
    value = doc.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        problems.append(
            f"{prefix}{name}: {_show(value)} (expected an integer from {bounds[0]} to {bounds[1]})"
        )
        return default
    return value


def _show(value: Any) -> str:
    return "missing" if value is None else repr(value)[:80]
