"""`hyperfence lab image`: a tiny guest for the tests and the demo (docs/guests.md).

A Debian kernel (`guest_kernel`) and one initramfs (cpio newc, gzip) holding busybox, a handful of virtio
modules, Debian's Python 3.11 with only the part of the standard library the agent uses (`guest_python`),
the agent's zipapp and an `/init` that reads its per-VM settings from the kernel command line
(`guest_init`). It boots under QEMU TCG in a few seconds.

Everything is written under `out_dir` (default `/var/lib/hyperfence/images`), nothing is installed on the
host. `build_image` is idempotent: `manifest.json` records the inputs (kernel package and version, the
Python and busybox binaries and their Debian package versions, the agent zipapp, the boot scripts, this
builder's format) and the outputs' sizes and hashes; while the inputs are the same and the outputs intact
the image is reused, otherwise it is rebuilt. One build at a time per `out_dir` (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hyperfence.agent.build import build_zipapp
from hyperfence.errors import BugError, NotFoundError, PermissionDeniedError
from hyperfence.lab import guest_init, guest_python
from hyperfence.lab.guest_kernel import KernelPackage, download_package, extract_kernel, find_kernel_package
from hyperfence.system.state_dir import DIR_MODE, make_dirs

DEFAULT_OUT = Path("/var/lib/hyperfence/images")
BUILDER = 1  # bump when the image's layout changes: every image built before is rebuilt
BUSYBOX = "/bin/busybox"
MANIFEST = "manifest.json"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.cpio.gz"
DEBIAN_PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libssl3",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "liblzma5",
    "libbz2-1.0",
)
DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "root", "var/log")


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with `-kernel kernel -initrd initrd -append <guest_init.kernel_cmdline(...)>`."""

    kernel: Path
    initrd: Path
    kernel_release: str  # 6.1.0-56-amd64
    kernel_package: str  # linux-image-6.1.0-56-amd64=6.1.192-2
    python_version: str  # 3.11.2
    kernel_bytes: int
    initrd_bytes: int  # compressed
    initrd_unpacked_bytes: int  # what the guest holds in RAM
    stdlib_modules: int  # standard-library files kept
    build_seconds: float  # of the build that made it
    reused: bool  # True: found intact and up to date, nothing was built


def build_image(out_dir: Path = DEFAULT_OUT, *, force: bool = False) -> GuestImage:
    """The guest image in `out_dir`, built unless an intact one from the same inputs is there (`force`:
    rebuild anyway). Raises PermissionDeniedError (not root), NotFoundError (a tool or package is missing),
    TemporaryError (apt-get download failed), BugError (the staged Python cannot run the agent)."""
    if os.geteuid() != 0:
        raise PermissionDeniedError("building the guest image needs root (chroot, files owned by root)")
    out_dir = Path(out_dir)
    # Parents it has to create are 0700: the default's parent is hyperfence's state directory, which must
    # never start out readable by others (a 0755 one is repaired at the next start, with a warning).
    make_dirs(out_dir.parent, mode=DIR_MODE)
    make_dirs(out_dir, mode=0o755)
    with locked(out_dir / ".lock"):
        cache = out_dir / "cache"
        zipapp = build_zipapp(cache / "hyperfence-agent.pyz")
        pkg = find_kernel_package()
        inputs = read_inputs(pkg, zipapp)
        if not force:
            found = image_from_manifest(_read_manifest(out_dir), out_dir, inputs)
            if found is not None and _outputs_intact(out_dir, _read_manifest(out_dir)):
                return found
        return _build(out_dir, cache, pkg, zipapp, inputs)


# ------------------------------------------------------------------------------------------------ manifest


def boot_scripts_digest() -> str:
    """One hash over everything `guest_init` writes into the image: a changed script means a rebuild."""
    h = hashlib.sha256()
    for text in (
        guest_init.init_script(),
        guest_init.agent_control_script(),
        guest_init.shell_script(),
        guest_init.udhcpc_script(),
    ):
        h.update(text.encode())
        h.update(b"\0")
    h.update(guest_init.HTTP_INDEX.encode())
    return h.hexdigest()


def manifest_document(
    inputs: Mapping[str, Any], image: GuestImage, outputs: Mapping[str, Any]
) -> dict[str, Any]:
    """What `manifest.json` holds: the inputs, the image's facts (paths relative to out_dir), the outputs'
    sizes and hashes."""
    facts = asdict(image)
    facts["kernel"] = image.kernel.name
    facts["initrd"] = image.initrd.name
    facts.pop("reused")
    return {"builder": BUILDER, "inputs": dict(inputs), "image": facts, "outputs": dict(outputs)}


