"""Run a command in the host-root guest: Debian's stock kernel under QEMU TCG, this host's userland
(`hostroot` says how and why; docs/hostroot.md).

`prepare_boot` makes the boot files once, under ``<images>/hostroot`` (default
``/var/lib/hyperfence/images/hostroot``, next to `lab image`'s guest): the kernel package `lab image` uses
(`guest_kernel`: downloaded with `apt-get download` into ``<images>/cache/debs`` under the same lock), its
kernel and whole module tree unpacked (~400 MB), `depmod` run on it, and a ~1.5 MB initramfs. A manifest
records the inputs; while they are the same the files are reused.

`run_in_hostroot` boots a guest for one command and returns its exit status and output; the boot takes a
few seconds, everything after it runs ~10-30x slower than on the host (TCG). The guest reads the whole
host filesystem (read-only) as root: it is a test harness for the host's own administrator, never a place
for untrusted code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hyperfence.errors import BugError, NotFoundError, PermissionDeniedError
from hyperfence.lab import hostroot
from hyperfence.lab.guest_kernel import download_package, find_kernel_package
from hyperfence.lab.image import BUSYBOX, DEFAULT_OUT, locked
from hyperfence.system.state_dir import DIR_MODE, make_dirs

BUILDER = 1  # bump when the boot files' layout changes: older ones are rebuilt
SUBDIR = "hostroot"
MANIFEST = "manifest.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.cpio.gz"
TREE = "tree"  # holds lib/modules/<release>
POLL = 0.25  # how often the host reads the guest's output while it runs
CONSOLE_TAIL = 3000


@dataclass(frozen=True)
class HostrootBoot:
    """What `run_in_hostroot` boots: `kernel` and `initrd`, the module tree under `tree`."""

    kernel: Path
    initrd: Path
    tree: Path  # a directory holding lib/modules/<release>
    release: str  # 6.1.0-57-amd64
    kernel_package: str  # linux-image-6.1.0-57-amd64=6.1.192-3
    build_seconds: float
    reused: bool


@dataclass(frozen=True)
class HostrootRun:
    """One run. `status` is the command's exit status, None when it never ended (timeout, or the guest died:
    `console` says why)."""

    status: int | None
    output: str
    console: str  # the tail of the guest's serial console
    boot_seconds: float | None  # the guest's uptime when the command started
    seconds: float  # wall clock, QEMU's start to its end
    timed_out: bool


def prepare_boot(images: Path = DEFAULT_OUT, *, force: bool = False) -> HostrootBoot:
    """The boot files under `images`/hostroot, made unless intact ones from the same inputs are there.
    PermissionDeniedError (not root), NotFoundError (a tool or package is missing: what to install),
    TemporaryError (apt-get download failed)."""
    if os.geteuid() != 0:
        raise PermissionDeniedError("the host-root guest needs root (its files are owned by root)")
    for tool, package in (("depmod", "kmod"), ("cpio", "cpio"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise NotFoundError(f"{tool} is missing: apt-get install {package}")
    if not Path(BUSYBOX).exists():
        raise NotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    images = Path(images)
    out = images / SUBDIR
    make_dirs(images.parent, mode=DIR_MODE)  # as `lab image` does: hyperfence's state directory stays 0700
    make_dirs(out, mode=0o755)
    pkg = find_kernel_package()
    inputs = {
        "builder": BUILDER,
        "kernel": f"{pkg.name}={pkg.version}",
        "busybox": _sha256(Path(BUSYBOX)),
        "init": hashlib.sha256(hostroot.INIT.encode()).hexdigest(),
        "root_modules": list(hostroot.ROOT_MODULES),
    }
    with locked(images / ".lock"):  # the one `lab image` takes: the package cache is shared
        if not force:
            found = _from_manifest(out, inputs)
            if found is not None:
                return found
        start = time.monotonic()
        deb = download_package(pkg, images / "cache" / "debs")
        for f in (KERNEL_FILE, INITRD_FILE, MANIFEST):
            (out / f).unlink(missing_ok=True)
        tree = out / TREE
        if tree.exists():
            shutil.rmtree(tree)
        stage = out / ".stage"
        if stage.exists():
            shutil.rmtree(stage)
        try:
            _unpack(deb, pkg.release, stage)
            _run(["depmod", "-b", str(stage), pkg.release], what="index the kernel's modules")
            _write_initrd(stage, pkg.release, out / INITRD_FILE)
            (stage / "boot" / f"vmlinuz-{pkg.release}").rename(out / KERNEL_FILE)
            shutil.rmtree(stage / "boot")
            stage.rename(tree)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        boot = HostrootBoot(
            kernel=out / KERNEL_FILE,
            initrd=out / INITRD_FILE,
            tree=tree,
            release=pkg.release,
            kernel_package=f"{pkg.name}={pkg.version}",
            build_seconds=round(time.monotonic() - start, 1),
            reused=False,
        )
        doc = {"inputs": inputs, "release": boot.release, "build_seconds": boot.build_seconds}
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, out / MANIFEST)  # written last: a manifest means the files are complete
        return boot


def run_in_hostroot(
    command: Sequence[str],
    *,
    cwd: str,
    boot: HostrootBoot,
    env: Mapping[str, str] | None = None,
    memory_mib: int = 2048,
    smp: int = 2,
    timeout: float = 1800.0,
    stream: TextIO | None = None,
    run_dir: Path | None = None,
) -> HostrootRun:
    """Boot a guest, run `command` (argv) in `cwd` with `env` added, power off. The command's output is
    copied to `stream` as it comes (if given). `run_dir`: the host directory the guest sees at
    `hostroot.GUEST_OUT` (the command may leave files there; `$HF_GUEST_OUT` names it in the guest); by
    default a temporary one, deleted afterwards. After `timeout` seconds QEMU is killed (`timed_out`).
    InvalidInputError (bad command, cwd or env), NotFoundError (QEMU is missing)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise NotFoundError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    env = {**(env or {}), "HF_GUEST_OUT": hostroot.GUEST_OUT}
    script = hostroot.stage2_script(command=command, cwd=cwd, modules=str(boot.tree), env=env)
    own_dir = run_dir is None
    rdir = Path(tempfile.mkdtemp(prefix="hf-hostroot-", dir="/var/tmp")) if run_dir is None else run_dir
    rdir.mkdir(parents=True, exist_ok=True)
    try:
        (rdir / hostroot.STAGE2).write_text(script, encoding="utf-8")
        for name in (hostroot.OUTPUT, hostroot.STATUS, hostroot.READY):
            (rdir / name).unlink(missing_ok=True)
        console = rdir / "console.log"
        argv = hostroot.qemu_argv(
            kernel=str(boot.kernel),
            initrd=str(boot.initrd),
            run_dir=str(rdir),
            console=str(console),
            work_dir=cwd,
            memory_mib=memory_mib,
            smp=smp,
            qemu=qemu,
        )
        return _run_qemu(argv, rdir, console, timeout=timeout, stream=stream)
    finally:
        if own_dir:
            shutil.rmtree(rdir, ignore_errors=True)


