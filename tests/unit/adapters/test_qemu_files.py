"""Files for QEMU to read: which user QEMU is, which directory would stop it, and a file only that user reads
(real files, owners and modes; read back as the users themselves through `setpriv`)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.adapters.qemu_files import (
    DIR_MODE,
    QemuUser,
    blocking_dir,
    parse_dac_label,
    qemu_user,
    write_for_qemu,
)
from hyperfence.errors import InvalidInputError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners of other users need root")
SETPRIV = shutil.which("setpriv")


def test_dac_labels_numeric_or_by_name() -> None:
    assert parse_dac_label("+64055:+109", source="s") == QemuUser(64055, 109, "s")
    assert parse_dac_label("root:root", source="s") == QemuUser(0, 0, "s")
    nobody = pwd.getpwnam("nobody")
    got = parse_dac_label(f"nobody:{grp.getgrgid(nobody.pw_gid).gr_name}", source="s")
    assert (got.uid, got.gid, got.name) == (nobody.pw_uid, nobody.pw_gid, "nobody")
    assert qemu_user(None, "no DAC") == QemuUser(0, 0, "no DAC")
    for bad in ("64055", "no-such-user-x:root", "+x:+1"):
        with pytest.raises(InvalidInputError, match="the domain's seclabel") as e:
            parse_dac_label(bad, source="the domain's seclabel")
        assert repr(bad) in str(e.value)


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh directory in /tmp (which everyone may enter), 0755, removed after."""
    d = Path(tempfile.mkdtemp(prefix="hf-qemu-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def as_user(user: pwd.struct_passwd, path: Path) -> subprocess.CompletedProcess[str]:
    """`cat path` as `user` (its groups too), the way libvirt starts QEMU."""
    assert SETPRIV is not None
    return subprocess.run(
        [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "cat", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )


@root_only
def test_the_directory_qemus_user_cannot_enter_is_named(base: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    user = QemuUser(nobody.pw_uid, nobody.pw_gid, "test")
    inner = base / "qemu"
    inner.mkdir()
    config = inner / "web1.agent.json"
    inner.chmod(0o750)
    assert blocking_dir(config, user) == inner  # root's 0750: nobody is not in its group
    os.chown(inner, nobody.pw_uid, 0)
    inner.chmod(0o700)
    assert blocking_dir(config, user) is None  # its own directory
    base.chmod(0o700)  # a 0700 state directory in the way
    assert blocking_dir(config, user) == base
    assert blocking_dir(config, QemuUser(0, 0, "root")) is None  # QEMU as root enters everything
    assert blocking_dir(base / "missing" / "deeper" / "x.json", QemuUser(0, 0, "root")) is None


@root_only
@pytest.mark.skipif(SETPRIV is None, reason="no setpriv")
def test_the_config_is_readable_by_qemus_user_and_nobody_else(base: Path) -> None:
    """Written for QEMU running as `nobody`: `nobody` reads it; another unprivileged user (`daemon`) cannot
    enter the directories hyperfence made, nor read the file; the key never had a wider mode."""
    nobody, other = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
    user = QemuUser(nobody.pw_uid, nobody.pw_gid, "test")
    path = base / "fw-cfg" / "sub" / "web1.agent.json"
    write_for_qemu(path, '{"key": "secret"}\n', user)
    for d in (base / "fw-cfg", base / "fw-cfg" / "sub"):
        st = d.stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (DIR_MODE, 0, nobody.pw_gid)
    st = path.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o600, nobody.pw_uid)
    got = as_user(nobody, path)
    assert (got.returncode, got.stdout) == (0, '{"key": "secret"}\n'), got.stderr
    denied = as_user(other, path)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    # rewritten (a new key): still only QEMU's user, and a link planted at the path is replaced
    path.unlink()
    path.symlink_to("/etc/hostname")
    write_for_qemu(path, '{"key": "new"}\n', user)
    assert not path.is_symlink() and as_user(nobody, path).stdout == '{"key": "new"}\n'


@root_only
def test_nothing_is_written_where_qemus_user_could_not_read_it(base: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    user = QemuUser(nobody.pw_uid, nobody.pw_gid, "libvirt's QEMU user for kvm domains, qemu.conf")
    state = base / "state"
    state.mkdir(mode=0o700)
    path = state / "fw-cfg" / "web1.agent.json"
    with pytest.raises(InvalidInputError) as e:
        write_for_qemu(path, "{}", user)
    text = str(e.value)
    assert (
        f"QEMU runs as nobody (libvirt's QEMU user for kvm domains, qemu.conf), which may not enter {state}"
        in text
    )
    assert "--out" in text and f"chmod o+x {state}" in text
    assert not (state / "fw-cfg").exists()
    write_for_qemu(path, "{}", QemuUser(0, 0, "root"))  # QEMU as root (the lab): fine
    assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (0, 0o600)
