"""`hyperfence vm isolate|rate-limit|shield|release` refuse bad input before anything is stored (no
daemon, no kernel: nothing valid reaches a converge here), and `vm list` shows who set what."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyperfence import errors
from hyperfence.cli.main import app
from hyperfence.model.overlay import Overlay, OverlayKind
from hyperfence.reconcile.engine import Engine
from tests.unit.cli.test_vm import store_policy

runner = CliRunner()


def stored(tmp_path: Path) -> tuple[Overlay, ...]:
    engine = Engine(netns=None, state_dir=str(tmp_path))
    try:
        return engine.store.overlays()
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("args", "located"),
    [
        (
            ["isolate", "ghost", "--reason", "x"],
            "vm: 'ghost' is not a VM of the policy (expected one of: vm1, vm2",
        ),
        (["isolate", "vm1"], "reason: a reason is required"),
        (["isolate", "vm1", "--reason", "x", "--for", "soon"], "for: 'soon' is not a duration"),
        (["shield", "vm1", "--reason", "x", "--for", "0s"], "for: '0s' is out of range"),
        (["rate-limit", "vm1", "lots", "--reason", "x"], "rate: 'lots' is not a rate"),
        (["rate-limit", "vm1", "0", "--reason", "x"], "rate: '0' is not a rate"),
        (
            ["release", "vm1", "--producer", "someone"],
            "--producer: 'someone' is not one of operator, heartbeat, all",
        ),
    ],
)
def test_bad_input_is_refused_located_and_nothing_is_stored(
    tmp_path: Path, args: list[str], located: str
) -> None:
    store_policy(tmp_path)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", *args])
    assert isinstance(r.exception, errors.InvalidInputError), r.output
    assert located in str(r.exception)
    assert stored(tmp_path) == ()


def test_every_problem_at_once(tmp_path: Path) -> None:
    store_policy(tmp_path)
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "rate-limit", "ghost", "lots", "--for", "x"])
    assert isinstance(r.exception, errors.InvalidInputError)
    text = str(r.exception)
    for field in ("vm: 'ghost'", "reason:", "for:", "rate:"):
        assert field in text


def test_vm_list_shows_each_vms_overlays_and_who_set_them(tmp_path: Path) -> None:
    store_policy(tmp_path)
    engine = Engine(netns=None, state_dir=str(tmp_path))
    vm1 = next(v.id for v in engine.compiled().policy.vms if v.name == "vm1")  # type: ignore[union-attr]
    engine.set_overlays("operator", (Overlay("operator", vm1, OverlayKind.ISOLATE, "suspicious", 1e9),))
    engine.set_overlays(
        "detector", (Overlay("detector", vm1, OverlayKind.RATE_LIMIT, "scan", 1e9, until=4e9, rate=5),)
    )
    engine.set_overlays(
        "heartbeat", (Overlay("heartbeat", vm1, OverlayKind.ISOLATE, "gone", 1e9, until=1.0),)
    )
    engine.close()
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in map(json.loads, r.output.splitlines())}
    got = [(o["producer"], o["kind"], o["reason"], o["until"], o["rate"]) for o in rows["vm1"]["overlays"]]
    assert got == [
        ("detector", "rate-limit", "scan", 4e9, 5),
        ("operator", "isolate", "suspicious", None, None),
    ]
    assert rows["vm2"]["overlays"] == []  # and the expired heartbeat one is not shown
    r = runner.invoke(app, ["--state-dir", str(tmp_path), "vm", "list"], env={"COLUMNS": "400"})
    assert "isolate by operator since 2001-09-09T01:46:40+00:00 until released: suspicious" in r.output