def _run_qemu(
    argv: list[str], rdir: Path, console: Path, *, timeout: float, stream: TextIO | None
) -> HostrootRun:
    start = time.monotonic()
    output = bytearray()
    timed_out = False
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    timed_out = True
                    break
                _follow(rdir / hostroot.OUTPUT, output, stream)
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                proc.kill()  # by its PID: only the QEMU this call started
            proc.wait()
        qemu_said = proc.stdout.read().decode(errors="replace")
    _follow(rdir / hostroot.OUTPUT, output, stream)
    seconds = time.monotonic() - start
    text = console.read_bytes().decode(errors="replace") if console.exists() else ""
    if qemu_said.strip():
        text += "\n[qemu] " + qemu_said.strip()
    return HostrootRun(
        status=_read_int(rdir / hostroot.STATUS),
        output=output.decode(errors="replace"),
        console=text[-CONSOLE_TAIL:],
        boot_seconds=_read_float(rdir / hostroot.READY),
        seconds=round(seconds, 1),
        timed_out=timed_out,
    )


def _follow(path: Path, seen: bytearray, stream: TextIO | None) -> None:
    """Append what `path` holds beyond `seen` to `seen` (and `stream`)."""
    try:
        with open(path, "rb") as f:
            f.seek(len(seen))
            new = f.read()
    except FileNotFoundError:
        return
    if new:
        seen.extend(new)
        if stream is not None:
            stream.write(new.decode(errors="replace"))
            stream.flush()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ build


