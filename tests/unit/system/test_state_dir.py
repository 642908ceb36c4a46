"""The state directory is private whatever the umask and whoever made it first: real files in tmp_path."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.adapters.store import Store
from hyperfence.adapters.tls import ensure_certificates
from hyperfence.errors import InvalidInputError, PermissionDeniedError
from hyperfence.system.state_dir import make_dirs, open_private, secure_state_dir, write_private

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@pytest.fixture
def umask0() -> Iterator[None]:
    """The worst umask: every file a library creates with its default mode would be world-writable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def put(path: Path, text: str, file_mode: int) -> Path:
    path.write_text(text)
    path.chmod(file_mode)
    return path


def test_a_new_state_dir_and_the_parents_it_makes_are_0700(tmp_path: Path, umask0: None) -> None:
    state = tmp_path / "var" / "lib" / "hf"
    assert secure_state_dir(str(state)) == []  # creating is not repairing
    for d in (tmp_path / "var", tmp_path / "var" / "lib", state):
        assert mode(d) == 0o700, d


def test_an_existing_parent_is_left_alone(tmp_path: Path, umask0: None) -> None:
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o755)
    secure_state_dir(str(parent / "state"))
    assert mode(parent) == 0o755
    assert mode(parent / "state") == 0o700


def test_a_0755_dir_and_0644_keys_are_repaired_and_each_repair_is_reported(
    tmp_path: Path, umask0: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What `lab image` (a 0755 /var/lib/hyperfence) and an old version (files at the umask) leave behind."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    wide = [
        put(state / name, "x", 0o644)
        for name in ("hyperfence.db", "hyperfence.db-wal", "hyperfence.db-shm", "daemon.pid", "traffic.jsonl")
    ]
    (state / "agents").mkdir(mode=0o777)
    wide.append(put(state / "agents" / "vm1.json", '{"key": "secret"}', 0o666))
    (state / "tls").mkdir(mode=0o755)
    wide += [put(state / "tls" / "server.key", "k", 0o644), put(state / "tls" / "ca.pem", "c", 0o644)]
    pyz = put(state / "agents" / "hyperfence-agent.pyz", "z", 0o755)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(state / "agents" / "abc.sock"))  # umask 0: srwxrwxrwx
    sock.close()
    private = put(state / "agents" / "vm2.json", "{}", 0o600)  # already right: not reported
    (state / "images").mkdir(mode=0o755)  # not hyperfence's secret: behind the 0700 directory, left alone
    image = put(state / "images" / "vmlinuz", "k", 0o644)

    with caplog.at_level(logging.WARNING, logger="hyperfence.state"):
        repaired = secure_state_dir(str(state))

    assert sorted(repaired) == sorted(
        [f"{state}: mode 0755, now 0700", f"{state / 'agents'}: mode 0777, now 0700"]
        + [f"{state / 'tls'}: mode 0755, now 0700"]
        + [f"{p}: mode {0o666 if p.name == 'vm1.json' else 0o644:04o}, now 0600" for p in wide]
        + [f"{pyz}: mode 0755, now 0700", f"{state / 'agents' / 'abc.sock'}: mode 0777, now 0700"]
    )
    assert [r.getMessage() for r in caplog.records] == [f"state repaired: {r}" for r in repaired]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    for d in (state, state / "agents", state / "tls"):
        assert mode(d) == 0o700
    for p in wide:
        assert mode(p) == 0o600, p
    assert mode(pyz) == 0o700 and mode(private) == 0o600
    assert mode(state / "agents" / "abc.sock") == 0o700
    assert mode(state / "images") == 0o755 and mode(image) == 0o644
    assert secure_state_dir(str(state)) == []  # checked again at the next start: nothing left to do


@as_root
def test_a_state_dir_or_file_someone_else_owns_is_taken_back(tmp_path: Path, umask0: None) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = put(state / "hyperfence.db", "x", 0o600)
    os.chown(state, NOBODY, NOBODY)  # whoever made it first could chmod it back later
    os.chown(key, NOBODY, NOBODY)
    repaired = secure_state_dir(str(state))
    assert repaired == [f"{state}: owner uid {NOBODY}, now uid 0", f"{key}: owner uid {NOBODY}, now uid 0"]
    assert os.stat(state).st_uid == 0 and os.stat(key).st_uid == 0


def test_links_are_never_followed(tmp_path: Path, umask0: None) -> None:
    """A link planted while the directory was open to others must not make hyperfence chmod its target."""
    state = tmp_path / "state"
    (state / "agents").mkdir(parents=True, mode=0o755)
    outside = put(tmp_path / "passwd", "root:x:0:0", 0o644)
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir(mode=0o755)
    (state / "agents" / "vm1.json").symlink_to(outside)
    (state / "tls").symlink_to(other_dir)
    secure_state_dir(str(state))
    assert mode(outside) == 0o644 and mode(other_dir) == 0o755
    assert mode(state / "agents") == 0o700


