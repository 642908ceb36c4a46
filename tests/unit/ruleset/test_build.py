"""The compiler's names fit what nftables keeps: with ids of the longest length the parser accepts, every
rule comment reads back through nft's parser and every log prefix fits the kernel's."""

from __future__ import annotations

import json

import pytest

from hyperfence.errors import BugError
from hyperfence.model.policy import MAX_ID_LENGTH
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from hyperfence.ruleset.build import COMMENT_MAX, LOG_PREFIX_MAX, log_prefix
from hyperfence.ruleset.compile import compile_ruleset
from tests.unit.policy.test_parse import doc

LONGEST = "x" * MAX_ID_LENGTH
# service #10 (two digits in `rule:<id>#10`) is dhcp: its exchange is paired into the other direction too
SERVICES = [*(f"tcp/{p}" for p in range(1, 10)), "dhcp"]


def longest_names_policy() -> dict[str, object]:
    return doc(
        rules=[
            {"id": LONGEST, "from": "vm:vm1", "to": "vm:vm2", "services": SERVICES, "log": True},
            {  # reject: the longest verdict, and `:rest` comments (not for dhcp: IP traffic only)
                "id": "y" * MAX_ID_LENGTH,
                "from": "vm:vm2",
                "to": "vm:vm1",
                "services": SERVICES[:-1],
                "action": "reject",
                "log": True,
            },
        ],
        limits=[{"id": "z" * MAX_ID_LENGTH, "vms": "vms", "new_flows": 10}],
    )


def test_the_longest_ids_fit_nft_comments_and_kernel_log_prefixes() -> None:
    rs = compile_ruleset(resolve_policy(parse_policy(longest_names_policy())))
    comments = [r.comment for r in rs.rules]
    prefixes = [e["log"]["prefix"] for r in rs.rules for e in json.loads(r.expr) if "log" in e]
    assert f"rule:{LONGEST}#10:pair:log" in comments and any(c.endswith(":rest") for c in comments)
    assert max(len(c) for c in comments) <= COMMENT_MAX
    assert max(len(p.encode()) for p in prefixes) == len(f"hf:v0123456789:out:allow:rule:{LONGEST}#10:pair")
    assert len(f"hf:v0123456789:out:reject:rule:{LONGEST}#999:pair") <= LOG_PREFIX_MAX
    assert (COMMENT_MAX, LOG_PREFIX_MAX) == (128, 127)


def test_a_log_prefix_past_the_kernels_limit_is_a_bug_not_a_kernel_error() -> None:
    assert len(log_prefix("v" + "0" * 10, "out", "reject", "c" * 101)) == LOG_PREFIX_MAX
    with pytest.raises(BugError, match="longer than the kernel keeps"):
        log_prefix("v" + "0" * 10, "out", "reject", "c" * 102)
