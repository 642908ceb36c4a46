"""Run inside the host-root guest (`python -m tests.guest.kernel_report`): what the kernel offers hyperfence
before anything loaded a module, then what the daemon's start-up (`Preconditions.ensure`) made of it, first
with the flavour picked from the probe (bridge_native: nothing more to load), then forced to br_netfilter
(which loads the module), as one JSON line on stdout. Works in a throwaway namespace `dg<hex>`, deleted at the end."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import tempfile

from hyperfence.adapters import kernel_probe
from hyperfence.model.kernel import Flavour
from hyperfence.reconcile.engine import Engine
from hyperfence.reconcile.preconditions import Preconditions

MODULES = ("br_netfilter", "nf_conntrack_bridge", "nft_reject_bridge", "nf_conntrack")


def loaded() -> dict[str, bool]:
    return {m: os.path.isdir(f"/sys/module/{m}") for m in MODULES}


def main() -> None:
    report: dict[str, object] = {"release": platform.release(), "loaded_at_boot": loaded()}
    netns = "dg" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        with tempfile.TemporaryDirectory() as state:
            engine = Engine(netns=netns, state_dir=state)
            try:
                report["probe_before"] = kernel_probe.probe(engine.nft).as_dict()
                report["loaded_after_probe"] = loaded()
                auto = Preconditions(engine)
                report["ensure_auto"] = auto.ensure().as_dict()
                report["auto_flavour"] = engine.flavour.value
                report["auto_status"] = auto.status()
                report["loaded_after_auto"] = loaded()
            finally:
                engine.close()
            engine = Engine(netns=netns, state_dir=state, flavour=Flavour.BR_NETFILTER)
            try:
                report["ensure"] = Preconditions(engine).ensure().as_dict()
                report["events"] = [
                    e.get("data", e) for e in engine.store.events(kind="precondition-repaired")
                ]
                report["loaded_after_ensure"] = loaded()
            finally:
                engine.close()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
