"""Differential test: `hyperfence can` against the kernel, on random policies and real packets.

Hypothesis draws a policy over a lab of 4 VMs with labels, the host and the outside (rules with from/to drawn
from vm:NAME, label:K=V, vms, CIDRs, ranges, addresses, ipset:NAME, outside, host and any; tcp/udp ports and
port ranges, icmp with and without a type, any, arp, dhcp, dhcp-server; allow/deny/reject; priorities; a
flood limit) and 1-3 versions of it in which VMs are removed from the policy and re-added (a removed VM's
namespace and port stay on the bridge). Each version is applied to the real kernel, then random (source, destination, service)
triples are sent as real packets and compared with what `can` (`hyperfence.policy.whatif.can`, resolved from
scratch as a fresh `hyperfence can` process does) says about the same flow. Any disagreement fails the test
and prints the policy as YAML, the triple, `can`'s verdict with its reason, the `hyperfence can` command line,
the kernel's answer, and the seed that replays the run.

What the two sides mean (precisely; differential.py has the table of services):

* `can` answers whether the *first packet* of a flow may start (the sender's egress rules, then the
  receiver's ingress rules); replies of an allowed flow pass statefully. So "allowed" on the kernel's side is
  "the exchange completes from a cold start": before every triple each namespace forgets its ARP entries, so
  the sender must resolve its peer (or the gateway) through the firewall, and the connection tracking table is
  flushed whenever a policy version is applied. TCP: the connection opens and the server's data arrives. UDP:
  the responder's datagram arrives. ICMP: the echo reply arrives (`can`'s flow is an echo request, as
  `hyperfence can --protocol icmp` builds it). ARP: the reply to our request arrives (ARP has no conntrack,
  so the reply must be allowed too: `can` walks only the request, and "allowed" means both pass). DHCP: a
  DHCPDISCOVER from 0.0.0.0 to the broadcast address gets an offer from the server it names: the host's
  dnsmasq, or a responder in a VM (from its address and port 67 to the client's address and port 68, as a
  server VM sends it); `can` is asked `VM SERVER --protocol dhcp`, the request and the answer each through
  the rules. dhcp-unicast: a datagram from port 68 to port 67 of
  another VM or the outside (a lease renewal looks like that), asked as `--port 67/udp`.
* `can`'s deny is silence: nothing comes back within the probe timeout. Its reject is the answer
  docs/policy.md promises: a TCP reset (ECONNREFUSED), ICMP port unreachable for UDP (ECONNREFUSED on the
  connected socket), ICMP administratively prohibited (type 3 code 13) for ICMP; a sender on the host itself
  may instead see its send fail with EPERM (UDP, ICMP), which the docs also promise. ARP and DHCP are never
  answered, so a reject of them is silence too. A reject is therefore compared by its kind of answer: an
  ICMP error where a reset is promised, or silence where an answer is, disagrees.
* Where the kernel cannot be observed unambiguously: an answer that is neither the exchange nor silence
  counts as a rejection only if it is the promised one; a silent answer (timeout) that disagrees is probed
  once more with a longer timeout (below TCP's and ARP's 1 s retransmission, see `PROBE_TIMEOUT`) before it
  counts, so a busy machine does not fail the test, but a completed exchange or an answer is final.
* Flood limits: `can` ignores rates. Most limits in the policies are far above what the probes send, so
  they must never change an answer. In the full space a policy may also hold a tight limit (burst 1) on one
  VM; the runner lets its bucket refill before every probe to or from that VM, and a single exchange is one
  new flow per VM and direction (its replies are established, ARP is not a flow), so it must still pass.
  The kernel's own rate limit on the host's ICMP errors (a burst of 6 a destination, then one a second) is
  lifted in the lab's host namespace for the same reason: a policy that rejects most of what one VM sends
  would otherwise turn its answers into silence after a few triples.
* Out of reach of `can`'s question, and tested elsewhere: rejecting or denying *established* flows (each
  version starts with an empty conntrack table), and drops that no policy changes (VLAN tags, spoofing).
  A bug that `can` and the kernel share (both wrong the same way) is not a disagreement either.

A recorded disagreement (HYPERFENCE_DIFF_REPORT) is replayed and shrunk to a small policy with
`python -m tests.netns.firewall.diff_replay FILE --shrink`.

Knobs (environment): HYPERFENCE_DIFF_EXAMPLES (policies, default 10), HYPERFENCE_DIFF_TRIPLES (triples per
policy, default 20), HYPERFENCE_DIFF_SEED (default 11), HYPERFENCE_DIFF_SAFE=1 (a narrower space, see
`Space`), HYPERFENCE_DIFF_KEEP_GOING=1 (collect the disagreements of every policy, fail at
the end), HYPERFENCE_DIFF_REPORT=FILE (append them as JSON lines), HYPERFENCE_DIFF_SHRINK=1 (let hypothesis
shrink a failing policy: slow, each attempt is real traffic), HYPERFENCE_DIFF_TIMEOUT (probe timeout, 0.3 s; see
`PROBE_TIMEOUT`).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from hyperfence.lab.session import LabSession
from hyperfence.policy.parse import parse_policy
from hyperfence.policy.resolve import resolve_policy
from tests.netns.firewall.differential import (
    PROBE_TIMEOUT,
    RETRY_TIMEOUT,
    TIGHT_QUIET,
    Agents,
    Example,
    Outcome,
    Space,
    env_flag,
    env_int,
    examples,
    json_record,
    now,
    report,
    run_version,
)

EXAMPLES = env_int("HYPERFENCE_DIFF_EXAMPLES", 10)
TRIPLES = env_int("HYPERFENCE_DIFF_TRIPLES", 20)
SEED = env_int("HYPERFENCE_DIFF_SEED", 11)
SAFE = env_flag("HYPERFENCE_DIFF_SAFE")
TIMEOUT = float(os.environ.get("HYPERFENCE_DIFF_TIMEOUT") or PROBE_TIMEOUT)
# Room for a run where every probe times out, is retried and waits for a tight limit (long runs go beyond
# pytest's default 300 s).
RUN_TIMEOUT = max(300, int(EXAMPLES * (20 + TRIPLES * (2 * TIMEOUT + RETRY_TIMEOUT + TIGHT_QUIET))))


@pytest.fixture
def lab_vms() -> int:
    return 4


def run_differential(lab: LabSession, space: Space) -> None:
    agents = Agents(lab)
    found: list[str] = []
    stats: Counter[str] = Counter()
    numbered = iter(range(1, 1_000_000))
    started = now()
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if env_flag("HYPERFENCE_DIFF_SHRINK") else [])

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=phases,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(example=examples(space, TRIPLES))
    def check(example: Example) -> None:
        index = next(numbered)
        outcomes: list[Outcome] = []
        for version in example.versions:
            doc = example.document(lab.plan, version.removed)
            outcome = run_version(lab, agents, doc, version, timeout=TIMEOUT, retry=RETRY_TIMEOUT)
            outcomes.append(outcome)
            stats["versions"] += 1
            stats["triples"] += outcome.triples
            stats["disagreements"] += len(outcome.disagreements)
            stats["apply failures"] += outcome.apply_error is not None
            stats.update({f"kernel {k}": v for k, v in outcome.kernel.items()})
            stats.update({f"can {k}": v for k, v in outcome.can.items()})
        stats["policies"] += 1
        if path := os.environ.get("HYPERFENCE_DIFF_REPORT"):
            with open(path, "a", encoding="utf-8") as f:
                for o in outcomes:
                    f.writelines(line + "\n" for line in json_record(o, SEED, index))
        if any(o.failed for o in outcomes):
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            replay = (
                f"HYPERFENCE_DIFF_SEED={SEED} HYPERFENCE_DIFF_EXAMPLES={EXAMPLES} "
                f"HYPERFENCE_DIFF_TRIPLES={TRIPLES}{' HYPERFENCE_DIFF_SAFE=1' if space.safe else ''} "
                f"pytest {test} (the same seed draws the same policies and triples; hypothesis also prints "
                "the example and a @reproduce_failure blob; HYPERFENCE_DIFF_SHRINK=1 shrinks it)"
            )
            text = report(outcomes, replay=replay)
            if not env_flag("HYPERFENCE_DIFF_KEEP_GOING"):
                raise AssertionError(text)
            found.append(text)

    try:
        check()
    finally:
        agents.close()
        seconds = now() - started
        print(
            f"differential ({'safe' if space.safe else 'full'}, seed {SEED}): {stats['policies']} policies, "
            f"{stats['versions']} versions, {stats['triples']} triples, {stats['disagreements']} "
            f"disagreements, {stats['apply failures']} failed applies in {seconds:.1f} s; kernel answers: "
            + ", ".join(f"{k[7:]} {v}" for k, v in sorted(stats.items()) if k.startswith("kernel "))
            + "; can: "
            + ", ".join(f"{k[4:]} {v}" for k, v in sorted(stats.items()) if k.startswith("can "))
        )
    assert not found, "\n\n".join(found)
    assert stats["policies"] == EXAMPLES and stats["triples"] == EXAMPLES * TRIPLES, stats


@pytest.mark.kernel
@pytest.mark.timeout(RUN_TIMEOUT)
def test_can_agrees_with_the_kernel(lab: LabSession) -> None:
    """The whole policy space (or only the narrower one of `Space`, with HYPERFENCE_DIFF_SAFE=1, to see
    whether a disagreement comes from one of the features it leaves out)."""
    run_differential(lab, Space(safe=SAFE))


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(example=examples(Space(), 20))
def test_every_generated_policy_version_is_valid(example: Example) -> None:
    """No kernel: the generator makes only documents the parser takes, whatever VMs are removed."""
    from hyperfence.lab.plan import plan_lab

    plan = plan_lab("df", 4)
    for version in example.versions:
        resolve_policy(parse_policy(example.document(plan, version.removed)))
    assert sum(len(v.triples) for v in example.versions) == 20
