"""The host-root guest (pure: text in, text out): a QEMU TCG guest that boots Debian's stock kernel and runs
one command on **this host's own userland**, so hyperfence's kernel tests run against a real distribution
kernel (docs/hostroot.md).

Why: this machine's kernel has no loadable modules and no bridge-family conntrack or reject; a stock
Debian 12 KVM host runs `linux-image-6.1.0-N-amd64`, where br_netfilter is a module nothing loads and
`nf_conntrack_bridge` / `nft_reject_bridge` exist as modules. The guest boots that kernel with its whole
module tree, so the kernel autoloads modules (`modprobe`) as on such a host.

How (`hostroot_guest` does the I/O):

* a small initramfs (busybox and the modules needed to reach the root: virtio, 9p, overlay, in dependency
  order from `modules.dep`) whose ``/init`` (`init_script`) mounts the host's ``/`` read-only over 9p
  (mount tag `ROOT_TAG`), puts a tmpfs overlay on it for writes, fresh tmpfs on ``/run`` and ``/tmp``, and
  the run's directory on the host (mount tag `OUT_TAG`, read-write) at `GUEST_OUT`, then switch_roots into
  the overlay and runs `GUEST_OUT`/`STAGE2`;
* `stage2_script` (written per run) mounts what a userland expects (devpts, /dev/shm, cgroups are not
  needed), binds the kernel's module tree at ``/lib/modules/<release>``, runs the command from its
  directory with its environment, its output going to `GUEST_OUT`/`OUTPUT` (read live by the host) and its
  exit status to `GUEST_OUT`/`STATUS`, then powers the guest off.

Everything `/init` and stage 2 say on the serial console starts with ``HFG: `` (``HFG: ready uptime=N``
when the command starts; ``FAILED`` and what to check when something does not work).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from hyperfence.errors import InvalidInputError, Problem

ROOT_TAG = "hfroot"
OUT_TAG = "hfout"
WORK_TAG = "hfwork"  # the command's directory, shared on its own (it may be on /tmp, which the guest hides)
GUEST_OUT = "/run/hf-out"  # where the run's host directory is mounted in the guest
STAGE2 = "stage2.sh"
OUTPUT = "output"  # the command's stdout and stderr
STATUS = "status"  # its exit status, written once it ended
READY = "ready"  # the guest's uptime when the command started (the boot time)
MOD_DIR = "/mods"  # in the initramfs
# What the initramfs loads to reach the root; their dependencies come from modules.dep.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
CMDLINE = "console=ttyS0 panic=-1 quiet"
ENV_NAME = "HF_GUEST"  # set in the command's environment: the kernel release it runs on
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INIT = r"""#!/bin/busybox sh
# /init of the hyperfence host-root guest (written by hyperfence.lab.hostroot; see docs/hostroot.md).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "HFG: $* FAILED"; poweroff -f; }
echo "HFG: init uptime=$(up)"
for m in @MODULES@; do
  insmod @MOD_DIR@/$m.ko || fail "insmod $m (is the initramfs built for $(uname -r)?)"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose @ROOT_TAG@ /lower \
  || fail "mounting the host's root (give QEMU -virtfs local,path=/,mount_tag=@ROOT_TAG@,readonly=on)"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mkdir -p /newroot@GUEST_OUT@
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 @OUT_TAG@ /newroot@GUEST_OUT@ \
  || fail "mounting the run's directory (give QEMU -virtfs local,path=DIR,mount_tag=@OUT_TAG@)"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
echo "HFG: root uptime=$(cut -d' ' -f1 /newroot/proc/uptime)"
exec switch_root /newroot /bin/sh @GUEST_OUT@/@STAGE2@
"""

STAGE2_SCRIPT = r"""# stage 2 of the hyperfence host-root guest (written per run by hyperfence.lab.hostroot).
export PATH=@PATH@ HOME=/root LANG=C.UTF-8 @ENV_NAME@=$(uname -r)
out=@GUEST_OUT@
up() { cut -d' ' -f1 /proc/uptime; }
finish() { sync; echo "HFG: done status=$1 uptime=$(up)"; /bin/busybox poweroff -f; }
mkdir -p /dev/pts /dev/shm /run/netns /run/lock
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
mods=/lib/modules/$(uname -r)
mkdir -p "$mods" && mount --bind @MODULES@/lib/modules/$(uname -r) "$mods" \
  || { echo "HFG: module tree FAILED (@MODULES@/lib/modules/$(uname -r))"; finish 125; }
hostname hf-hostroot
ip link set lo up
@EXPORTS@
# The command's directory comes as a share of its own, read-only, at the same path: the root's share shows
# only the host's root filesystem, and the guest's fresh /tmp and /run hide those of the host.
mkdir -p @CWD@ && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose @WORK_TAG@ @CWD@ \
  || { echo "HFG: mounting @CWD@ FAILED (give QEMU -virtfs local,path=@CWD@,mount_tag=@WORK_TAG@)"; finish 125; }
