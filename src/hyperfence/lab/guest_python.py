"""Which parts of Debian's Python go into the lab guest (pure: lists in, lists out).

The guest gets `/usr/bin/python3.11`, the shared libraries `ldd` names for it and for the extension modules
kept, and a pruned standard library: only the modules the agent really imports. They are found by running
the agent's code in Debian's interpreter (`TRACE_SCRIPT`: import `ssl` and the other lazy imports, run the
zipapp as `python3 ZIPAPP --once` does, taking one sample) and reading `sys.modules`, rather than by static analysis:
`modulefinder` follows every import in every function of every module it meets and pulls in ~380 modules
(unittest, asyncio, email, pdb, ...) against the ~80 the agent loads. Lazily imported modules that a single
run may miss are listed in `EXTRA_MODULES`; the build then proves the result by running the agent in the
staged tree (`chroot`), so a missing module fails the build, not the guest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
# imported lazily by the stdlib or the agent on paths one `--once` run does not take
EXTRA_MODULES = (
    "ssl",  # the agent's TLS channel imports it when it connects
    "encodings.idna",  # ssl: server_hostname
    "encodings.ascii",
    "encodings.latin_1",
    "traceback",  # logging.exception and uncaught errors
    "linecache",
    "tokenize",  # linecache reads sources with tokenize.open
    "token",
)
# never shipped, even if something imports them: big and of no use to the agent
PRUNED_TOP = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "turtle",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "unittest",
        "sitecustomize",  # Debian's is a symlink to /etc (apport's hook)
        "site-packages",
        "dist-packages",
        "__phello__",
    }
)

TRACE_SCRIPT = r"""
import contextlib, io, json, runpy, sys
zipapp = sys.argv[1]
for name in sys.argv[2:]:
    __import__(name)
sys.argv = [zipapp, "--once"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        runpy.run_path(zipapp, run_name="__main__")  # as `python3 ZIPAPP` does
    except SystemExit:
        pass
out = {n: getattr(m, "__file__", None) for n, m in sorted(sys.modules.items())}
sys.__stdout__.write(json.dumps(out))
"""

_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def stdlib_files(modules: Mapping[str, str | None], *, stdlib: str = STDLIB) -> list[str]:
    """Paths relative to `stdlib` of the files of `modules` (name -> `__file__`, as `TRACE_SCRIPT` prints),
    without the pruned ones; built-in and frozen modules (no file) and files outside `stdlib` are skipped."""
    root = stdlib.rstrip("/") + "/"
    files = set()
    for file in modules.values():
        if not file or not file.startswith(root):
            continue
        rel = file[len(root) :]
        if "__pycache__" in rel.split("/") or is_pruned(rel):
            continue
        files.add(rel)
    return sorted(files)


def is_pruned(rel: str) -> bool:
    """Is this stdlib path (relative to the stdlib directory) one the guest never gets?"""
    first = rel.split("/", 1)[0]
    top = first[:-3] if first.endswith(".py") else first
    return top in PRUNED_TOP or top.startswith("config-")


def package_inits(files: Iterable[str]) -> list[str]:
    """The `__init__.py` of every package that holds one of `files` (a submodule needs its parents)."""
    inits = set()
    for rel in files:
        parts = rel.split("/")[:-1]
        if parts and parts[0] == "lib-dynload":
            continue
        for i in range(1, len(parts) + 1):
            inits.add("/".join([*parts[:i], "__init__.py"]))
    return sorted(inits)


def parse_ldd(text: str) -> list[str]:
    """The absolute paths of the shared objects in `ldd`'s output, the dynamic loader included (the vdso,
    which has no file, is skipped). ValueError if a library was not found."""
    paths = []
    for line in text.splitlines():
        if "=> not found" in line:
            raise ValueError(f"ldd: {line.strip()}")
        match = _LDD_LINE.match(line)
        if match:
            paths.append(match.group(1))
    return paths
