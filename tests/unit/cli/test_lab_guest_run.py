"""`hyperfence lab guest-run`: passes the command, directory and environment on, and exits with the
command's status (124: timed out, 125: never ran). The guest itself is faked (tests/guest boots it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hyperfence import errors
from hyperfence.cli.lab import app
from hyperfence.lab import hostroot_guest
from hyperfence.lab.hostroot_guest import HostrootBoot, HostrootRun

runner = CliRunner()
BOOT = HostrootBoot(
    kernel=Path("/i/vmlinuz"),
    initrd=Path("/i/initrd.cpio.gz"),
    tree=Path("/i/tree"),
    release="6.1.0-57-amd64",
    kernel_package="linux-image-6.1.0-57-amd64=6.1.192-3",
    build_seconds=3.0,
    reused=True,
)


def fake_guest(monkeypatch: pytest.MonkeyPatch, run: HostrootRun) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(hostroot_guest, "prepare_boot", lambda images: BOOT)

    def fake_run(argv: list[str], **kw: Any) -> HostrootRun:
        calls.append({"argv": argv, **kw})
        kw["stream"].write(run.output)
        return run

    monkeypatch.setattr(hostroot_guest, "run_in_hostroot", fake_run)
    return calls


def result(status: int | None, *, timed_out: bool = False) -> HostrootRun:
    return HostrootRun(
        status=status, output="hello\n", console="HFG: x", boot_seconds=2.5, seconds=7.0, timed_out=timed_out
    )


def test_the_command_its_directory_and_environment_reach_the_guest_and_its_status_comes_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_guest(monkeypatch, result(3))
    r = runner.invoke(
        app,
        ["guest-run", "--cwd", str(tmp_path), "--env", "A=b=c", "--smp", "1", "--", "pytest", "-k", "x y"],
    )
    assert r.exit_code == 3, r.output
    assert "hello" in r.output
    (call,) = calls
    assert call["argv"] == ["pytest", "-k", "x y"]
    assert call["cwd"] == str(tmp_path) and call["env"] == {"A": "b=c"} and call["smp"] == 1
    assert call["boot"] == BOOT and call["memory_mib"] == 2048


@pytest.mark.parametrize(("run", "code"), [(result(None, timed_out=True), 124), (result(None), 125)])
def test_a_timeout_and_a_guest_that_never_ran_the_command_have_their_own_codes(
    monkeypatch: pytest.MonkeyPatch, run: HostrootRun, code: int
) -> None:
    fake_guest(monkeypatch, run)
    r = runner.invoke(app, ["guest-run", "--", "true"])
    assert r.exit_code == code, r.output


def test_a_bad_env_or_no_command_boots_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_guest(monkeypatch, result(0))
    r = runner.invoke(app, ["guest-run", "--env", "novalue", "--", "true"])
    assert isinstance(r.exception, errors.InvalidInputError)
    assert "'novalue' (expected KEY=VALUE)" in str(r.exception.problems[0])
    assert runner.invoke(app, ["guest-run"]).exit_code == 2
    assert calls == []
