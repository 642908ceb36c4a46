"""NftMonitor against the real kernel: commits by the `nft` command and by our own libnftables context, in a
throwaway namespace (`hf-dr<hex>`, deleted in the fixture's `finally`)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from hyperfence.adapters.nft import Nft
from hyperfence.adapters.nft_monitor import Generation, NftMonitor
from hyperfence.errors import NotFoundError
from hyperfence.ruleset.compile import TABLES

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
]
WATCHED = [(t.family, t.name) for t in TABLES]


@pytest.fixture
def netns() -> Iterator[str]:
    name = "hf-dr" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", *argv], check=True)


def read_all(monitor: NftMonitor, n: int, *, timeout: float = 5.0) -> list[Generation]:
    out: list[Generation] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        batch = monitor.read(0.2)
        assert not batch.lost
        out.extend(batch.generations)
    return out


def test_commits_are_seen_with_their_committer_and_what_they_touched(netns: str) -> None:
    with NftMonitor(WATCHED, netns=netns) as monitor:
        nft(netns, "add", "table", "bridge", "hyperfence")
        nft(netns, "add", "chain", "bridge", "hyperfence", "c")
        nft(netns, "add", "table", "ip", "other")
        nft(netns, "add", "table", "ip", "hyperfence")  # our name, not our family
        nft(netns, "flush", "ruleset")
        gens = read_all(monitor, 5)
    assert [g.touched for g in gens] == [1, 1, 0, 0, 2]  # the flush deleted our chain and our table
    assert all(g.comm == "nft" and g.pid > 0 for g in gens)
    assert len({g.pid for g in gens}) == 5  # five nft processes
    assert [g.gen_id for g in gens] == sorted(g.gen_id for g in gens)


def test_our_own_commits_carry_the_id_of_the_nft_worker_thread(netns: str) -> None:
    n = Nft(netns)
    try:
        with NftMonitor(WATCHED, netns=netns) as monitor:
            n.apply({"nftables": [{"add": {"table": {"family": "netdev", "name": "hyperfence"}}}]})
            nft(netns, "delete", "table", "netdev", "hyperfence")
            own, foreign = read_all(monitor, 2)
    finally:
        n.close()
    assert own.pid == n.thread_id and own.pid != os.getpid() and own.touched == 1
    assert foreign.pid != n.thread_id and foreign.comm == "nft" and foreign.touched == 1


def test_another_namespaces_commits_are_not_seen(netns: str) -> None:
    other = "hf-dr" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        with NftMonitor(WATCHED, netns=netns) as monitor:
            nft(other, "add", "table", "bridge", "hyperfence")
            nft(netns, "add", "table", "inet", "hyperfence")
            gens = read_all(monitor, 2, timeout=1.0)
    finally:
        subprocess.run(["ip", "netns", "delete", other], check=False)
    assert len(gens) == 1 and gens[0].touched == 1


def test_a_missing_namespace_is_named() -> None:
    with pytest.raises(NotFoundError, match="hf-dr-none"):
        NftMonitor(WATCHED, netns="hf-dr-none")
