"""`daemon_status`: the daemon's report, no daemon, a refusal."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfence.errors import PermissionDeniedError, TemporaryError, to_wire
from hyperfence.services.status import daemon_status


def test_the_report_no_daemon_and_a_refusal() -> None:
    report = {"ok": True, "pid": 42, "healthy": True, "loops": {}}
    asked: list[dict[str, Any]] = []

    def ask(payload: dict[str, Any]) -> dict[str, Any] | None:
        asked.append(payload)
        return report

    assert daemon_status(ask, state_dir="/s") == report and asked == [{"op": "status"}]
    with pytest.raises(TemporaryError, match="no daemon is running for state dir /s"):
        daemon_status(lambda p: None, state_dir="/s")
    refused = to_wire(PermissionDeniedError("root only"))
    with pytest.raises(PermissionDeniedError, match=r"^root only$"):
        daemon_status(lambda p: refused, state_dir="/s")
