"""The zipapp: only the agent inside, executable, deterministic, and it runs on the oldest supported Python."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

from hyperfence.agent import AGENT_VERSION
from hyperfence.agent.build import build_zipapp
from tests.unit.agent.test_main import GUEST_PYTHON

SRC = Path(__file__).resolve().parents[3] / "src/hyperfence/agent"


def test_the_zipapp_holds_only_the_agent(tmp_path: Path) -> None:
    app = build_zipapp(tmp_path / "hyperfence-agent.pyz")
    assert app.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(app).st_mode & 0o777 == 0o755
    with zipfile.ZipFile(app) as z:
        names = set(z.namelist())
        assert z.read("hyperfence/__init__.py") == b""
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    expected = {"__main__.py", "hyperfence/__init__.py", "hyperfence/wire.py"} | {
        f"hyperfence/agent/{p.name}" for p in SRC.glob("*.py")
    }
    assert names == expected
    assert "hyperfence/wire.py" in names and not any("__pycache__" in n for n in names)


def test_builds_are_reproducible(tmp_path: Path) -> None:
    assert build_zipapp(tmp_path / "a.pyz").read_bytes() == build_zipapp(tmp_path / "b.pyz").read_bytes()


def test_the_zipapp_runs_alone(tmp_path: Path) -> None:
    """Run from an empty directory with no PYTHONPATH: it must need nothing but the standard library."""
    app = build_zipapp(tmp_path / "hyperfence-agent.pyz")
    env = {"PATH": os.environ["PATH"]}
    version = subprocess.run(
        [GUEST_PYTHON, str(app), "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    )
    assert version.stdout.strip() == AGENT_VERSION
    once = subprocess.run(
        [GUEST_PYTHON, str(app), "--once"], capture_output=True, text=True, check=True, cwd=tmp_path, env=env
    )
    sample = json.loads(once.stdout)
    assert sample["res"]["mem"]["total"] > 0 and isinstance(sample["events"], list)
