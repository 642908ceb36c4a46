"""The state directory is private: 0700, owned by whoever runs hyperfence; what is in it, no access for others.

The store holds every agent key, `agents/` their configs, `tls/` the endpoint's private keys: anyone who reads
one can forge that VM's heartbeats. So, whatever the umask and whoever made a path first:

* `secure_state_dir` (called at every start, by `Store`) creates the state directory and the parents it
  has to create 0700 (existing parents are not ours and are left alone), then checks and repairs, in order,
  the directory itself and its `agents/` and `tls/` subdirectories (owner: this user, mode exactly 0700;
  repaired first, so nobody else can swap an entry while the rest is checked) and every regular file and
  socket directly in them (owner: this user; no group or other bits: 0644 -> 0600, 0755 -> 0700). Symbolic
  links are never followed. Each repair is logged as a warning and returned. Cost: one `lstat` per entry.
* `write_private` and `open_private` create files 0600 from the start: `os.open` with 0600 (the umask can
  only remove bits) and then `fchmod`, which also narrows a file that already existed with a wider mode.

SQLite creates `-wal` and `-shm` itself with the database file's mode (and `fchmod`s them to it, whatever
the umask), so `Store` creates the database file with `open_private` before SQLite opens it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from hyperfence.errors import InvalidInputError, PermissionDeniedError, Problem

log = logging.getLogger("hyperfence.state")

DIR_MODE = 0o700
FILE_MODE = 0o600
SUBDIRS = ("agents", "tls")  # the subdirectories whose files are checked too (agent configs, TLS keys)


def secure_state_dir(path: str) -> list[str]:
    """Make `path` a private state directory (see the module docstring); one sentence per repair.

    Raises `PermissionDeniedError` when a repair is not allowed (run as root or as the owner) and
    `InvalidInputError` when `path` or one of its parents is not a directory."""
    try:
        repaired: list[str] = []
        make_dirs(Path(path), mode=DIR_MODE)
        st = os.stat(path)  # the state directory may be a link to the real one (an administrator's choice)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        _repair(path, st, want=DIR_MODE, out=repaired)
        subdirs = []
        for name in SUBDIRS:
            sub = os.path.join(path, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(sub)
                if stat.S_ISDIR(st.st_mode):  # a link or a file is left alone: hyperfence makes neither
                    _repair(sub, st, want=DIR_MODE, out=repaired)
                    subdirs.append(sub)
        for d in (path, *subdirs):
            with os.scandir(d) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                        _repair(entry.path, st, want=stat.S_IMODE(st.st_mode) & 0o700, out=repaired)
    except PermissionError as e:
        raise PermissionDeniedError(
            f"state directory {path}: cannot make {e.filename or path} private ({e.strerror}): run as root "
            "or as its owner"
        ) from None
    except (NotADirectoryError, FileExistsError) as e:
        raise InvalidInputError(
            "state directory", [Problem("--state-dir", f"{path}: {e.filename} is not a directory")]
        ) from None
    return repaired


def _repair(path: str, st: os.stat_result, *, want: int, out: list[str]) -> None:
    uid, gid = os.geteuid(), os.getegid()
    if st.st_uid != uid:
        os.chown(path, uid, gid)
        _report(out, f"{path}: owner uid {st.st_uid}, now uid {uid}")
    mode = stat.S_IMODE(st.st_mode)
    if mode != want:
        os.chmod(path, want)
        _report(out, f"{path}: mode {mode:04o}, now {want:04o}")


def _report(out: list[str], what: str) -> None:
    log.warning("state repaired: %s", what)
    out.append(what)


def make_dirs(path: Path, *, mode: int) -> list[Path]:
    """Create `path` and its missing parents with exactly `mode` (not narrowed or widened by the umask);
    existing directories are left as they are. The directories created, outermost first."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created = []
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by someone else: checked by the caller
            os.mkdir(d, mode)
            os.chmod(d, mode)
            created.append(d)
    return created


def open_private(path: str | Path, flags: int) -> int:
    """`os.open(path, flags | O_CREAT)` for a file only its owner may read: created 0600, and an existing
    file is narrowed to 0600. Never follows a symbolic link at `path`."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_file(path: str | Path) -> None:
    """Create `path` 0600 if it is missing, else narrow it to 0600, *without opening it*: closing any
    descriptor of a file drops every POSIX lock this process holds on it, SQLite's among them, so opening
    the database to fix its mode while another connection of this process holds a lock on it would let a
    second writer in. `InvalidInputError` when `path` is a link or not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            os.close(open_private(path, os.O_RDWR | os.O_EXCL))
            return
        except FileExistsError:  # created meanwhile
            st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(f"{path} is not a regular file (a link or a device?): move it away")
    if stat.S_IMODE(st.st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)


def write_private(path: str | Path, data: bytes | str, *, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data`, atomically, mode 0600 (owned by `owner` = (uid, gid) if given).

    Written to a fresh temporary name next to it (`O_EXCL`: never an existing file or link), chowned and
    chmodded through its descriptor, then renamed over `path` (a link at `path` is replaced, not followed):
    safe in a directory that another user can write to, such as a domain's channel directory."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_EXCL), "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
