"""Builds the agent's zipapp: one executable file holding only `hyperfence/__init__.py` (empty),
`hyperfence/wire.py` (the wire format, which the host imports too), `hyperfence/agent/*.py` and a root
`__main__.py`, run by any Python >= 3.9 in the guest:

    python3 hyperfence-agent.pyz --config /etc/hyperfence/agent.json

The archive is deterministic (fixed timestamps, sorted entries): the same sources give the same bytes, so a
host can compare a guest's copy against its own build by hash.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

SHEBANG = b"#!/usr/bin/env python3\n"
ROOT_MAIN = '''"""hyperfence-agent (zipapp entry point)."""

from hyperfence.agent.main import main

raise SystemExit(main())
'''
STAMP = (2020, 1, 1, 0, 0, 0)


def build_zipapp(out: Path) -> Path:
    """Write the zipapp to `out` (mode 0755) and return `out`. Raises OSError if it cannot be written."""
    package = Path(__file__).resolve().parent
    sources = sorted(p for p in package.glob("*.py") if p.is_file())
    entries = [("__main__.py", ROOT_MAIN.encode()), ("hyperfence/__init__.py", b"")]
    entries.append(("hyperfence/wire.py", (package.parent / "wire.py").read_bytes()))
    entries += [(f"hyperfence/agent/{p.name}", p.read_bytes()) for p in sources]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(SHEBANG)
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=STAMP)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
    os.chmod(tmp, 0o755)  # noqa: S103 - an executable that everyone may run; it holds no secret
    os.replace(tmp, out)
    return out