def _from_manifest(out: Path, inputs: Mapping[str, Any]) -> HostrootBoot | None:
    try:
        doc = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("inputs") != dict(inputs):
        return None
    release = str(doc.get("release", ""))
    boot = HostrootBoot(
        kernel=out / KERNEL_FILE,
        initrd=out / INITRD_FILE,
        tree=out / TREE,
        release=release,
        kernel_package=str(inputs["kernel"]),
        build_seconds=float(doc.get("build_seconds", 0.0)),
        reused=True,
    )
    intact = boot.kernel.is_file() and boot.initrd.is_file()
    return boot if intact and (boot.tree / "lib/modules" / release / "modules.dep").is_file() else None


def _unpack(deb: Path, release: str, stage: Path) -> None:
    """The kernel and lib/modules/<release> of `deb` into `stage` (the package's other files are left).
    Written by hand: Python 3.11.2's tarfile has no extraction `filter`, and only plain files are wanted."""
    prefixes = (f"./lib/modules/{release}/", f"./boot/vmlinuz-{release}")
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.name.startswith(prefixes) or ".." in member.name.split("/"):
                    continue
                dest = stage / member.name
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                elif member.isfile():  # links and devices are not wanted (Debian's package has none here)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    if src is not None:
                        with open(dest, "wb") as f:
                            shutil.copyfileobj(src, f)
        rc = proc.wait()
    if rc != 0 or not (stage / "boot" / f"vmlinuz-{release}").is_file():
        raise NotFoundError(f"{deb} holds no kernel {release} (dpkg-deb status {rc}): delete it and retry")


def _write_initrd(stage: Path, release: str, out: Path) -> None:
    """busybox, the modules `hostroot.ROOT_MODULES` need (uncompressed) and `/init`, as a gzip'd cpio."""
    modules = stage / "lib/modules" / release
    deps = hostroot.parse_modules_dep((modules / "modules.dep").read_text(encoding="utf-8"))
    order = hostroot.insmod_order(deps, hostroot.ROOT_MODULES)
    with tempfile.TemporaryDirectory(prefix="hf-initrd-") as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "run", "tmp", hostroot.MOD_DIR.lstrip("/")):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for rel in order:
            src = modules / rel
            if src.suffix != ".ko":
                raise BugError(f"{src}: compressed modules are not expected in Debian 12's kernel package")
            shutil.copyfile(src, root / hostroot.MOD_DIR.lstrip("/") / f"{hostroot.module_name(rel)}.ko")
        init = root / "init"
        init.write_text(hostroot.init_script([hostroot.module_name(p) for p in order]), encoding="utf-8")
        init.chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            input=("\n".join(names) + "\n").encode(),
            capture_output=True,
            check=False,
        )
    if proc.returncode != 0:
        raise NotFoundError(
            f"cpio failed ({proc.stderr.decode(errors='replace')[:300]}): apt-get install cpio"
        )
    tmp_out = out.with_name(out.name + ".tmp")
    with gzip.GzipFile(tmp_out, "wb", compresslevel=6, mtime=0) as gz:
        gz.write(proc.stdout)
    os.replace(tmp_out, out)


def _run(argv: list[str], *, what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise NotFoundError(f"cannot {what}: `{' '.join(argv)}` failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
