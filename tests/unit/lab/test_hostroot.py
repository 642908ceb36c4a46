"""The host-root guest's pure part: module order from modules.dep, the boot scripts, QEMU's argv."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.lab import hostroot

# a slice of Debian 6.1's modules.dep (depmod lists the whole closure of each module)
DEP = """\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/fs/overlayfs/overlay.ko:
"""


def test_each_module_comes_after_everything_it_needs_and_only_once() -> None:
    deps = hostroot.parse_modules_dep(DEP)
    order = hostroot.insmod_order(deps, hostroot.ROOT_MODULES)
    assert len(order) == len(set(order)) == len(deps)
    for i, path in enumerate(order):
        assert set(deps[path]) <= set(order[:i]), path
    assert [hostroot.module_name(p) for p in order][:2] == ["virtio_pci_legacy_dev", "virtio_pci_modern_dev"]


def test_a_missing_module_is_named_and_a_cycle_is_shown() -> None:
    deps = hostroot.parse_modules_dep(DEP)
    with pytest.raises(InvalidInputError) as e:
        hostroot.insmod_order(deps, ["9p", "virtio-blk", "nope"])
    assert [p.path for p in e.value.problems] == ["modules[virtio-blk]", "modules[nope]"]
    with pytest.raises(InvalidInputError, match="cycle") as e:
        hostroot.insmod_order({"a.ko": ("b.ko",), "b.ko": ("a.ko",)}, ["a"])
    assert "a.ko -> b.ko -> a.ko" in str(e.value.problems[0])


def test_module_names_and_a_bad_modules_dep_line() -> None:
    assert hostroot.module_name("kernel/net/9p/9pnet_virtio.ko") == "9pnet_virtio"
    assert hostroot.module_name("kernel/drivers/hid/hid-generic.ko.xz") == "hid_generic"
    with pytest.raises(ValueError, match="line 2"):
        hostroot.parse_modules_dep("a.ko:\nno colon here\n")


def test_init_loads_the_modules_in_order_and_is_valid_shell() -> None:
    text = hostroot.init_script(["virtio_ring", "virtio", "9p"])
    assert "for m in virtio_ring virtio 9p; do" in text
    assert f"mount_tag={hostroot.ROOT_TAG}" in text and "@" not in text.replace("@ROOT", "")
    subprocess.run(["sh", "-n"], input=text.encode(), check=True)


def test_stage2_runs_the_command_without_a_shell_and_quotes_everything() -> None:
    text = hostroot.stage2_script(
        command=["pytest", "-k", "a b; rm -rf /", "$HOME"],
        cwd="/work/my repo",
        modules="/var/lib/x",
        env={"HF_FLAVOUR": "bridge native '@CWD@'"},
    )
    assert shlex.join(["pytest", "-k", "a b; rm -rf /", "$HOME"]) + " > " in text
    assert "cd '/work/my repo' ||" in text
    assert "export HF_FLAVOUR='bridge native '\"'\"'@CWD@'\"'\"''" in text  # one pass: @CWD@ stays as given
    assert "@" not in text.replace("@CWD@", "")
    subprocess.run(["sh", "-n"], input=text.encode(), check=True)


def test_stage2_names_each_bad_value() -> None:
    with pytest.raises(InvalidInputError) as e:
        hostroot.stage2_script(command=[], cwd="work", modules="/m", env={"A-B": "1", "OK": "2"})
    assert [p.path for p in e.value.problems] == ["command", "cwd", "env[A-B]"]


def test_qemu_gets_tcg_the_root_read_only_and_the_run_dir_read_write() -> None:
    argv = hostroot.qemu_argv(
        kernel="/k", initrd="/i", run_dir="/r", console="/r/c.log", work_dir="/tmp/w", memory_mib=1024, smp=1
    )
    joined = " ".join(argv)
    assert "-accel tcg" in joined and "-m 1024" in joined and "-smp 1" in joined and "-no-reboot" in joined
    assert f"local,path=/,mount_tag={hostroot.ROOT_TAG},security_model=none,readonly=on" in joined
    assert f"local,path=/r,mount_tag={hostroot.OUT_TAG},security_model=none" in joined
    # the command's directory has a share of its own (a clone under /tmp is hidden by the guest's /tmp)
    assert f"local,path=/tmp/w,mount_tag={hostroot.WORK_TAG},security_model=none,readonly=on" in joined
    assert argv[argv.index("-serial") + 1] == "file:/r/c.log"
