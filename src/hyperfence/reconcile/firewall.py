"""Make the kernel hold a desired ruleset: read back, plan, apply one atomic batch, read back and verify.

`Firewall.converge` is level-triggered: it never assumes what an event changed, it compares desired state
with what the kernel holds. With `full=True` it lists every hyperfence table (the periodic resync that
finds drift, such as a hand-run `nft flush ruleset`: when the bridge's dropping base chains are gone, a small
batch shuts every VM port first, `ruleset/closed.py`); otherwise it plans against the state it verified
after its previous apply and re-reads only what it touched, which keeps a one-rule change in the
milliseconds at 1,000 VMs. If an incremental batch is refused (someone changed the kernel meanwhile), it
falls back to a full read and a fresh plan.

What it knows without reading. Every nftables commit in a namespace, by anyone, changes the namespace's
generation (codec/nft_rules.py), and nothing else changes rules, chains or sets (hyperfence has no sets that
packets fill). So after the kernel was verified to hold a ruleset, as long as the generation has not moved it
still holds it: a full converge then skips listing the tables (seconds at 10,000 VMs), and a daemon that
restarts compares the ruleset it compiles (its digest, ruleset/digest.py) and the generation with what it
recorded (`Record`) and, when both match, reads nothing: the rule handles a change needs are fetched chain by
chain when it needs them (`ChainHandles`). Whether rule *bodies* were read back exactly (`Record.exact`) is
kept too: after an incremental apply only the touched chains' rule ids were. Drift needs a commit, which the
generation shows at once; what reading bodies back checks is our own encoding, so it is done by the first
full converge `bodies_every` seconds (60) after such an apply, not by every one (a drift watch's repair after
lost events, right after a change, then costs nothing at 10,000 VMs instead of a 8 s listing).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from hyperfence.codec.nft_batch import AppendRule, DeleteRule
from hyperfence.codec.nft_rules import Generation
from hyperfence.errors import BugError, DriftError, HyperfenceError, KernelError
from hyperfence.ruleset.closed import fail_closed
from hyperfence.ruleset.digest import digest, digest_after
from hyperfence.ruleset.ir import JSON, Chain, NftSet, Rule, Ruleset, TableId
from hyperfence.ruleset.plan import Plan, plan_changes, set_obj
from hyperfence.ruleset.readback import Actual, RuleKey, parse_listing

BODIES_EVERY = 60.0  # seconds: rule bodies written by incremental applies are read back at most this often
VERIFY_PARTIAL_LIMIT = 64  # above this many touched objects, verification re-reads whole tables


class NftPort(Protocol):
    def apply(self, batch: dict[str, JSON]) -> None: ...
    def list(self, what: dict[str, JSON]) -> list[JSON]: ...
    def rule_ids(self, family: str, table: str, chain: str) -> builtins.list[tuple[int, str]]: ...
    def generation(self) -> Generation: ...
    def encode_rules(
        self, setup: dict[str, JSON], family: str, table: str, chains: builtins.list[str]
    ) -> dict[tuple[str, str], tuple[bytes, bytes]]: ...
    def commit_rules(self, changes: builtins.list[DeleteRule | AppendRule]) -> None: ...


class ChainHandles(dict[RuleKey, int]):
    """Rule handles, fetched from the kernel one chain at a time on first use (after a recall the kernel is
    known to hold the desired ruleset; at 10,000 VMs dumping all 200,000 handles would take ~2 s, and a change
    needs those of the one or two chains it touches). A rule the kernel does not hold: `KeyError`, as in a
    plain dict."""

    def __init__(self, fetch: Callable[[TableId, str], list[tuple[int, str]]]) -> None:
        super().__init__()
        self._fetch = fetch
        self._fetched: set[tuple[TableId, str]] = set()

    def __missing__(self, key: RuleKey) -> int:
        table, chain, _ = key
        if (table, chain) not in self._fetched:
            self._fetched.add((table, chain))
            for handle, comment in self._fetch(table, chain):
                self.setdefault((table, chain, comment), handle)
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
        raise KeyError(key)


@dataclass(frozen=True)
class Record:
    """What the kernel was verified to hold: the ruleset's digest, at this generation; `exact` when rule
    bodies were read back (a full read), not only the touched chains' rule ids."""

    generation: Generation
    digest: int
    exact: bool

    def as_dict(self) -> dict[str, JSON]:
        return {
            "namespace": self.generation.namespace,
            "generation": self.generation.number,
            "digest": f"{self.digest:032x}",
            "exact": self.exact,
        }

    @staticmethod
    def from_dict(data: JSON) -> Record | None:
        """None for anything but a record `as_dict` wrote (an old or damaged file is only a slower start)."""
        try:
            gen = Generation(str(data["namespace"]), int(data["generation"]))
            return Record(gen, int(str(data["digest"]), 16), data["exact"] is True)
        except (KeyError, TypeError, ValueError):
            return None