def image_from_manifest(doc: Any, out_dir: Path, inputs: Mapping[str, Any]) -> GuestImage | None:
    """The image `doc` describes if it was built by this builder from `inputs`; None if not (or if `doc` is
    not a manifest this builder wrote)."""
    if not isinstance(doc, dict) or doc.get("builder") != BUILDER or doc.get("inputs") != dict(inputs):
        return None
    facts = doc.get("image")
    if not isinstance(facts, dict):
        return None
    try:
        return GuestImage(
            kernel=out_dir / str(facts["kernel"]),
            initrd=out_dir / str(facts["initrd"]),
            kernel_release=str(facts["kernel_release"]),
            kernel_package=str(facts["kernel_package"]),
            python_version=str(facts["python_version"]),
            kernel_bytes=int(facts["kernel_bytes"]),
            initrd_bytes=int(facts["initrd_bytes"]),
            initrd_unpacked_bytes=int(facts["initrd_unpacked_bytes"]),
            stdlib_modules=int(facts["stdlib_modules"]),
            build_seconds=float(facts["build_seconds"]),
            reused=True,
        )
    except (KeyError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ inputs


def read_inputs(pkg: KernelPackage, zipapp: Path) -> dict[str, Any]:
    """Everything the image is made from, as versions and hashes (cheap: no download, no unpacking)."""
    python = Path(guest_python.PYTHON)
    for tool, hint in ((python, "python3.11"), (Path(BUSYBOX), "busybox-static")):
        if not tool.exists():
            raise NotFoundError(f"{tool} is missing: apt-get install {hint}")
    return {
        "kernel": f"{pkg.name}={pkg.version}",
        "python": _sha256(python),
        "busybox": _sha256(Path(BUSYBOX)),
        "agent": _sha256(zipapp),
        "boot": boot_scripts_digest(),
        "debian": _dpkg_versions(DEBIAN_PACKAGES),
    }


def _dpkg_versions(packages: tuple[str, ...]) -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}=${Version}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )  # exits 1 when one of them is not installed: the others are still listed
    pairs = (line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return dict(sorted((name, version) for name, version in pairs if version))


# ------------------------------------------------------------------------------------------------ build


def _build(
    out_dir: Path, cache: Path, pkg: KernelPackage, zipapp: Path, inputs: Mapping[str, Any]
) -> GuestImage:
    start = time.monotonic()
    deb = download_package(pkg, cache / "debs")
    for old in (cache / "debs").glob("linux-image-*.deb"):
        if old != deb:
            old.unlink()  # keep one package: the cache stays ~70 MB
    kernel = extract_kernel(deb, pkg, cache / "kernel", modules=guest_init.MODULES)
    stage = out_dir / ".stage"
    if stage.exists():
        shutil.rmtree(stage)
    try:
        for d in DIRS:
            (stage / d).mkdir(parents=True, exist_ok=True)
        _stage_boot(stage, kernel.modules, zipapp)
        kept = _stage_python(stage, zipapp)
        _check_agent_runs(stage)
        unpacked = sum(p.lstat().st_size for p in stage.rglob("*") if not p.is_dir())
        initrd = out_dir / INITRD_FILE
        _write_initrd(stage, initrd)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    vmlinuz = out_dir / KERNEL_FILE
    shutil.copyfile(kernel.vmlinuz, vmlinuz.with_name(vmlinuz.name + ".tmp"))
    os.replace(vmlinuz.with_name(vmlinuz.name + ".tmp"), vmlinuz)
    image = GuestImage(
        kernel=vmlinuz,
        initrd=initrd,
        kernel_release=pkg.release,
        kernel_package=f"{pkg.name}={pkg.version}",
        python_version=_python_version(),
        kernel_bytes=vmlinuz.stat().st_size,
        initrd_bytes=initrd.stat().st_size,
        initrd_unpacked_bytes=unpacked,
        stdlib_modules=kept,
        build_seconds=round(time.monotonic() - start, 1),
        reused=False,
    )
    outputs = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in (vmlinuz, initrd)}
    _write_json(out_dir / MANIFEST, manifest_document(inputs, image, outputs))
    return image


def _stage_boot(stage: Path, modules: Mapping[str, Path], zipapp: Path) -> None:
    shutil.copy2(BUSYBOX, stage / "bin/busybox")
    _write_text(stage / "init", guest_init.init_script(), mode=0o755)
    _write_text(stage / guest_init.AGENT_CONTROL.lstrip("/"), guest_init.agent_control_script(), mode=0o755)
    _write_text(stage / guest_init.SHELL.lstrip("/"), guest_init.shell_script(), mode=0o755)
    _write_text(stage / "etc/udhcpc.sh", guest_init.udhcpc_script(), mode=0o755)
    _write_text(stage / guest_init.HTTP_ROOT.lstrip("/") / "index.html", guest_init.HTTP_INDEX, mode=0o644)
    mods = stage / guest_init.MODULE_DIR.lstrip("/")
    mods.mkdir(parents=True)
    for name, path in modules.items():
        shutil.copyfile(path, mods / f"{name}.ko")
    target = stage / guest_init.AGENT_ZIPAPP.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(zipapp, target)
    target.chmod(0o755)
    (stage / "etc/hostname").write_text("hf-guest\n")
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")


