"""The running daemon's health, as its control socket reports it (`Daemon.health`)."""

from __future__ import annotations

from typing import Any

from hyperfence.errors import TemporaryError, from_wire
from hyperfence.services.ports import Ask


def daemon_status(ask: Ask, *, state_dir: str) -> dict[str, Any]:
    """The daemon's status report (`healthy`, `loops`, `kernel`, `agent_channels`, the devices cut off or
    passed provisionally, a refused policy version). `TemporaryError` when no daemon runs for `state_dir`;
    a refusal is raised with its own kind."""
    reply = ask({"op": "status"})
    if reply is None:
        raise TemporaryError(f"no daemon is running for state dir {state_dir}: start `hyperfence daemon`")
    if reply.get("ok") is False:
        raise from_wire(reply)
    return reply
