"""Run a command inside a lab guest through its lab shell port (tests and demo only; docs/guests.md).

The guest's ``/bin/hf-shell`` reads ``<tag> <seconds> <command>`` lines from the virtio-serial port
``org.hyperfence.lab.shell``; QEMU exposes the host end as a unix socket (`hyperfence.lab.domains`). The answer
is ``HF-BEGIN <tag>``, the output, ``HF-END <tag> <status>``; a random tag per call keeps the output of an
earlier call that timed out from being taken for this one's. Independent of the guest's network, so a test can
look at the firewall from inside a guest without going through it.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hyperfence.errors import InvalidInputError, Problem, TemporaryError

MAX_OUTPUT = 1 << 20


@dataclass(frozen=True)
class GuestResult:
    status: int  # the command's exit status; 124 or 143 when the guest's `timeout` stopped it
    output: str  # stdout and stderr, interleaved as the guest wrote them

    @property
    def ok(self) -> bool:
        return self.status == 0


def command_line(tag: str, command: str, seconds: int) -> bytes:
    """The line the guest's shell reads. Pure; `InvalidInputError` for a command it could not take."""
    problems = []
    if not command.strip() or "\n" in command or "\r" in command:
        problems.append(Problem("command", f"{command!r} (expected one non-empty line)"))
    if not 1 <= seconds <= 3600:
        problems.append(Problem("seconds", f"{seconds} (expected 1 to 3600)"))
    if problems:
        raise InvalidInputError("cannot send this command to the guest", problems)
    return f"{tag} {seconds} {command}\n".encode()


def parse_answer(tag: str, data: bytes) -> GuestResult | None:
    """The result for `tag` in what the guest wrote so far, or None until its end line has arrived."""
    text = data.decode("utf-8", errors="replace")
    end = re.search(rf"^HF-END {re.escape(tag)} (\d+)\r?$", text, re.MULTILINE)
    if end is None:
        return None
    begin = re.search(rf"^HF-BEGIN {re.escape(tag)}\r?\n", text[: end.start()], re.MULTILINE)
    output = text[begin.end() if begin else 0 : end.start()]
    return GuestResult(status=int(end.group(1)), output=output)


def run_in_guest(sock_path: str | Path, command: str, *, timeout: float = 30.0) -> GuestResult:
    """Run `command` (one shell line) in the guest whose lab shell socket is `sock_path`.

    The guest stops the command after `timeout` seconds; `TemporaryError` if no answer came by then (the guest
    has not booted its shell yet, or is paused).
    """
    tag = secrets.token_hex(4)
    line = command_line(tag, command, max(1, int(timeout)))
    deadline = time.monotonic() + timeout + 5.0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(str(sock_path))
            s.sendall(line)
            data = b""
            while (result := parse_answer(tag, data)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or len(data) > MAX_OUTPUT:
                    break
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise TemporaryError(
            f"lab shell {sock_path}: {e}: is the guest running (lab up --qemu) and booted?", retry_after=1.0
        ) from e
    if result is None:
        raise TemporaryError(
            f"lab shell {sock_path}: no answer to {command!r} within {timeout:.0f} s "
            f"(got {len(data)} bytes): has the guest booted (its console says 'HF: lab shell')?",
            retry_after=1.0,
        )
    return result


def wait_for_shell(sock_path: str | Path, *, timeout: float = 90.0) -> float:
    """Wait until the guest's lab shell answers; the seconds it took. `TemporaryError` after `timeout`."""
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            if run_in_guest(sock_path, "true", timeout=3).ok:
                return time.monotonic() - t0
        except TemporaryError as e:
            last = e
        time.sleep(0.5)
    raise TemporaryError(f"lab shell {sock_path} did not answer in {timeout:.0f} s: {last}", retry_after=5.0)
