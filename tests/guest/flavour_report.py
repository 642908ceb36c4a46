"""Run inside the host-root guest after the firewall subset (`python -m tests.guest.flavour_report`): which
data plane a lab's engine builds under this environment's HYPERFENCE_FLAVOUR (it compiles and applies a small
policy in a throwaway lab `nv<hex>`, and says whether the bridge table accepts established flows by bridge
conntrack), and whether br_netfilter was ever loaded in this boot. One JSON line on stdout."""

from __future__ import annotations

import json
import os
import secrets
import tempfile

from hyperfence.lab.session import LabSession
from hyperfence.ruleset.compile import INET


def main() -> None:
    name = "nv" + secrets.token_hex(2)
    with tempfile.TemporaryDirectory() as state, LabSession(name, 2, state_dir=state) as lab:
        lab.apply([{"id": "web", "from": "vm:vm1", "to": "vm:vm2", "services": ["tcp/8080"]}])
        assert lab.engine is not None
        actual = lab.engine.firewall.read().ruleset
        report = {
            "flavour": lab.engine.flavour.value,
            "inet_chains": sorted(c.name for c in actual.chains if c.table == INET),
            "br_netfilter_loaded": os.path.isdir("/sys/module/br_netfilter"),
        }
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