def _stage_python(stage: Path, zipapp: Path) -> int:
    """Copy the interpreter, the stdlib files the agent uses and every shared object they need; compile the
    stdlib to .pyc (unchecked-hash: no source stat at import). Returns how many stdlib files were kept."""
    trace = _run(
        [
            guest_python.PYTHON,
            "-I",
            "-c",
            guest_python.TRACE_SCRIPT,
            str(zipapp),
            *guest_python.EXTRA_MODULES,
        ],
        what="trace the agent's imports in Debian's Python",
    )
    files = guest_python.stdlib_files(json.loads(trace))
    files = sorted(set(files) | set(guest_python.package_inits(files)))
    stdlib = Path(guest_python.STDLIB)
    for rel in files:
        dest = stage / stdlib.relative_to("/") / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stdlib / rel, dest)
    python = Path(guest_python.PYTHON)
    shutil.copy2(python, stage / python.relative_to("/"))
    (stage / "usr/bin/python3").symlink_to(python.name)
    objects = [str(python)] + [str(stdlib / rel) for rel in files if rel.endswith(".so")]
    libs: set[str] = set()
    for obj in objects:
        try:
            libs.update(guest_python.parse_ldd(_run(["ldd", obj], what=f"list {obj}'s libraries")))
        except ValueError as e:
            raise NotFoundError(f"{obj} needs a library that is not installed ({e})") from None
    for lib in sorted(libs):
        dest = stage / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), dest)
        dest.chmod(0o755)
    _run(
        [
            guest_python.PYTHON, "-I", "-m", "compileall", "-q", "-j", "0",
            "--invalidation-mode", "unchecked-hash", "-s", str(stage), "-p", "/",
            str(stage / stdlib.relative_to("/")),
        ],
        what="compile the guest's stdlib",
    )  # fmt: skip
    return len(files)


def _check_agent_runs(stage: Path) -> None:
    """Run the agent once (`--once`) with the staged tree as its root and a private /proc: proves that the
    interpreter, its libraries and the pruned stdlib are enough, before the image is written."""
    proc = subprocess.run(
        [
            "unshare", "--mount", "--pid", "--fork", f"--mount-proc={stage / 'proc'}",
            "chroot", str(stage), "/usr/bin/python3", guest_init.AGENT_ZIPAPP, "--once",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BugError(
            "the guest's Python cannot run the agent (a module or library was pruned that it needs): "
            f"{proc.stderr.strip()[-600:]} — add it to guest_python.EXTRA_MODULES"
        )


def _write_initrd(stage: Path, out: Path) -> None:
    names: list[str] = []
    for root, dirs, files in os.walk(stage):
        dirs.sort()
        rel = os.path.relpath(root, stage)
        names.extend(os.path.normpath(os.path.join(rel, n)) for n in sorted(dirs + files))
    proc = subprocess.run(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
        cwd=stage,
        input=("\n".join(names) + "\n").encode(),
        capture_output=True,
        check=False,
    )  # the archive (~25 MB) is held in memory once
    if proc.returncode != 0:
        raise NotFoundError(
            f"cpio failed writing {out} ({proc.stderr.decode(errors='replace').strip()[:300]}): "
            "is GNU cpio installed (apt-get install cpio)?"
        )
    tmp = out.with_name(out.name + ".tmp")
    with gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as gz:
        gz.write(proc.stdout)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------------------------ small I/O


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(out_dir: Path) -> Any:
    try:
        return json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _outputs_intact(out_dir: Path, doc: Any) -> bool:
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, dict) or set(outputs) != {KERNEL_FILE, INITRD_FILE}:
        return False
    for name, want in outputs.items():
        path = out_dir / name
        if not path.is_file() or not isinstance(want, dict) or path.stat().st_size != want.get("bytes"):
            return False
        if _sha256(path) != want.get("sha256"):
            return False
    return True


def _python_version() -> str:
    return _run([guest_python.PYTHON, "-V"], what="read the Python version").split()[-1]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_text(path: Path, text: str, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run(argv: list[str], *, what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    except FileNotFoundError:
        raise NotFoundError(f"cannot {what}: {argv[0]} is not installed") from None
    if proc.returncode != 0:
        raise NotFoundError(f"cannot {what}: `{' '.join(argv[:4])} ...` failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout
