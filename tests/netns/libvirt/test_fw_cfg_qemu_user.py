"""`vm enroll --libvirt --fw-cfg` with libvirt running QEMU as its own user (``libvirt-qemu``, as Debian's
libvirt does), a real libvirtd and a real (disk-less, 64 MiB) domain: QEMU reads the config (it refuses to
start otherwise), nobody else can, and a place QEMU could not reach is refused before anything changes.

The domain's channel socket is in a root-only 0700 directory: libvirt creates the listening socket itself and
hands QEMU the descriptor, so that works; a config put beside it (where earlier versions put it) would not.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyperfence.adapters.libvirt import LibvirtInventory
from hyperfence.adapters.qemu_files import DIR_MODE, qemu_user
from hyperfence.cli.main import app
from hyperfence.codec.libvirt_xml import DomainInfo
from hyperfence.errors import InvalidInputError
from hyperfence.lab.domains import define_lab_domain, lab_domain_spec, lab_domains, prepare_qemu_dir
from hyperfence.lab.libvirtd import ensure_libvirtd, running_libvirtd, stop_libvirtd
from hyperfence.lab.plan import plan_lab
from hyperfence.lab.policy import lab_policy
from hyperfence.lab.topology import create_lab, destroy_lab
from hyperfence.reconcile.engine import Engine

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirtd and network namespaces need root"),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/libvirtd"), reason="no libvirtd"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv"),
]

URI = "qemu:///system"


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh directory in /tmp, 0755 (QEMU's user may pass through /tmp and it), removed after."""
    d = Path(tempfile.mkdtemp(prefix="hf-fwcfg-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def domain(base: Path) -> Iterator[tuple[LibvirtInventory, DomainInfo]]:
    """A lab libvirtd with libvirt's own QEMU user (not the lab's root), a connection to it, and a disk-less
    domain (shut off) whose channel socket is in a root-only directory."""
    if running_libvirtd() is not None:
        pytest.skip("a libvirtd this test did not start is running (one per machine): not touching it")
    plan = plan_lab(f"lv{secrets.token_hex(2)}", 1)
    inv = LibvirtInventory(URI)
    try:
        create_lab(plan, only=0)
        ensure_libvirtd(plan, qemu_as_root=False)
        prepare_qemu_dir(plan)
        channels = base / "channels"
        channels.mkdir(mode=0o700)  # root's only
        spec = lab_domain_spec(plan, "vm1", memory_mib=64)
        spec = dataclasses.replace(spec, channel_path=str(channels / "vm1.agent.sock"))
        info = define_lab_domain(inv, spec, start=False)
        engine = Engine(netns=None, state_dir=str(base / "state"))  # 0700, as every state directory
        doc = lab_policy(plan)
        doc["vms"] = []
        doc["settings"] = {"inventory": "libvirt"}
        engine.store_policy(doc, source="test")
        engine.close()
        yield inv, info
    finally:
        try:
            for info in lab_domains(inv, plan):
                inv.destroy(info.uuid)
                inv.undefine(info.uuid)
        finally:
            inv.close()
            stop_libvirtd(plan)
            destroy_lab(plan.name)


def cat_as(user: str, path: Path) -> subprocess.CompletedProcess[str]:
    """`cat path` as `user` with its groups, the way libvirt starts QEMU."""
    pw = pwd.getpwnam(user)
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "cat", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)


def fw_cfg_files(inv: LibvirtInventory, uuid: str) -> list[str | None]:
    xml = subprocess.run(
        ["virsh", "-c", URI, "dumpxml", "--inactive", uuid], check=True, capture_output=True, text=True
    ).stdout
    return [e.get("file") for e in ET.fromstring(xml).findall("sysinfo[@type='fwcfg']/entry")]  # noqa: S314


def test_qemu_running_as_its_own_user_reads_the_config_and_nobody_else_does(
    domain: tuple[LibvirtInventory, DomainInfo], base: Path
) -> None:
    inventory, info = domain
    qemu = qemu_user(*inventory.qemu_label(info.uuid))
    if qemu.uid == 0:
        pytest.skip("this host's libvirt runs QEMU as root (qemu.conf user)")
    state = base / "state"
    argv = ["--state-dir", str(state), "vm", "enroll", info.name, "--libvirt", URI, "--fw-cfg"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, (r.output, r.exception)
    said = " ".join(r.output.split())  # rich wraps
    assert (
        f"readable by QEMU's user {qemu.name} (libvirt's QEMU user for qemu domains, qemu.conf) only" in said
    )
    directory = base / "state-fw-cfg"  # its own directory beside the 0700 state directory
    path = directory / f"{info.name}.agent.json"
    st = directory.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (DIR_MODE, 0, qemu.gid)
    st = path.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o600, qemu.uid)
    assert fw_cfg_files(inventory, info.uuid) == [str(path)]

    assert inventory.start(info.uuid) is True  # QEMU opened the file as its user: it does not start otherwise
    assert inventory.domain(info.uuid).state == "running"
    got = cat_as(qemu.name, path)
    assert got.returncode == 0 and '"key"' in got.stdout, got.stderr
    denied = cat_as("daemon", path)  # any other local user
    assert denied.returncode != 0 and "Permission denied" in denied.stderr

    # a place QEMU's user could not reach (inside the 0700 state directory): refused, nothing changes
    key = Engine(netns=None, state_dir=str(state))
    try:
        before = key.store.agents()[info.uuid].key
        r = CliRunner().invoke(app, [*argv, "--out", str(state / "x.json")])
        assert isinstance(r.exception, InvalidInputError), r.output
        assert f"QEMU runs as {qemu.name}" in str(r.exception) and f"may not enter {state}" in str(
            r.exception
        )
        assert not (state / "x.json").exists()
        assert key.store.agents()[info.uuid].key == before  # no new key either
        assert fw_cfg_files(inventory, info.uuid) == [str(path)]
    finally:
        key.close()
