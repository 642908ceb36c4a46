"""`hyperfence lab image`: passes its options on and prints what it got (the build itself is faked)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyperfence import errors
from hyperfence.cli.lab import app
from hyperfence.lab import image as lab_image
from tests.unit.lab.test_image import IMAGE

runner = CliRunner()


def _image(out: Path, *, reused: bool) -> lab_image.GuestImage:
    return replace(IMAGE, kernel=out / "vmlinuz", initrd=out / "initrd.cpio.gz", reused=reused)


def test_lab_image_builds_where_asked_and_prints_paths_and_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, bool]] = []

    def fake(out_dir: Path, *, force: bool = False) -> lab_image.GuestImage:
        calls.append((out_dir, force))
        return _image(out_dir, reused=False)

    monkeypatch.setattr(lab_image, "build_image", fake)
    r = runner.invoke(app, ["image", "--out", str(tmp_path), "--force"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert calls == [(tmp_path, True)]
    assert "built in 7.3 s" in r.output
    assert f"{tmp_path / 'initrd.cpio.gz'}  9.1 MB (22.7 MB unpacked" in r.output
    assert f"{tmp_path / 'vmlinuz'}  8.2 MB" in r.output


def test_lab_image_lets_a_failed_download_through_as_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(out_dir: Path, *, force: bool = False) -> lab_image.GuestImage:
        raise errors.TemporaryError(
            "apt-get download linux-image-6.1.0-56-amd64 failed: retry", retry_after=30
        )

    monkeypatch.setattr(lab_image, "build_image", fake)
    r = runner.invoke(app, ["image", "--out", str(tmp_path)])
    assert isinstance(r.exception, errors.TemporaryError)  # cli/main.py maps it to exit code 6
    assert "apt-get download" in str(r.exception)