class RecordStore(Protocol):
    """Where the last `Record` survives a restart (the daemon: a file in its state directory)."""

    def load(self) -> Record | None: ...
    def save(self, record: Record) -> None: ...


class NoRecords:
    def load(self) -> Record | None:
        return None

    def save(self, record: Record) -> None:
        pass


@dataclass
class ConvergeResult:
    changed: bool
    drift: list[str] = field(default_factory=list)  # what a full read found wrong before repairing it
    summary: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    full_replace: bool = False
    seconds: float = 0.0


def describe_drift(desired: Ruleset, actual: Ruleset) -> list[str]:
    """Human sentences for the differences between desired and actual (for events and `ruleset diff`)."""
    out: list[str] = []
    for t in desired.tables:
        if t not in actual.tables:
            out.append(f"table {t.family} {t.name} is missing")
    a_chains, a_sets = actual.chain_by_key(), actual.set_by_key()
    for k, c in desired.chain_by_key().items():
        if k[0] in actual.tables and k not in a_chains:
            out.append(f"chain {c.table.family} {c.table.name} {c.name} is missing")
    for k, s in desired.set_by_key().items():
        if k[0] not in actual.tables:
            continue
        if k not in a_sets:
            out.append(f"{s.kind} {s.name} is missing")
        elif a_sets[k].elements != s.elements:
            gone, extra = s.elements - a_sets[k].elements, a_sets[k].elements - s.elements
            out.append(f"{s.kind} {s.name}: {len(gone)} element(s) missing, {len(extra)} unexpected")
    a_rules, d_rules = actual.chain_rules(), desired.chain_rules()
    for k, want in d_rules.items():
        if k in a_chains and a_rules.get(k, []) != want:
            have = a_rules.get(k, [])
            missing = {r.comment for r in want} - {r.comment for r in have}
            unexpected = {r.comment for r in have} - {r.comment for r in want}
            out.append(
                f"chain {k[1]}: {len(missing)} rule(s) missing, {len(unexpected)} unexpected"
                + ("" if missing or unexpected else ", rules changed or out of order")
            )
    d_chains = desired.chain_by_key()
    for k in a_chains:
        if k not in d_chains and k[0] in desired.tables:
            out.append(f"chain {k[1]} is not hyperfence's")
    return out


def _only(rs: Ruleset, plan: Plan) -> Ruleset:
    """The part of `rs` a plan touched (its tables, touched chains with their rules, touched sets)."""
    by_chain = rs.chain_rules()
    chain_map, set_map = rs.chain_by_key(), rs.set_by_key()
    return dataclasses.replace(
        rs,
        chains=tuple(chain_map[k] for k in plan.touched_chains if k in chain_map),
        sets=tuple(set_map[k] for k in plan.touched_sets if k in set_map),
        rules=tuple(r for k in plan.touched_chains for r in by_chain.get(k, ())),
    )


