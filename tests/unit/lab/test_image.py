"""The lab guest image's manifest: when an image is reused and when it is rebuilt (hyperfence.lab.image)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hyperfence.lab import image as lab_image
from hyperfence.lab.image import (
    BUILDER,
    GuestImage,
    boot_scripts_digest,
    image_from_manifest,
    manifest_document,
)

OUT = Path("/images")
INPUTS: dict[str, Any] = {
    "kernel": "linux-image-6.1.0-56-amd64=6.1.192-2",
    "python": "aa" * 32,
    "busybox": "bb" * 32,
    "agent": "cc" * 32,
    "boot": "dd" * 32,
    "debian": {"libc6": "2.36-9+deb12u14"},
}
IMAGE = GuestImage(
    kernel=OUT / "vmlinuz",
    initrd=OUT / "initrd.cpio.gz",
    kernel_release="6.1.0-56-amd64",
    kernel_package="linux-image-6.1.0-56-amd64=6.1.192-2",
    python_version="3.11.2",
    kernel_bytes=8_247_232,
    initrd_bytes=9_088_702,
    initrd_unpacked_bytes=22_740_504,
    stdlib_modules=83,
    build_seconds=7.3,
    reused=False,
)
OUTPUTS = {"vmlinuz": {"bytes": 1, "sha256": "00"}, "initrd.cpio.gz": {"bytes": 2, "sha256": "11"}}


def _doc() -> dict[str, Any]:
    # through JSON, as it is read back from manifest.json
    loaded: dict[str, Any] = json.loads(json.dumps(manifest_document(INPUTS, IMAGE, OUTPUTS)))
    return loaded


def test_a_manifest_from_the_same_inputs_gives_the_image_back_as_reused() -> None:
    doc = _doc()
    assert doc["builder"] == BUILDER
    assert doc["image"]["kernel"] == "vmlinuz"  # relative: the directory can move
    assert image_from_manifest(doc, OUT, INPUTS) == replace(IMAGE, reused=True)
    moved = image_from_manifest(doc, Path("/elsewhere"), INPUTS)
    assert moved is not None and moved.initrd == Path("/elsewhere/initrd.cpio.gz")


@pytest.mark.parametrize(
    "change",
    [
        {"kernel": "linux-image-6.1.0-57-amd64=6.1.193-1"},
        {"python": "ee" * 32},
        {"agent": "ff" * 32},
        {"boot": "00" * 32},
        {"debian": {"libc6": "2.36-9+deb12u15"}},
    ],
)
def test_any_changed_input_means_a_rebuild(change: dict[str, Any]) -> None:
    assert image_from_manifest(_doc(), OUT, {**INPUTS, **change}) is None


def test_another_builder_or_a_damaged_manifest_means_a_rebuild() -> None:
    assert image_from_manifest({**_doc(), "builder": BUILDER + 1}, OUT, INPUTS) is None
    broken = _doc()
    del broken["image"]["initrd_bytes"]
    assert image_from_manifest(broken, OUT, INPUTS) is None
    assert image_from_manifest(None, OUT, INPUTS) is None
    assert image_from_manifest([], OUT, INPUTS) is None
    assert image_from_manifest({**_doc(), "image": "x"}, OUT, INPUTS) is None


def test_boot_scripts_digest_is_stable() -> None:
    assert boot_scripts_digest() == boot_scripts_digest()
    assert len(boot_scripts_digest()) == 64


class _Stop(Exception):
    pass


@pytest.mark.skipif(os.geteuid() != 0, reason="build_image refuses to run without root")
def test_lab_image_never_creates_the_state_directory_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lab image` used to create /var/lib/hyperfence 0755 before any daemon ran: parents it creates are 0700."""

    def stop(path: Path) -> Path:
        raise _Stop  # after the directories, before any real work

    monkeypatch.setattr(lab_image, "build_zipapp", stop)
    state = tmp_path / "var-lib-hyperfence"
    old = os.umask(0)
    try:
        with pytest.raises(_Stop):
            lab_image.build_image(state / "images")
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "images").stat().st_mode) == 0o755  # the image itself is no secret