def test_a_state_dir_that_is_a_file_or_cannot_be_fixed_is_a_clear_error(
    tmp_path: Path, umask0: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path / "file", "x", 0o644)
    with pytest.raises(InvalidInputError) as e:
        secure_state_dir(str(tmp_path / "file"))
    assert "--state-dir" in str(e.value) and "is not a directory" in str(e.value)
    with pytest.raises(InvalidInputError):
        secure_state_dir(str(tmp_path / "file" / "state"))

    def refuse(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    (tmp_path / "state").mkdir(mode=0o755)
    monkeypatch.setattr(os, "chmod", refuse)
    with pytest.raises(PermissionDeniedError) as p:
        secure_state_dir(str(tmp_path / "state"))
    assert f"cannot make {tmp_path / 'state'} private" in str(p.value) and "run as root" in str(p.value)


def test_make_dirs_gives_exactly_the_mode_asked_for(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would make a 0700 directory 0500: not even its owner could write in it
    try:
        created = make_dirs(tmp_path / "a" / "b", mode=0o700)
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b"]
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    assert make_dirs(tmp_path / "a" / "b", mode=0o755) == []
    assert mode(tmp_path / "a" / "b") == 0o700  # existing: left as it is


# --- files created 0600 from the start ------------------------------------------------------------------


def test_write_private_creates_0600_and_narrows_what_it_replaces(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "vm1.json"
    write_private(path, '{"key": "a"}')
    assert mode(path) == 0o600 and path.read_text() == '{"key": "a"}'
    path.chmod(0o644)
    write_private(path, b'{"key": "b"}')
    assert mode(path) == 0o600 and path.read_text() == '{"key": "b"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm1.json"]  # no temporary file left


def test_write_private_replaces_a_link_instead_of_writing_through_it(tmp_path: Path, umask0: None) -> None:
    """In a directory QEMU's user can write to (the fw_cfg case), a planted link must not redirect root."""
    victim = put(tmp_path / "shadow", "precious", 0o644)
    link = tmp_path / "vm1.agent.json"
    link.symlink_to(victim)
    write_private(link, "config")
    assert victim.read_text() == "precious" and mode(victim) == 0o644
    assert not link.is_symlink() and link.read_text() == "config" and mode(link) == 0o600


@as_root
def test_write_private_gives_the_file_to_the_owner_asked_for(tmp_path: Path, umask0: None) -> None:
    path = tmp_path / "vm1.agent.json"
    write_private(path, "config", owner=(NOBODY, NOBODY))
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)


def test_open_private_narrows_an_existing_file_and_appends(tmp_path: Path, umask0: None) -> None:
    path = put(tmp_path / "traffic.jsonl", "old\n", 0o666)
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a") as f:
        f.write("new\n")
    assert mode(path) == 0o600 and path.read_text() == "old\nnew\n"
    fresh = tmp_path / "new.log"
    os.close(open_private(fresh, os.O_WRONLY))
    assert mode(fresh) == 0o600


# --- the store and the TLS keys ----------------------------------------------------------------------


def test_the_store_and_its_wal_and_shm_are_0600_under_umask_0(tmp_path: Path, umask0: None) -> None:
    state = tmp_path / "state"
    store = Store(str(state))
    try:
        store.add_event("test", {"n": 1})  # a write: SQLite makes -wal and -shm
        names = ("hyperfence.db", "hyperfence.db-wal", "hyperfence.db-shm")
        assert {n: mode(state / n) for n in names} == dict.fromkeys(names, 0o600)
        assert mode(state) == 0o700 and store.repaired == []
    finally:
        store.close()


def test_a_store_an_old_version_left_readable_is_repaired_when_opened(tmp_path: Path, umask0: None) -> None:
    state = tmp_path / "state"
    store = Store(str(state))
    store.add_event("test", {"n": 1})
    store.close()
    state.chmod(0o755)
    (state / "hyperfence.db").chmod(0o644)
    store = Store(str(state))
    try:
        store.add_event("test", {"n": 2})
        assert store.repaired == [
            f"{state}: mode 0755, now 0700",
            f"{state / 'hyperfence.db'}: mode 0644, now 0600",
        ]
        for name in ("hyperfence.db", "hyperfence.db-wal", "hyperfence.db-shm"):
            assert mode(state / name) == 0o600, name
        assert len(store.events(kind="test")) == 2
    finally:
        store.close()


def test_tls_keys_and_certificates_are_0600_in_a_0700_dir(tmp_path: Path, umask0: None) -> None:
    d = ensure_certificates(str(tmp_path / "state"), ipaddress.IPv4Address("10.0.0.1"))
    assert mode(d) == 0o700
    assert {p.name: mode(p) for p in d.iterdir()} == dict.fromkeys(
        ["ca.key", "ca.pem", "server.key", "server.pem", "host"], 0o600
    )
    (d / "server.key").chmod(0o644)  # then the endpoint moves: new keys, written 0600 again
    ensure_certificates(str(tmp_path / "state"), ipaddress.IPv4Address("10.0.0.2"))
    assert mode(d / "server.key") == 0o600
