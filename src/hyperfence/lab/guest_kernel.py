"""The lab guest's kernel: Debian's newest `linux-image-6.1.0-N-amd64`, fetched with `apt-get download` into
a cache directory and unpacked there; never installed on the host (that would also build an unused initrd
and touch /boot).

Only the files the guest needs are unpacked from the package's data (the kernel and a handful of virtio
modules, ~9 MB) instead of `dpkg-deb -x` of the whole package (~400 MB of modules): `dpkg-deb
--fsys-tarfile` streams the tar, and Python's `tarfile` keeps the wanted members.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from hyperfence.errors import NotFoundError, TemporaryError

PACKAGE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")


@dataclass(frozen=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-56-amd64
    version: str  # 6.1.192-2 (the Debian package version)

    @property
    def release(self) -> str:
        """The kernel release (`uname -r`, the modules' directory): 6.1.0-56-amd64."""
        return self.name.removeprefix("linux-image-")


@dataclass(frozen=True)
class KernelFiles:
    vmlinuz: Path
    modules: dict[str, Path]  # module name -> uncompressed .ko, in insmod order
    builtin: tuple[str, ...]  # wanted modules that this kernel has built in (nothing to load)


def newest_package_name(names: list[str]) -> str | None:
    """The `linux-image-6.1.0-N-amd64` with the highest N among `names` (other flavours are ignored)."""
    numbered = [(int(m.group(1)), n) for n in names if (m := PACKAGE.match(n))]
    return max(numbered)[1] if numbered else None


def find_kernel_package() -> KernelPackage:
    """The newest Debian 6.1 amd64 kernel package apt knows. NotFoundError if apt knows none."""
    names = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"], what="list kernel packages").split()
    name = newest_package_name(names)
    if name is None:
        raise NotFoundError(
            "apt knows no linux-image-6.1.0-N-amd64 package: run `apt-get update` (Debian 12 sources needed)"
        )
    show = _run(["apt-cache", "show", "--no-all-versions", name], what=f"read {name}'s version")
    version = next((ln.split(":", 1)[1].strip() for ln in show.splitlines() if ln.startswith("Version:")), "")
    if not version:
        raise NotFoundError(f"apt-cache show {name} names no version: run `apt-get update` and retry")
    return KernelPackage(name=name, version=version)


def download_package(pkg: KernelPackage, debs: Path) -> Path:
    """The package's .deb in `debs`, downloaded with `apt-get download` unless already there."""
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_amd64.deb"
    if deb.exists():
        return deb
    for old in debs.glob(f"{pkg.name}_*.deb.part"):
        old.unlink()
    proc = subprocess.run(
        ["apt-get", "download", f"{pkg.name}={pkg.version}"],
        cwd=debs,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not deb.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise TemporaryError(
            f"apt-get download {pkg.name}={pkg.version} failed ({tail or 'no output'}): check that Debian's "
            "mirror is reachable, run `apt-get update`, then retry",
            retry_after=30.0,
        )
    return deb


def extract_kernel(deb: Path, pkg: KernelPackage, dest: Path, *, modules: tuple[str, ...]) -> KernelFiles:
    """Unpack the kernel and `modules` (uncompressing .ko.xz) from `deb` into `dest` (replaced whole).
    NotFoundError if the package lacks the kernel or a module that is not built in."""
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "modules").mkdir(parents=True)
    release = pkg.release
    prefix = f"./lib/modules/{release}/"
    wanted = set(modules)
    found: dict[str, Path] = {}
    builtin_list = ""
    vmlinuz = tmp / f"vmlinuz-{release}"
    have_kernel = False
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if name == f"./boot/vmlinuz-{release}":
                    _save(tar, member, vmlinuz)
                    have_kernel = True
                elif name == prefix + "modules.builtin":
                    data = tar.extractfile(member)
                    builtin_list = data.read().decode() if data else ""
                elif name.startswith(prefix + "kernel/"):
                    base = name.rsplit("/", 1)[1]
                    mod = base.removesuffix(".xz").removesuffix(".ko")
                    if mod in wanted and mod not in found:
                        out = tmp / "modules" / f"{mod}.ko"
                        _save(tar, member, out, xz=base.endswith(".xz"))
                        found[mod] = dest / "modules" / f"{mod}.ko"
        rc = proc.wait()
    if rc != 0:
        raise NotFoundError(f"dpkg-deb --fsys-tarfile {deb} failed (status {rc}): delete the file and retry")
    builtin = {ln.rsplit("/", 1)[-1].removesuffix(".ko") for ln in builtin_list.split()}
    missing = [m for m in modules if m not in found and m not in builtin]
    if not have_kernel or missing:
        what = "the kernel" if not have_kernel else "modules " + ", ".join(missing)
        raise NotFoundError(f"{deb.name} lacks {what} for {release}: is it a Debian 12 amd64 kernel package?")
    tmp.rename(dest)
    ordered = {m: found[m] for m in modules if m in found}
    return KernelFiles(
        vmlinuz=dest / vmlinuz.name,
        modules=ordered,
        builtin=tuple(m for m in modules if m in builtin and m not in found),
    )


def _save(tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path, *, xz: bool = False) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise NotFoundError(f"cannot read {member.name} from the kernel package")
    data = src.read()
    out.write_bytes(lzma.decompress(data) if xz else data)


def _run(argv: list[str], *, what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NotFoundError(f"cannot {what}: {argv[0]} is not installed (a Debian host is needed)") from None
    if proc.returncode != 0:
        raise NotFoundError(f"cannot {what}: `{' '.join(argv)}` failed: {proc.stderr.strip()[:300]}")
    return proc.stdout
