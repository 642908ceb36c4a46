"""The lab every kernel test under tests/netns starts from: `lab`, a `LabSession` (network namespaces for
the host and `lab_vms` VMs, a bridge, the outside network, dnsmasq, an engine on a private state directory)
made for the test and destroyed after it, even when it fails. A module needs another number of VMs: it
defines `lab_vms`; more setup: it defines its own `lab(lab)` fixture on top of this one."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.lab.session import LabSession


@pytest.fixture
def lab_vms() -> int:
    return 3


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path, lab_vms: int) -> Iterator[LabSession]:
    """Named after the test module (`test_arp` -> "ar" + 6 hex digits), so that a lab left behind by a
    killed run says where it came from."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with LabSession(module[:2] + secrets.token_hex(3), lab_vms, state_dir=str(tmp_path / "state")) as s:
        yield s
