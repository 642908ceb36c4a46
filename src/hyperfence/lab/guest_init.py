"""What the lab guest runs at boot, and the kernel command line that configures it (pure: text in, text out).

The guest (`hyperfence lab image`, docs/guests.md) is one initramfs shared by every VM, so everything that
differs per VM comes on the kernel command line, read by `/init` from ``/proc/cmdline``:

    hf.ip=10.77.0.11/22     the address of eth0 (CIDR); without it, eth0 asks DHCP (busybox udhcpc)
    hf.gw=10.77.0.1         the default gateway (optional)
    hf.agent=<base64>       the agent's JSON config (`hyperfence/agent/config.py`), key included; without
                            it no agent starts
    hf.port=8080            the port of the tiny HTTP server for tests (default 8080; 0: none)

The agent's config (key included) is best handed over as a QEMU firmware-config file, ``opt/org.hyperfence/
agent`` (libvirt: ``<sysinfo type='fwcfg'><entry name='opt/org.hyperfence/agent' file='…'/>``): the host keeps
it in a 0600 file, QEMU's command line names only the path, and in the guest it is readable by root only
(``/sys/firmware/qemu_fw_cfg``). ``hf.agent=`` is the fallback for plain ``qemu -append``; on the command line
the key is visible to every local user of the host (``ps``) and to the guest's ``/proc/cmdline``.

Two virtio-serial ports: `AGENT_PORT_NAME` for the agent and, for tests and the demo only, `SHELL_PORT_NAME`,
the **lab shell**: ``/bin/hf-shell`` runs each line the host writes there (``<tag> <seconds> <command>``) and
answers ``HF-BEGIN <tag>``, the output, ``HF-END <tag> <status>`` (`hyperfence.lab.guest_shell`). It lets a test
act inside the guest without using the network it is testing. It is root in the guest for whoever can open
the host socket (root): never give it to a production guest.

Everything `/init` says on the serial console starts with ``HF: `` so a test (or a person) can follow the
boot: ``HF: init``, ``HF: net up``, ``HF: agent port``, ``HF: agent started pid N``, ``HF: http on``,
``HF: ready``; failures say ``FAILED`` and what to check.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from hyperfence.codec.libvirt_xml import AGENT_CHANNEL, AGENT_FW_CFG
from hyperfence.errors import InvalidInputError, Problem

AGENT_PORT_NAME = AGENT_CHANNEL
SHELL_PORT_NAME = "org.hyperfence.lab.shell"
SHELL = "/bin/hf-shell"
AGENT_ZIPAPP = "/opt/hyperfence-agent.pyz"
AGENT_CONFIG = "/etc/hyperfence-agent.json"
AGENT_CONTROL = "/bin/hf-agent"
MODULE_DIR = "/lib/modules/hf"
HTTP_ROOT = "/srv/www"
DEFAULT_HTTP_PORT = 8080
# insmod order: each module only after those it depends on (there is no modprobe/depmod data in the guest)
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "qemu_fw_cfg",
)
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet"
MAX_CMDLINE = 2047  # x86 COMMAND_LINE_SIZE is 2048 bytes, NUL included

INIT = r"""#!/bin/busybox sh
# /init of the hyperfence lab guest (written by hyperfence.lab.guest_init; see docs/guests.md).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /var/log
mount -t devpts devpts /dev/pts 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
echo "HF: init uptime=$(up)"
for m in @MODULES@; do
  [ -e /sys/module/$m ] || insmod @MODULE_DIR@/$m.ko || echo "HF: insmod $m FAILED (is @MODULE_DIR@/$m.ko for this kernel?)"