class Firewall:
    def __init__(
        self,
        nft: NftPort,
        tables: tuple[TableId, ...],
        records: RecordStore | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        bodies_every: float = BODIES_EVERY,
    ) -> None:
        """`bodies_every`: after an incremental apply (rule ids read back, not bodies), how long a full
        converge that finds nothing committed since may still skip reading the kernel: rule bodies are
        read back at most that often. Drift needs a commit, which the generation shows at once; what this
        period bounds is how long a mistake in our own encoding could go unseen."""
        self.nft = nft
        self.tables = tables
        self.actual: Actual | None = None
        self.clock = clock
        self.bodies_every = bodies_every
        self._unread_since: float | None = None  # when rule bodies stopped being all read back
        self.records = records or NoRecords()
        self.record: Record | None = None  # what `actual` is known to be, and since which generation
        self._last_digest: tuple[Ruleset, int] | None = None  # the last ruleset digested, and its digest
        self.skipped_reads = 0  # full converges that found the generation unchanged (for tests and status)
        self.direct_applies = 0  # incremental batches sent to nf_tables directly (`_direct`)

    def read(self) -> Actual:
        objs: list[JSON] = []
        for t in self.tables:
            objs.extend(self.nft.list({"table": {"family": t.family, "name": t.name}}))
        return parse_listing(objs)

    def converge(self, desired: Ruleset, *, full: bool = False) -> ConvergeResult:
        t0 = time.monotonic()
        drift: list[str] = []
        recalled = False
        if self.actual is None:
            self.actual = self._recall(desired)
            # The recall just proved what the kernel holds (generation, digest, rule ids): even a full converge
            # (a daemon's first) does not read it again now; rule bodies, if the record did not read them
            # back, are checked by the first full converge at least `bodies_every` seconds later.
            recalled = self.actual is not None
        if (full or self.actual is None) and not recalled and not self._unchanged():
            first_look = self.actual is None
            before = self._generation()
            self.actual = self.read()
            self._remember(None)
            # No hyperfence table at all on our first look is a first install, not drift.
            if not (first_look and not self.actual.ruleset.tables):
                drift = describe_drift(desired, self.actual.ruleset)
            closing = fail_closed(desired, self.actual.ruleset)
            if closing is not None:  # shut the VM ports now; the full batch below takes long at scale
                self.nft.apply(closing.batch())
                before = self._generation()
                self.actual = self.read()
            read_at = before if before is not None and self._generation() == before else None
        else:
            read_at = None
        if self.actual is None:  # (only when `_unchanged`, which needs it)
            raise BugError("the firewall converged without knowing the kernel's state")
        plan = plan_changes(desired, self.actual)
        if plan.empty:
            if read_at is not None:  # read between two equal generations, and it is `desired`
                self._remember(Record(read_at, self._digest(desired), exact=True))
            return ConvergeResult(changed=False, drift=drift, seconds=time.monotonic() - t0)
        before = self._generation()
        self._remember(None)
        try:
            if full or not self._direct(desired, plan):
                self.nft.apply(plan.batch())
        except KernelError:
            if full:
                raise
            # The kernel moved under us: plan again from what it really holds.
            self.actual = self.read()
            drift = describe_drift(desired, self.actual.ruleset)
            plan = plan_changes(desired, self.actual)
            before = self._generation()
            self.nft.apply(plan.batch())
        exact = self._verify(desired, plan)
        after = self._generation()
        if before is not None and after is not None and after.follows(before):
            self._remember(Record(after, self._digest(desired), exact=exact))
        return ConvergeResult(
            changed=True,
            drift=drift,
            summary=plan.summary,
            commands=len(plan.commands),
            full_replace=plan.full_replace,
            seconds=time.monotonic() - t0,
        )

    # --- rule changes straight to nf_tables ---------------------------------------------------------------

    def _direct(self, desired: Ruleset, plan: Plan) -> bool:
        """Apply `plan` without libnftables' cache when it only deletes rules and appends rules to chains
        that exist, naming only sets, maps and chains that exist (no anonymous set): libnftables encodes
        the new rules in a private namespace holding just what they name (`Nft.encode_rules`), and the
        deletes and appends go to nf_tables in one batch (`Nft.commit_rules`). False: not such a plan, or
        the encoding failed (nothing was sent; the caller applies it through libnftables). KernelError:
        the kernel refused the batch (nothing applied)."""
        staged = _staging(desired, self.actual, plan) if self.actual is not None else None
        if staged is None:
            return False
        setup, family, table, chains = staged
        try:
            bodies = self.nft.encode_rules(setup, family, table, chains)
        except (HyperfenceError, OSError):
            return False
        changes: list[DeleteRule | AppendRule] = []
        for cmd in plan.commands:
            if "delete" in cmd:
                r = cmd["delete"]["rule"]
                changes.append(DeleteRule(r["family"], r["table"], r["chain"], r["handle"]))
            else:
                r = cmd["add"]["rule"]
                body = bodies.get((r["chain"], r["comment"]))
                if body is None:
                    return False
                changes.append(AppendRule(r["family"], r["table"], r["chain"], body))
        self.nft.commit_rules(changes)
        self.direct_applies += 1
        return True

    # --- what is known without reading ----------------------------------------------------------------

    def _generation(self) -> Generation | None:
        try:
            return self.nft.generation()
        except HyperfenceError:  # unknown: everything is read, as without generations
            return None

    def _unchanged(self) -> bool:
        """The kernel still holds exactly `actual` (nobody committed since it was verified), and its rule
        bodies were read back, or were written less than `bodies_every` ago (see `__init__`)."""
        rec = self.record
        if rec is None or self.actual is None:
            return False
        if not rec.exact:
            since = self._unread_since
            if since is None or self.clock() - since >= self.bodies_every:
                return False
        if self._generation() != rec.generation:
            return False
        self.skipped_reads += 1
        return True

    def _digest(self, desired: Ruleset) -> int:
        last = self._last_digest
        if last is not None and last[0] is desired:
            return last[1]
        value = digest(desired) if last is None else digest_after(desired, last[0], last[1])
        self._last_digest = (desired, value)
        return value

    def _remember(self, record: Record | None) -> None:
        """Keep `record`, and save it for the next start. (Forgetting is not saved: a saved record is
        outdated by any commit, which moves the generation.)"""
        if record is not None and not record.exact:
            if self._unread_since is None:
                self._unread_since = self.clock()
        elif record is not None:
            self._unread_since = None
        if record == self.record:
            return
        self.record = record
        if record is None:
            return
        with contextlib.suppress(OSError, HyperfenceError):  # only a slower next start
            self.records.save(record)

    def advance(self, numbers: Iterable[int]) -> bool:
        """Commits `numbers` (in order) were seen to touch none of hyperfence's tables (reconcile/drift.py):
        each one that directly follows the recorded generation moves the record along, so a full converge
        after them still skips the read. True when the record moved. (Called with the engine's lock held.)"""
        rec = self.record
        if rec is None:
            return False
        moved = rec
        for number in numbers:
            nxt = Generation(moved.generation.namespace, number)
            if nxt.follows(moved.generation):
                moved = Record(nxt, moved.digest, moved.exact)
        if moved == rec:
            return False
        self._remember(moved)
        return True

    def _recall(self, desired: Ruleset) -> Actual | None:
        """At the first converge: when the recorded generation is the kernel's and the recorded digest is
        `desired`'s, the kernel holds `desired`. Nothing is read: rule handles are fetched chain by chain
        when a plan first needs them (`ChainHandles`). None: read everything."""
        rec = self.records.load()
        if rec is None or self._generation() != rec.generation or self._digest(desired) != rec.digest:
            return None
        self.record = rec
        self._unread_since = None if rec.exact else self.clock()
        return Actual(desired, ChainHandles(self._chain_handles))

    def _chain_handles(self, table: TableId, chain: str) -> builtins.list[tuple[int, str]]:
        return self.nft.rule_ids(table.family, table.name, chain)

    def _verify(self, desired: Ruleset, plan: Plan) -> bool:
        """Re-read what the batch touched and check it is exactly what we wanted. True when everything was
        read back, rule bodies included (not only the touched chains' rule ids)."""
        old = self.actual
        if (
            old is None
            or plan.full_replace
            or len(plan.touched_chains) + len(plan.touched_sets) > VERIFY_PARTIAL_LIMIT
        ):
            actual = self.read()
            problems = describe_drift(desired, actual.ruleset)
            handles = actual.handles
            exact = True
        else:  # only what the batch touched is re-read, so only that is compared
            self.actual = None  # `old.handles` is updated in place: until verified, the state is unknown
            touched, handles = self._reread_touched(plan, desired, old)
            problems = describe_drift(_only(desired, plan), touched)
            exact = False
        if problems:
            self.actual = None  # unknown: the next converge reads everything
            raise DriftError("the kernel does not hold what was just applied: " + "; ".join(problems[:5]))
        # Verified: what the kernel holds is the desired ruleset (what the plan left alone already was). Keep
        # the desired objects themselves, so the next plan compares most chains by identity.
        self.actual = Actual(desired, handles)
        return exact

    def _reread_touched(
        self, plan: Plan, desired: Ruleset, old: Actual
    ) -> tuple[Ruleset, dict[RuleKey, int]]:
        """The touched chains and sets as the kernel holds them now, and the rule handles updated: `old`'s
        own dict, changed in place (copying 200,000 handles at 10,000 VMs cost 10 ms a change); the caller
        no longer uses `old`."""
        handles = old.handles
        old_rules = old.ruleset.chain_rules()
        desired_chains, desired_rules, desired_sets = (
            desired.chain_by_key(),
            desired.chain_rules(),
            desired.set_by_key(),
        )
        chains: list[Chain] = []
        rules: list[Rule] = []
        for key in plan.touched_chains:
            t, name = key
            for r in old_rules.get(key, ()):
                handles.pop((t, name, r.comment), None)
            if key not in desired_chains:
                continue
            # The kernel's own list of (handle, comment) for this chain: ids, order and handles are checked
            # here; rule bodies are compared exactly by the next full read.
            by_comment = {r.comment: r for r in desired_rules.get(key, [])}
            chains.append(desired_chains[key])
            for handle, text in self.nft.rule_ids(t.family, t.name, name):
                comment = text or f"?handle={handle}"
                rules.append(by_comment.get(comment) or Rule(t, name, comment, "?"))
                handles[(t, name, comment)] = handle
        sets: list[NftSet] = []
        for key in plan.touched_sets:
            t, name = key
            kind = desired_sets[key].kind if key in desired_sets else "set"
            sets.extend(
                parse_listing(
                    self.nft.list({kind: {"family": t.family, "table": t.name, "name": name}})
                ).ruleset.sets
            )
        # The batch created any missing table (it applied atomically, or we would not be here).
        return Ruleset(desired.tables, tuple(chains), tuple(sets), tuple(rules)), handles


