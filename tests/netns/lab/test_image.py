"""The lab guest image on a real QEMU (TCG): it boots, brings eth0 up from the kernel command line, answers a
ping and HTTP from the host side, and its agent sends signed frames (hello, then a beat with resources) over
virtio-serial.

The image is built once into /var/lib/hyperfence/images (or $HF_IMAGE_DIR) and reused by later runs. One
guest is booted, in a throwaway network namespace holding a bridge (10.99.0.1/24) and a tap; QEMU is
stopped by its PID and the namespace deleted whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hyperfence import wire
from hyperfence.lab.guest_init import AGENT_PORT_NAME, kernel_cmdline
from hyperfence.lab.image import DEFAULT_OUT, GuestImage, build_image

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the image and network namespaces need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

VM_ID = "test-vm"
GUEST_IP = "10.99.0.2"
HOST_IP = "10.99.0.1"
DEADLINE = 60.0
HTTP_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(Path(os.environ.get("HF_IMAGE_DIR", str(DEFAULT_OUT))))


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with bridge br0 (10.99.0.1/24) and tap0 on it; deleted at the end, even on failure."""
    name = "hfimg-" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (
            ["link", "set", "lo", "up"],
            ["link", "add", "br0", "type", "bridge"],
            ["addr", "add", f"{HOST_IP}/24", "dev", "br0"],
            ["link", "set", "br0", "up"],
            ["tuntap", "add", "dev", "tap0", "mode", "tap"],
            ["link", "set", "tap0", "master", "br0"],
            ["link", "set", "tap0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@dataclass
class Console:
    """The guest's serial console, read by a thread: every line with its time since QEMU started."""

    start: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.append((time.monotonic() - self.start, raw.decode(errors="replace").rstrip("\r\n")))

    def when(self, marker: str) -> float | None:
        return next((t for t, line in self.lines if marker in line), None)

    def text(self) -> str:
        return "\n".join(f"{t:6.2f} {line}" for t, line in self.lines)


def test_the_guest_boots_reports_and_answers(image: GuestImage, netns: str, tmp_path: Path) -> None:
    key = secrets.token_bytes(32)
    config = {
        "version": 1,
        "vm": VM_ID,
        "key": key.hex(),
        "interval": 0.5,
        "channel": {"type": "virtio", "name": AGENT_PORT_NAME},
        "auth_logs": [],
    }
    sock_path = tmp_path / "agent.sock"
    argv = [
        "ip", "netns", "exec", netns,  # execs QEMU: the PID is QEMU's
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-nodefaults",
        "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", kernel_cmdline(ip=f"{GUEST_IP}/24", gw=HOST_IP, agent_config=config),
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-chardev", f"socket,id=c0,path={sock_path},server=on,wait=off",
        "-device", "virtio-serial", "-device", f"virtserialport,chardev=c0,name={AGENT_PORT_NAME}",
    ]  # fmt: skip
    start = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(start)
    reader = threading.Thread(target=console.read, args=(qemu.stdout,), daemon=True)
    reader.start()
    try:
        bodies, first_frame = _read_agent(sock_path, key, start, qemu)
        kinds = [b["kind"] for b in bodies]
        assert kinds[:1] == ["hello"], (kinds, console.text())
        beats = [b for b in bodies if b["kind"] == "beat"]
        assert beats and "mem" in beats[0]["data"]["res"], (bodies[:2], console.text())
        assert bodies[0]["data"]["python"] == image.python_version
        assert console.when("HF: net up") is not None, console.text()
        assert _retry(["ping", "-c", "1", "-W", "1", GUEST_IP], netns), console.text()
        page = subprocess.run(
            ["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", HTTP_GET, f"http://{GUEST_IP}:8080/"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert "hyperfence lab guest" in page.stdout, (page.stderr, console.text())
        net_up = console.when("HF: net up")
        print(
            f"\nlab image: initrd {image.initrd_bytes / 1e6:.1f} MB ({image.initrd_unpacked_bytes / 1e6:.1f} MB "
            f"unpacked), kernel {image.kernel_bytes / 1e6:.1f} MB; boot -> net up {net_up:.1f} s, "
            f"boot -> first agent frame {first_frame:.1f} s"
        )
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
        reader.join(timeout=5)
        if qemu.stdout is not None:
            qemu.stdout.close()


def _read_agent(
    sock_path: Path, key: bytes, start: float, qemu: subprocess.Popen[bytes]
) -> tuple[list[dict[str, Any]], float]:
    """Frames from the agent until a beat arrived: their verified bodies, and when the first came."""
    while not sock_path.exists():
        assert qemu.poll() is None, "QEMU exited before making its chardev socket"
        assert time.monotonic() - start < 10, "QEMU made no chardev socket in 10 s"
        time.sleep(0.05)
    reader = wire.FrameReader()
    bodies: list[dict[str, Any]] = []
    first = 0.0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.settimeout(1.0)
        while not any(b["kind"] == "beat" for b in bodies):
            assert qemu.poll() is None, f"QEMU exited (status {qemu.returncode})"
            assert time.monotonic() - start < DEADLINE, f"no beat in {DEADLINE:.0f} s: {bodies}"
            with contextlib.suppress(TimeoutError):
                data = s.recv(65536)
                assert data, "QEMU closed the agent socket"
                for frame in reader.feed(data):
                    bodies.append(wire.verify(key, frame, VM_ID))
                    first = first or time.monotonic() - start
    return bodies, first


def _retry(argv: list[str], netns: str, *, tries: int = 5) -> bool:
    for _ in range(tries):
        if (
            subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, check=False).returncode
            == 0
        ):
            return True
    return False
