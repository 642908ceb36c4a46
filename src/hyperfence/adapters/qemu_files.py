"""Files QEMU opens itself (the agent's fw_cfg config, key included): readable by QEMU's user, nobody else.

libvirt runs QEMU as an unprivileged user (qemu.conf ``user``/``group``; ``libvirt-qemu`` on Debian, ``qemu``
on Fedora; a domain's ``<seclabel model='dac'>`` may name another). QEMU opens a ``<sysinfo type='fwcfg'>``
entry's file as that user when the domain starts: every directory on the way must let it pass, and the file
must be readable by it. Who that user is comes from libvirt (`LibvirtInventory.qemu_label`), not from a
guess.

`write_for_qemu` makes it so without opening the key to anyone else:

* the directories it has to create are ``root:<QEMU's group>`` mode 0710: QEMU's group may pass through,
  nobody else may (no listing for anyone but root, and QEMU's user cannot plant links in them);
* the file is owned by QEMU's user, mode 0600, written to a fresh name and renamed into place (a link at
  the path is replaced, never written through);
* an existing directory on the way that QEMU's user may not enter is refused before anything is written
  (`blocking_dir`), naming the directory and what to do, instead of a domain that will not start.

With QEMU running as root (the lab's libvirtd) the file is root's, 0600, and no directory blocks.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from hyperfence.errors import InvalidInputError, Problem
from hyperfence.system.state_dir import write_private

DIR_MODE = 0o710  # root:<QEMU's group>: QEMU passes through; nobody else enters or lists
FILE_MODE = 0o600  # owned by QEMU's user (write_private's mode)


@dataclass(frozen=True)
class QemuUser:
    """The identity QEMU runs as (its DAC label), and where hyperfence learnt it."""

    uid: int
    gid: int
    source: str  # e.g. "the domain's DAC seclabel", "libvirt's QEMU user (qemu.conf)"

    @property
    def name(self) -> str:
        """The user's name, or ``uid N`` when this host has no such user."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def groups(self) -> set[int]:
        """Its group and supplementary groups (libvirt starts QEMU with both)."""
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return {self.gid}
        return {self.gid, *os.getgrouplist(name, self.gid)}


def parse_dac_label(label: str, *, source: str) -> QemuUser:
    """``+64055:+109`` (numeric, as libvirt reports it) or ``user:group`` (names of this host) ->
    `QemuUser`; `InvalidInputError` for a label that is neither."""
    user, sep, group = label.strip().partition(":")
    try:
        if not sep:
            raise ValueError("no ':'")
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError) as e:
        raise InvalidInputError(
            "QEMU's user", [Problem(source, f"{label!r} is not a DAC label USER:GROUP ({e})")]
        ) from None
    return QemuUser(uid, gid, source)


def qemu_user(label: str | None, source: str) -> QemuUser:
    """The `QemuUser` of a DAC label as `LibvirtInventory.qemu_label` reports it (None: root)."""
    return QemuUser(0, 0, source) if label is None else parse_dac_label(label, source=source)


def blocking_dir(path: Path, user: QemuUser) -> Path | None:
    """The first existing directory on the way to `path` that `user` may not enter (no x bit for it)."""
    if user.uid == 0:
        return None
    groups = user.groups()
    for d in reversed(Path(os.path.abspath(path)).parents):
        try:
            st = d.stat()
        except FileNotFoundError:
            break  # from here on `write_for_qemu` creates them, passable for QEMU's group
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def check_reachable(path: Path, user: QemuUser) -> None:
    """`InvalidInputError` if QEMU, running as `user`, could not reach `path`: a directory on the way does
    not let it pass. Says which and what to do."""
    blocked = blocking_dir(path, user)
    if blocked is not None:
        raise InvalidInputError(
            "where QEMU reads the agent's config",
            [
                Problem(
                    str(path),
                    f"QEMU runs as {user.name} ({user.source}), which may not enter {blocked}: the domain "
                    f"would not start. Put the config where it can (--out FILE), or let that user pass "
                    f"(e.g. chmod o+x {blocked}, or chgrp {user.gid} {blocked} && chmod g+x {blocked})",
                )
            ],
        )


def make_qemu_dirs(directory: Path, user: QemuUser) -> list[Path]:
    """Create `directory` and its missing parents ``root:<QEMU's group>`` 0710 (`DIR_MODE`); existing ones
    are left as they are. The directories created, outermost first."""
    missing: list[Path] = []
    d = Path(os.path.abspath(directory))
    while not d.exists():
        missing.append(d)
        d = d.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)  # nobody can enter it before it has its owner and mode
        except FileExistsError:
            continue
        os.chown(d, os.geteuid(), user.gid)
        os.chmod(d, DIR_MODE)
        created.append(d)
    return created


def write_for_qemu(path: Path, data: str, user: QemuUser) -> None:
    """Write `data` to `path` for QEMU running as `user` to read (see the module docstring). Checks the way
    first (`check_reachable`): nothing is created when QEMU could not read it."""
    check_reachable(path, user)
    make_qemu_dirs(path.parent, user)
    write_private(path, data, owner=(user.uid, user.gid))
