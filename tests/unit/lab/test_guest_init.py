"""The lab guest's boot scripts and kernel command line (hyperfence.lab.guest_init)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from hyperfence.errors import InvalidInputError
from hyperfence.lab.guest_init import (
    AGENT_CONFIG,
    AGENT_PORT_NAME,
    MAX_CMDLINE,
    MODULES,
    SHELL,
    SHELL_PORT_NAME,
    agent_control_script,
    agent_param,
    init_script,
    kernel_cmdline,
    shell_script,
    udhcpc_script,
)

CONFIG = {"version": 1, "vm": "test-vm", "key": "ab" * 32, "channel": {"type": "virtio"}}


def test_init_loads_the_modules_in_dependency_order() -> None:
    script = init_script()
    assert f"for m in {' '.join(MODULES)}; do" in script
    assert MODULES.index("virtio_ring") < MODULES.index("virtio") < MODULES.index("virtio_pci")
    assert MODULES.index("failover") < MODULES.index("net_failover") < MODULES.index("virtio_net")


def test_init_reads_its_settings_from_the_command_line_and_marks_each_step() -> None:
    script = init_script(http_port=9000)
    assert script.startswith("#!/bin/busybox sh\n")
    for param in ("hf.ip=*", "hf.gw=*", "hf.agent=*", "hf.port=*"):
        assert param in script
    assert "PORT=9000" in script
    assert f"findport {AGENT_PORT_NAME} 100" in script
    for marker in ("HF: init", "HF: net up", "HF: agent port", "HF: ready", "udhcpc -i eth0"):
        assert marker in script
    assert f"base64 -d > {AGENT_CONFIG}" in script and "umask 077" in script
    assert "@" not in script.replace("$@", "")  # every placeholder filled


def test_init_takes_the_agent_config_from_fw_cfg_before_the_command_line() -> None:
    script = init_script()
    fw_cfg = script.index("/sys/firmware/qemu_fw_cfg/by_name/opt/org.hyperfence/agent/raw")
    assert fw_cfg < script.index('echo "$AGENT" | base64 -d')
    assert "qemu_fw_cfg" in MODULES


def test_init_starts_the_lab_shell_only_when_its_port_exists() -> None:
    script = init_script()
    assert f"if SHELLDEV=$(findport {SHELL_PORT_NAME} 1); then" in script
    assert f'{SHELL} "$SHELLDEV"' in script


def test_the_agent_control_script_starts_stops_and_reports() -> None:
    script = agent_control_script()
    assert "python3 /opt/hyperfence-agent.pyz --config /etc/hyperfence-agent.json" in script
    for word in ("start)", "stop)", "status)", "HF: agent started pid $!"):
        assert word in script
    assert "@" not in script


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
@pytest.mark.parametrize("script", [init_script(), agent_control_script(), shell_script(), udhcpc_script()])
def test_the_scripts_are_valid_shell(script: str) -> None:
    proc = subprocess.run(["busybox", "sh", "-n"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_agent_config_travels_as_one_base64_word() -> None:
    param = agent_param(CONFIG)
    assert param.startswith("hf.agent=") and " " not in param
    assert json.loads(base64.b64decode(param.removeprefix("hf.agent="))) == CONFIG


def test_kernel_cmdline_has_console_addresses_and_agent() -> None:
    line = kernel_cmdline(ip="10.99.0.2/24", gw="10.99.0.1", agent_config=CONFIG, http_port=0)
    words = line.split()
    assert words[:3] == ["console=ttyS0", "panic=-1", "quiet"]
    assert {"hf.ip=10.99.0.2/24", "hf.gw=10.99.0.1", "hf.port=0", agent_param(CONFIG)} <= set(words)
    assert kernel_cmdline() == "console=ttyS0 panic=-1 quiet"


def test_kernel_cmdline_refuses_what_would_break_the_line() -> None:
    with pytest.raises(InvalidInputError) as info:
        kernel_cmdline(ip="10.0.0.1 /24", http_port=70000, agent_config={"x": "y" * MAX_CMDLINE})
    paths = [p.path for p in info.value.problems]
    assert paths == ["hf.ip", "hf.port", "cmdline"]
