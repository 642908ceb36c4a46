"""The repository ports: what the core needs from a store, as `typing.Protocol`s.

    PolicyRepository   policy versions (generations): put with compare-and-swap, get, and a change feed;
                       each version is also kept as objects (a VM, a rule, ...: policy/objects.py), written
                       one by one (`put_objects`) and read back as what changed (`policy_changes`)
    EventLog           append-only events (drift repaired, applies, agent decisions), queried newest last
    AgentState         the enrolled agents: key, channel, sequence, isolation (survives a restart)
    LeaseStore         the DHCP leases that taught VMs their addresses
    InventoryStore     the last known inventory: the VMs discovered from the hypervisor, and when it was read

Implemented by `adapters/store:Store` (SQLite in the state directory, one object for all five) and by
the in-memory fakes in `hyperfence/testing.py`; `tests/unit/test_ports_contract.py` runs the same contract
against both, so they cannot drift apart. A cluster store is a third implementation of these Protocols.

This module is pure: records and Protocols, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hyperfence.health.tracker import AgentRecord
from hyperfence.model.lease import Lease
from hyperfence.model.overlay import Overlay
from hyperfence.policy.objects import ObjectChange


@dataclass(frozen=True)
class StoredPolicy:
    generation: int
    created: float
    source: str
    document: Any  # plain data (dict), as parsed from YAML/JSON


class PolicyRepository(Protocol):
    """Policy versions, never edited in place. Generations start at 1 and only grow; 0 means "none yet"."""

    def put_policy(self, document: Any, *, source: str, expected: int | None = None) -> int:
        """Store `document` (already validated) as a new generation and return it. With `expected` (the
        generation the caller read as the latest, 0 for none), the put is a compare-and-swap: when the
        latest generation is no longer `expected`, nothing is stored and `ConflictError` names both."""
        ...

    def put_objects(self, changes: list[ObjectChange], *, source: str, expected: int | None = None) -> int:
        """Store a new generation made of the latest one with `changes` (objects written or deleted:
        `policy/objects.py`) and return it; `expected` as for `put_policy`. The caller validated the document
        they make. `ConflictError` when the latest generation is not kept as objects."""
        ...

    def policy_changes(self, after: int, upto: int) -> list[ObjectChange] | None:
        """The net object changes from generation `after` to generation `upto` (`policy/objects.py fold`):
        what a reader holding `after` makes to hold `upto`, at the cost of the change, not of the policy.
        None when they are not known (`after` is 0; `after`, or a generation after it, was not kept as
        objects): read
        `upto` whole."""
        ...

    def latest_generation(self) -> int:
        """The newest generation, 0 when there is none."""
        ...

    def get_policy(self, generation: int | None = None) -> StoredPolicy | None:
        """One generation, or the newest when `generation` is None; None when there is no such version."""
        ...

    def wait_for_change(
        self, after: int, timeout: float, *, cancelled: Callable[[], bool] | None = None
    ) -> int:
        """Block until a generation newer than `after` exists, at most `timeout` seconds, without polling
        (a put wakes the waiters, in this process or, for the SQLite store, in another); return the latest
        generation (not above `after` when the wait timed out or was cancelled). `cancelled` is asked
        before waiting and whenever `wake` is called: a stop sets its flag, then calls `wake`, and no wait
        misses it."""
        ...

    def wake(self) -> None:
        """Make every `wait_for_change` in progress look at its `cancelled` (and return if it says so)."""
        ...


class EventLog(Protocol):
    def add_event(self, kind: str, data: dict[str, Any], *, vm: str | None = None) -> None: ...

    def add_events(self, rows: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Many events at once, all or none: (kind, vm, data)."""
        ...

    def events(
        self, *, kind: str | None = None, vm: str | None = None, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The latest `limit` events (oldest first) of one kind and/or VM with an id above `after`; each is
        its data with `id` (growing), `time`, `kind` and `vm` added."""
        ...


class AgentState(Protocol):
    def enroll_agent(self, rec: AgentRecord) -> None:
        """Store a VM's key and channel; a new enrolment replaces the key and resets the sequence to 0."""
        ...

    def agents(self) -> dict[str, AgentRecord]:
        """Every enrolled VM's record, by VM id."""
        ...

    def save_agents(self, records: list[AgentRecord]) -> None:
        """The changing part of each enrolled record (sequence, last seen, agent, isolation), all or none;
        a sequence never goes back; records of VMs not enrolled are ignored."""
        ...

    def save_seqs(self, seqs: dict[str, int]) -> None:
        """The last accepted sequence of each VM (VM id -> seq); a sequence never goes back."""
        ...


class LeaseStore(Protocol):
    def leases(self) -> tuple[Lease, ...]:
        """Every stored lease, ordered by VM then address."""
        ...

    def save_leases(self, leases: tuple[Lease, ...]) -> None:
        """Replace the stored leases with `leases`, all or none."""
        ...


@dataclass(frozen=True)
class StoredInventory:
    """The VMs discovered from the hypervisor at its last successful read (plain `vms` items, as
    `policy/inventory.py merge_discovered` takes them), and when that read was (the writer's clock)."""

    vms: tuple[dict[str, Any], ...]
    read: float


class InventoryStore(Protocol):
    """The last known inventory, part of the desired state: what the daemon merged into the policy, kept so
    that every use case (a CLI command, a daemon that restarts while the hypervisor cannot be read) compiles
    the same VMs as the daemon that read them."""

    def inventory(self) -> StoredInventory | None:
        """The last saved inventory, None when none was ever saved."""
        ...

    def save_inventory(self, vms: tuple[dict[str, Any], ...], *, read: float) -> None:
        """Replace the stored inventory with `vms` read at `read`, all or none (`vms` must be JSON data)."""
        ...


class OverlayStore(Protocol):
    """Every producer's overlays (isolation, rate limits, shields: model/overlay.py), kept per producer so
    that one producer's write never touches another's."""

    def overlays(self) -> tuple[Overlay, ...]:
        """Every producer's overlays, expired ones too, ordered by producer, VM and kind."""
        ...

    def save_overlays(self, producer: str, overlays: tuple[Overlay, ...]) -> None:
        """Replace `producer`'s overlays with `overlays`, all or none; other producers' stay."""
        ...


class Repository(PolicyRepository, EventLog, AgentState, LeaseStore, InventoryStore, OverlayStore, Protocol):
    """All six ports, as one store provides them."""
