"""The lab shell's protocol (hyperfence.lab.guest_shell), and the guest's loop run by busybox on a raw pty
standing in for the virtio-serial port (both are read-write character devices)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfence.errors import InvalidInputError, TemporaryError
from hyperfence.lab.guest_init import shell_script
from hyperfence.lab.guest_shell import GuestResult, command_line, parse_answer, run_in_guest


def test_the_command_line_is_tag_seconds_command() -> None:
    assert command_line("ab12", "ping -c 1 10.0.0.2", 5) == b"ab12 5 ping -c 1 10.0.0.2\n"


def test_a_command_the_guest_could_not_read_is_refused_with_every_reason() -> None:
    with pytest.raises(InvalidInputError) as exc:
        command_line("t", "echo a\necho b", 0)
    assert [p.path for p in exc.value.problems] == ["command", "seconds"]
    with pytest.raises(InvalidInputError, match="one non-empty line"):
        command_line("t", "  ", 5)


def test_the_answer_is_taken_between_its_own_markers() -> None:
    stale = b"HF-BEGIN old\nlate output\nHF-END old 124\n"
    mine = b"HF-BEGIN new\nline 1\nline 2\nHF-END new 1\n"
    assert parse_answer("new", stale + mine) == GuestResult(status=1, output="line 1\nline 2\n")
    assert parse_answer("new", stale + mine[:-14]) is None  # not ended yet
    assert parse_answer("old", stale).status == 124  # type: ignore[union-attr]


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Path]:
    """busybox running the guest's hf-shell on a raw pty (the port), relayed to a unix socket (QEMU's end)."""
    if shutil.which("busybox") is None:
        pytest.skip("busybox is not installed")
    script = tmp_path / "hf-shell"
    script.write_text(shell_script())
    master, slave = os.openpty()
    tty.setraw(slave)
    proc = subprocess.Popen(["busybox", "sh", str(script), os.ttyname(slave)])
    path = tmp_path / "shell.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stop = threading.Event()

    def relay() -> None:  # one client at a time, as QEMU's chardev server
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with client:
                os.write(master, client.recv(65536))
                buf = b""
                while b"HF-END" not in buf or not buf.endswith(b"\n"):
                    buf += os.read(master, 65536)
                client.sendall(buf)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        listener.close()
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)


def test_the_guest_loop_runs_the_command_and_reports_its_status(guest: Path) -> None:
    result = run_in_guest(guest, "echo hello; echo oops >&2; exit 3", timeout=5)
    assert result == GuestResult(status=3, output="hello\noops\n")
    assert run_in_guest(guest, "true").ok


def test_the_guest_stops_a_command_that_runs_too_long(guest: Path) -> None:
    result = run_in_guest(guest, "sleep 30", timeout=1)
    assert not result.ok and result.status in (124, 143)


def test_no_guest_is_a_temporary_error_that_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(TemporaryError, match="is the guest running"):
        run_in_guest(tmp_path / "absent.sock", "true", timeout=1)
    assert not os.path.exists(tmp_path / "absent.sock")