def _names(value: JSON, sets: set[str], chains: set[str]) -> bool:
    """Collect the set/map names (`@name`) and jump/goto targets a rule's statements name; False when they
    hold an anonymous set or map (which the kernel must create in the same batch)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("set", "map", "elem"):
                return False
            if key in ("jump", "goto") and isinstance(inner, dict) and isinstance(inner.get("target"), str):
                chains.add(inner["target"])
            elif not _names(inner, sets, chains):
                return False
        return True
    if isinstance(value, list):
        return all(_names(v, sets, chains) for v in value)
    if isinstance(value, str) and value.startswith("@"):
        sets.add(value[1:])
    return True


def _staging(
    desired: Ruleset, actual: Actual, plan: Plan
) -> tuple[dict[str, JSON], str, str, list[str]] | None:
    """For a plan of rule deletes and appends in one table: the JSON batch that makes a private namespace
    hold that table with every set, map and chain the appended rules name (empty, as in `desired`) and the
    rules themselves; its family, name, and the chains to read back. None: not such a plan."""
    tables: set[TableId] = set()
    sets: set[str] = set()
    chains: set[str] = set()
    rules: list[JSON] = []
    for cmd in plan.commands:
        if set(cmd) == {"delete"} and set(cmd["delete"]) == {"rule"}:
            r = cmd["delete"]["rule"]
        elif set(cmd) == {"add"} and set(cmd["add"]) == {"rule"}:
            r = cmd["add"]["rule"]
            if not _names(r["expr"], sets, chains):
                return None
            chains.add(r["chain"])
            rules.append(cmd)
        else:
            return None
        tables.add(TableId(r["family"], r["table"]))
    if len(tables) != 1 or not rules:
        return None
    (table,) = tables
    des_sets, act_sets = desired.set_by_key(), actual.ruleset.set_by_key()
    des_chains, act_chains = desired.chain_by_key(), actual.ruleset.chain_by_key()
    setup: list[JSON] = [{"add": {"table": {"family": table.family, "name": table.name}}}]
    setup.append({"delete": {"table": {"family": table.family, "name": table.name}}})
    setup.append({"add": {"table": {"family": table.family, "name": table.name}}})
    for name in sorted(sets):
        key = (table, name)
        if key not in des_sets or act_sets.get(key) is None or act_sets[key].shape() != des_sets[key].shape():
            return None
        setup.append({"add": {des_sets[key].kind: set_obj(des_sets[key], with_elements=False)}})
    for name in sorted(chains):
        if (table, name) not in des_chains or (table, name) not in act_chains:
            return None
        setup.append({"add": {"chain": {"family": table.family, "table": table.name, "name": name}}})
    setup.extend(rules)
    return {"nftables": setup}, table.family, table.name, sorted({c["add"]["rule"]["chain"] for c in rules})
