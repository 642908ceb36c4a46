"""Real agents in lab VMs, the real monitor, real packets: a killed agent's VM is isolated within three
intervals and can no longer reach a peer its policy allows; it is released when its agent comes back."""

from __future__ import annotations

import pytest

from hyperfence.lab.agent_experiment import run_agent_experiment
from hyperfence.lab.session import LabSession

pytestmark = pytest.mark.kernel


def test_a_killed_agent_isolates_its_vm_and_its_return_releases_it(lab: LabSession) -> None:
    lines: list[str] = []
    observations = run_agent_experiment(lab, lines.append)
    failed = [f"{o.step}: {o.check}: expected {o.expected}, got {o.got}" for o in observations if not o.ok]
    assert not failed, (failed, lines)
    assert len(observations) >= 7