cd @CWD@ || { echo "HFG: cd @CWD@ FAILED"; finish 125; }
up > "$out/@READY@"
echo "HFG: ready uptime=$(up)"
@COMMAND@ > "$out/@OUTPUT@" 2>&1 < /dev/null
rc=$?
echo "$rc" > "$out/@STATUS@.tmp" && mv "$out/@STATUS@.tmp" "$out/@STATUS@"
finish "$rc"
"""


def module_name(path: str) -> str:
    """`kernel/fs/9p/9p.ko` (or `.ko.xz`) -> `9p`. Names as the kernel writes them (`-` and `_` alike)."""
    base = PurePosixPath(path).name
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """`modules.dep` (depmod's output) as {module path: the paths it needs}. ValueError on a line that is
    not `path: [dep ...]`."""
    deps: dict[str, tuple[str, ...]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, rest = line.partition(":")
        if not sep or not path.strip():
            raise ValueError(f"modules.dep line {n}: {line[:80]!r} (expected 'path.ko: dep.ko ...')")
        deps[path.strip()] = tuple(rest.split())
    return deps


def insmod_order(deps: Mapping[str, Sequence[str]], wanted: Sequence[str]) -> list[str]:
    """The module paths to load, each after everything it needs, for the modules named `wanted` (names, not
    paths; built-in ones are simply absent from `deps` and skipped by the caller). InvalidInputError naming
    every wanted module that `deps` lacks."""
    by_name = {module_name(p): p for p in deps}
    missing = [w for w in wanted if w.replace("-", "_") not in by_name]
    if missing:
        raise InvalidInputError(
            "the kernel's modules.dep lacks modules the guest needs",
            [Problem(f"modules[{m}]", "not in modules.dep (built in? then leave it out)") for m in missing],
        )
    order: list[str] = []

    def visit(path: str, seen: tuple[str, ...]) -> None:
        if path in order:
            return
        if path in seen:
            raise InvalidInputError(
                "modules.dep has a dependency cycle",
                [Problem("modules.dep", " -> ".join((*seen, path)))],
            )
        for dep in deps.get(path, ()):
            visit(dep, (*seen, path))
        order.append(path)

    for w in wanted:
        visit(by_name[w.replace("-", "_")], ())
    return order


def init_script(modules: Sequence[str]) -> str:
    """The initramfs's `/init`: loads `modules` (names, in this order) from `MOD_DIR`, mounts the root."""
    return _fill(INIT, MODULES=" ".join(modules))


def stage2_script(
    *, command: Sequence[str], cwd: str, modules: str, env: Mapping[str, str] | None = None
) -> str:
    """Stage 2 for one run: `command` (argv, run without a shell) in `cwd` with `env` added, the kernel's
    module tree taken from `modules` (a host directory holding `lib/modules/<release>`). InvalidInputError
    naming each bad value."""
    problems: list[Problem] = []
    if not command:
        problems.append(Problem("command", "empty (expected the program and its arguments)"))
    for field, value in (("cwd", cwd), ("modules", modules)):
        if not value.startswith("/"):
            problems.append(Problem(field, f"{value!r} (expected an absolute path)"))
    for name in env or {}:
        if not name.isidentifier() or not name.isascii():
            problems.append(
                Problem(f"env[{name}]", "not a valid variable name (expected [A-Za-z_][A-Za-z0-9_]*)")
            )
    if problems:
        raise InvalidInputError("cannot write the guest's run script", problems)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
    return _fill(
        STAGE2_SCRIPT,
        EXPORTS=exports,
        CWD=shlex.quote(cwd),
        MODULES=shlex.quote(modules),
        COMMAND=shlex.join(command),
    )


def qemu_argv(
    *,
    kernel: str,
    initrd: str,
    run_dir: str,
    console: str,
    work_dir: str = "/",
    memory_mib: int = 2048,
    smp: int = 2,
    qemu: str = "qemu-system-x86_64",
) -> list[str]:
    """QEMU's command line: TCG (no KVM here), `-cpu max` (numpy and other wheels need more than qemu64's
    x86-64-v1), the host's `/` and the command's `work_dir` read-only and `run_dir` read-write over 9p, the
    serial console to the file `console`, no reboot (the guest's poweroff ends QEMU)."""
    return [
        qemu, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(smp),
        "-nodefaults", "-nographic", "-no-reboot", "-serial", f"file:{console}",
        "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE,
        "-virtfs", f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag={OUT_TAG},security_model=none",
        "-virtfs", f"local,path={work_dir},mount_tag={WORK_TAG},security_model=none,readonly=on",
    ]  # fmt: skip


def _fill(template: str, **extra: str) -> str:
    """`template` with each `@NAME@` replaced in one pass (a value that holds `@X@` is left as it is)."""
    values = {
        "MOD_DIR": MOD_DIR,
        "ROOT_TAG": ROOT_TAG,
        "OUT_TAG": OUT_TAG,
        "WORK_TAG": WORK_TAG,
        "GUEST_OUT": GUEST_OUT,
        "STAGE2": STAGE2,
        "OUTPUT": OUTPUT,
        "STATUS": STATUS,
        "READY": READY,
        "PATH": PATH,
        "ENV_NAME": ENV_NAME,
        **extra,
    }
    return re.sub(r"@([A-Z_0-9]+)@", lambda m: values.get(m.group(1), m.group(0)), template)
