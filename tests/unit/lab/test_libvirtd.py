"""The lab libvirtd's command line and its lab-only qemu.conf (pure parts)."""

from __future__ import annotations

from pathlib import Path

from hyperfence.lab.libvirtd import LIBVIRTD, QEMU_CONF, lab_qemu_conf, libvirtd_argv


def test_libvirtd_runs_in_the_lab_namespace_in_the_foreground() -> None:
    assert libvirtd_argv("hf-a-host", qemu_conf=None) == ["nsenter", "--net=/run/netns/hf-a-host", LIBVIRTD]


def test_qemu_as_root_is_a_private_bind_mount_never_an_edit() -> None:
    argv = libvirtd_argv("hf-a-host", qemu_conf=Path("/run/x/qemu.conf"))
    assert argv[:7] == [
        "nsenter",
        "--net=/run/netns/hf-a-host",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
    ]
    assert argv[-1] == "/run/x/qemu.conf"
    assert f'mount --bind "$1" {QEMU_CONF} && exec {LIBVIRTD}' in argv


def test_lab_qemu_conf_replaces_user_and_group() -> None:
    original = '# user = "qemu"\nuser = "libvirt-qemu"\n group="kvm"\nvnc_listen = "0.0.0.0"\n'
    conf = lab_qemu_conf(original)
    assert '# user = "qemu"' in conf
    assert 'user = "libvirt-qemu"' not in conf and 'group="kvm"' not in conf
    assert 'vnc_listen = "0.0.0.0"' in conf
    assert conf.endswith('user = "root"\ngroup = "root"\n')