done
IP=; GW=; AGENT=; PORT=@HTTP_PORT@
for a in $(cat /proc/cmdline); do
  case "$a" in
    hf.ip=*) IP=${a#hf.ip=} ;;
    hf.gw=*) GW=${a#hf.gw=} ;;
    hf.agent=*) AGENT=${a#hf.agent=} ;;
    hf.port=*) PORT=${a#hf.port=} ;;
  esac
done
hostname hf-guest
ip link set lo up
for i in $(seq 1 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.05; done
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  if [ -n "$IP" ]; then
    ip addr add "$IP" dev eth0 || echo "HF: net FAILED: cannot set hf.ip=$IP"
    [ -z "$GW" ] || ip route add default via "$GW" || echo "HF: net FAILED: cannot set hf.gw=$GW"
  else
    udhcpc -i eth0 -n -q -t 5 -T 1 -s /etc/udhcpc.sh >/dev/null 2>&1 || echo "HF: net FAILED: no DHCP answer (boot with hf.ip=A/N)"
  fi
  echo "HF: net up eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}') uptime=$(up)"
else
  echo "HF: net FAILED: no eth0 (give QEMU a virtio-net-pci device)"
fi
# findport NAME TRIES: the /dev node of the virtio-serial port called NAME (polls TRIES x 50 ms)
findport() {
  for i in $(seq 1 "$2"); do
    for d in /sys/class/virtio-ports/*; do
      [ -r "$d/name" ] && [ "$(cat "$d/name")" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
    done
    sleep 0.05
  done
  return 1
}
if PORTDEV=$(findport @PORT_NAME@ 100); then
  echo "HF: agent port $PORTDEV"
else
  echo "HF: agent port FAILED: no virtio-serial port named @PORT_NAME@ (add -device virtserialport,name=@PORT_NAME@)"
fi
if SHELLDEV=$(findport @SHELL_PORT@ 1); then
  @SHELL@ "$SHELLDEV" </dev/null >/dev/null 2>&1 &
  echo "HF: lab shell on $SHELLDEV pid $!"
fi
FWCFG=/sys/firmware/qemu_fw_cfg/by_name/@FW_CFG_AGENT@/raw
if [ -r "$FWCFG" ]; then
  (umask 077; cat "$FWCFG" > @AGENT_CONFIG@) && echo "HF: agent config from fw_cfg @FW_CFG_AGENT@"
elif [ -n "$AGENT" ]; then
  (umask 077; echo "$AGENT" | base64 -d > @AGENT_CONFIG@) || echo "HF: agent FAILED: hf.agent= is not base64"
fi
if [ -s @AGENT_CONFIG@ ]; then
  chmod 600 @AGENT_CONFIG@
  @AGENT_CONTROL@ start
else
  echo "HF: agent not started (no fw_cfg @FW_CFG_AGENT@ and no hf.agent= on the kernel command line)"
fi
if [ "$PORT" != 0 ]; then
  httpd -f -p "$PORT" -h @HTTP_ROOT@ &
  echo "HF: http on :$PORT pid $!"
fi
echo "HF: ready uptime=$(up) (console shell: hf-agent stop|start|status)"
while true; do
  setsid cttyhack sh
  sleep 1
done
"""

AGENT_CONTROL_SCRIPT = r"""#!/bin/sh
# hf-agent start|stop|status: the hyperfence agent of this lab guest (see docs/guests.md).
PIDFILE=/run/hf-agent.pid
running() { [ -f $PIDFILE ] && kill -0 "$(cat $PIDFILE)" 2>/dev/null; }
case "$1" in
  start)
    if running; then echo "HF: agent already running pid $(cat $PIDFILE)"; exit 0; fi
    [ -f @AGENT_CONFIG@ ] || { echo "HF: agent FAILED: no @AGENT_CONFIG@ (boot with hf.agent=...)"; exit 1; }
    python3 @AGENT_ZIPAPP@ --config @AGENT_CONFIG@ </dev/null >/dev/console 2>&1 &
    echo $! > $PIDFILE
    echo "HF: agent started pid $!"
    ;;
  stop)
    if running; then kill "$(cat $PIDFILE)"; echo "HF: agent stopped pid $(cat $PIDFILE)"; rm -f $PIDFILE
    else echo "HF: agent not running"; fi
    ;;
  status)
    if running; then echo "HF: agent running pid $(cat $PIDFILE)"; else echo "HF: agent not running"; exit 1; fi
    ;;
  *) echo "usage: hf-agent start|stop|status"; exit 2 ;;
esac
"""

SHELL_SCRIPT = r"""#!/bin/sh
# hf-shell DEV: the lab shell (tests and demo only; see docs/guests.md). Each line the host writes to the
# virtio-serial port DEV is "<tag> <seconds> <command>"; the command runs under `timeout`, and the answer is
# "HF-BEGIN <tag>", its output (stdout and stderr), "HF-END <tag> <status>". While no host is connected,
# reads end at once (EOF): poll.
exec 3<>"$1"
while true; do
  if read -r tag secs cmd <&3; then
    echo "HF-BEGIN $tag" >&3
    timeout "$secs" sh -c "$cmd" </dev/null >&3 2>&1
    echo "HF-END $tag $?" >&3
  else
    sleep 0.2
  fi
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script of the hyperfence lab guest: set the offered address and router on $interface.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    ;;
esac
exit 0
"""

HTTP_INDEX = "hyperfence lab guest\n"


def init_script(*, modules: tuple[str, ...] = MODULES, http_port: int = DEFAULT_HTTP_PORT) -> str:
    """The guest's `/init` (a busybox sh script): loads `modules` in this order, then network, agent, HTTP."""
    return _fill(INIT, MODULES=" ".join(modules), HTTP_PORT=str(http_port))


def agent_control_script() -> str:
    """`/bin/hf-agent start|stop|status`: how `/init` and a person on the console run the agent."""
    return _fill(AGENT_CONTROL_SCRIPT)


def shell_script() -> str:
    """`/bin/hf-shell DEV`: the lab shell's loop (`SHELL_PORT_NAME`)."""
    return SHELL_SCRIPT


def udhcpc_script() -> str:
    return UDHCPC_SCRIPT


def agent_param(config: Mapping[str, Any]) -> str:
    """`hf.agent=<base64 of the compact JSON config>` (no spaces, so the kernel keeps it as one word)."""
    text = json.dumps(dict(config), separators=(",", ":"), sort_keys=True)
    return "hf.agent=" + base64.b64encode(text.encode("utf-8")).decode("ascii")


def kernel_cmdline(
    *,
    ip: str | None = None,
    gw: str | None = None,
    agent_config: Mapping[str, Any] | None = None,
    http_port: int | None = None,
    extra: str = "",
) -> str:
    """The kernel command line for one lab guest. InvalidInputError if a value would break the line or the
    line is longer than the kernel keeps (2047 bytes)."""
    problems: list[Problem] = []
    words = [BASE_CMDLINE]
    for name, value in (("hf.ip", ip), ("hf.gw", gw)):
        if value is None:
            continue
        if not value or any(c.isspace() for c in value):
            problems.append(Problem(name, f"{value!r} (expected an address without spaces)"))
        words.append(f"{name}={value}")
    if http_port is not None:
        if not 0 <= http_port <= 65535:
            problems.append(Problem("hf.port", f"{http_port} (expected 0 to 65535; 0: no server)"))
        words.append(f"hf.port={http_port}")
    if agent_config is not None:
        words.append(agent_param(agent_config))
    if extra:
        words.append(extra)
    line = " ".join(words)
    if len(line) > MAX_CMDLINE:
        problems.append(
            Problem(
                "cmdline", f"{len(line)} bytes (the kernel keeps {MAX_CMDLINE}); shorten the agent config"
            )
        )
    if problems:
        raise InvalidInputError("cannot make the guest's kernel command line", problems)
    return line


def _fill(template: str, **extra: str) -> str:
    values = {
        "MODULE_DIR": MODULE_DIR,
        "PORT_NAME": AGENT_PORT_NAME,
        "AGENT_CONFIG": AGENT_CONFIG,
        "AGENT_CONTROL": AGENT_CONTROL,
        "AGENT_ZIPAPP": AGENT_ZIPAPP,
        "HTTP_ROOT": HTTP_ROOT,
        "SHELL_PORT": SHELL_PORT_NAME,
        "SHELL": SHELL,
        "FW_CFG_AGENT": AGENT_FW_CFG,
        **extra,
    }
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    return template
