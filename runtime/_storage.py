"""The storage interface: everything the engine needs to resume lives behind it.

A backend implements two ABCs:

* ``Store`` — owns the connections. ``write(units)`` runs many *units* (functions of a
  ``StoreTxn``) in **one** transaction, each under its own savepoint, so one failing
  unit never undoes another's work and many instances' step results share one fsync
  (group commit). ``read(fn)`` runs a read-only function on a snapshot.
* ``StoreTxn`` — the domain operations, named verb_noun as in DBOS's system database.
  Every write that belongs to a running activation carries the instance's
  ``run_token`` (its fencing token) and raises ``LeaseLost`` when the token is stale,
  so a terminated, restarted or (with PostgreSQL) re-leased instance can never be
  written by an old activation.

Both are blocking; the engine calls them from worker threads.

**Notices.** On a store several supervisors share, a transaction may ``announce`` what
others should know at once (an instance of a tenant was queued, an instance changed, an
instance must stop), delivered when it commits; ``Store.listen`` hears the others'
notices. They only make the others react sooner: every fact is in the database, and
polling (the dispatcher's safety net, lease renewal, the timers' rounds) finds it anyway.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._models import InstanceRecord, InstanceStatus, InstanceSummary, LogRecord, StepRecord
from .errors import StorageError

__all__ = ["Notice", "Outcome", "Store", "StoreTxn", "Unit", "open_store"]

T = TypeVar("T")
Unit = Callable[["StoreTxn"], Any]


class Notice(enum.StrEnum):
    """What one supervisor tells the others sharing its store (``StoreTxn.announce``)."""

    QUEUED = "q"  #: subject: a tenant id; it has queued instances to start
    CHANGED = "c"  #: subject: an instance key; its status changed (wake its watchers)
    STOP = "s"  #: subject: an instance key; terminated or restarted: stop its activation
    MISSED = "*"  #: (delivered by listen, never announced) notices may have been lost


#: ``Store.listen``'s callback: a batch of (notice, subject), called from another thread.
NoticeHandler = Callable[[list[tuple[Notice, str]]], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one unit of a grouped write produced: a value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


class _Unset:
    """Marks an ``update_instance`` field that is left as it is."""


UNSET: Any = _Unset()


class StoreTxn(ABC):
    """Domain operations inside one transaction."""

    def announce(self, notice: Notice, subject: str | int) -> None:  # noqa: B027 - optional
        """Tell the other supervisors sharing the store, once this transaction commits.

        Nothing to do on a store one supervisor has to itself (the default).
        """

    # -- instances ---------------------------------------------------------------

    @abstractmethod
    def insert_instance(
        self,
        tenant_id: str,
        instance_id: str,
        workflow_name: str,
        code_version: str,
        params: Any,
        now: float,
    ) -> int:
        """Create a ``queued`` instance; raise InstanceAlreadyExists on a duplicate id."""

    @abstractmethod
    def get_instance(self, tenant_id: str, instance_id: str) -> InstanceRecord | None:
        """The instance with this id in this tenant, or None."""

    @abstractmethod
    def get_status(self, key: int) -> InstanceStatus | None:
        """Just the status of an instance (cheap: read after every recorded step)."""

    @abstractmethod
    def due_steps(self, key: int, now: float) -> list[StepRecord]:
        """Pending steps (waiting or retrying) whose wake time has come."""

    @abstractmethod
    def get_instance_by_key(self, key: int) -> InstanceRecord | None:
        """The instance with this storage key, or None."""

    @abstractmethod
    def update_instance(
        self,
        key: int,
        now: float,
        *,
        token: int | None = None,
        status: InstanceStatus = UNSET,
        output: Any = UNSET,
        error: Any = UNSET,
        wake_at: float | None = UNSET,
        paused_at: float | None = UNSET,
        code_version: str = UNSET,
        new_token: bool = False,
        priority: int = UNSET,
    ) -> int:
        """Change the given fields; fenced by ``token`` when given. Returns the run token.

        ``new_token`` bumps the fencing token (terminate, restart, a new activation).
        ``priority`` (0 = woken, 1 = new) also stamps the time it became ready.
        """

    @abstractmethod
    def claim_queued(
        self, key: int, now: float, owner: str | None = None, lease_seconds: float | None = None
    ) -> InstanceRecord | None:
        """Move a ``queued`` instance to ``running`` under a new token; None if not queued.

        ``owner`` (a supervisor id) takes a lease on it that ends ``lease_seconds`` from
        now, measured by the database's clock on PostgreSQL (supervisors' clocks may
        differ), by this machine's wall clock on SQLite.
        """

    def insert_claimed(
        self,
        tenant_id: str,
        instance_id: str,
        workflow_name: str,
        code_version: str,
        params: Any,
        now: float,
        owner: str | None = None,
        lease_seconds: float | None = None,
    ) -> InstanceRecord:
        """``insert_instance`` then ``claim_queued``: a new instance, already ``running``
        under its first token (a backend may do it in one statement)."""
        key = self.insert_instance(tenant_id, instance_id, workflow_name, code_version, params, now)
        record = self.claim_queued(key, now, owner, lease_seconds)
        if record is None:  # the row is this transaction's own: nobody else can hold it
            raise StorageError(f"instance {key} could not be claimed by its own insert")
        return record

    @abstractmethod
    def queued_keys(self, limit: int) -> list[int]:
        """Queued instances in dispatch order: woken before new, then oldest first."""

    @abstractmethod
    def queued_for_tenant(self, tenant_id: str, limit: int) -> list[tuple[int, int]]:
        """One tenant's queued instances as ``(key, priority)``, woken first, then oldest."""

    @abstractmethod
    def queued_tenants(self, limit: int) -> list[str]:
        """Tenants that have queued instances (used at start and as a safety net)."""

    @abstractmethod
    def due_keys(self, now: float, limit: int) -> list[tuple[int, str]]:
        """``waiting`` instances whose earliest timer is due, as ``(key, tenant_id)``."""

    @abstractmethod
    def next_wake_at(self) -> float | None:
        """The earliest timer of any ``waiting`` instance."""

    @abstractmethod
    def recover_running(self, now: float) -> int:
        """After a crash: running instances back to queued, waitingForPause to paused.

        Only for a store that one supervisor owns alone (SQLite): every lease is its own.
        """

    @abstractmethod
    def renew_leases(self, owner: str, lease_seconds: float) -> list[tuple[int, int]]:
        """Extend every lease ``owner`` holds (one statement); ``(key, run_token)`` of each.

        An instance of ``owner``'s that is not returned (or with another token) is no
        longer held by it: another supervisor took it over, or it left running.
        """

    @abstractmethod
    def recover_expired(self, now: float) -> list[tuple[int, str]]:
        """Instances whose lease expired (or that have no owner) back to queued/paused.

        ``running`` ones go back to ``queued`` (woken priority), ``waitingForPause`` ones
        to ``paused``; both under a new fencing token, so their old holder can never write
        them again. Returns ``(key, tenant_id)`` of each. Safe to run from many
        supervisors at once: each expired instance is recovered once.
        """

    @abstractmethod
    def list_instances(
        self, tenant_id: str, status: str | None, limit: int, after_key: int | None
    ) -> list[tuple[int, InstanceSummary]]:
        """A page of a tenant's instances, newest first, after the cursor ``after_key``."""

    @abstractmethod
    def count_by_status(self, tenant_id: str | None) -> dict[str, int]:
        """How many instances are in each status (for one tenant, or all)."""

    # -- the journal ---------------------------------------------------------------

    @abstractmethod
    def load_steps(self, key: int) -> list[StepRecord]:
        """Every journal row of an instance, in call order."""

    @abstractmethod
    def get_step(self, key: int, seq: int) -> StepRecord | None:
        """One journal row."""

    @abstractmethod
    def put_step(self, key: int, token: int | None, step: StepRecord) -> None:
        """Insert or replace a journal row; fenced by ``token`` (LeaseLost when stale)."""

    def record_step(self, key: int, token: int | None, step: StepRecord) -> InstanceStatus | None:
        """``put_step`` then ``get_status`` (read after every recorded step: a pause may
        be waiting for it); a backend may do both in one statement."""
        self.put_step(key, token, step)
        return self.get_status(key)

    @abstractmethod
    def delete_steps(self, key: int) -> None:
        """Discard an instance's journal and log (restart)."""

    @abstractmethod
    def find_waiting_event_step(self, key: int, event_type: str) -> StepRecord | None:
        """The pending ``waitForEvent`` step of this type, if the instance has one."""

    @abstractmethod
    def pending_wake(self, key: int) -> tuple[int, float | None]:
        """How many steps still wait (sleep, event, retry) and the earliest wake time."""

    @abstractmethod
    def shift_step_wakes(self, key: int, delta: float) -> None:
        """Move the wake time of every pending step by ``delta`` seconds (resume)."""

    # -- events ---------------------------------------------------------------------

    @abstractmethod
    def push_event(self, key: int, event_type: str, payload: Any, ts: float) -> None:
        """Buffer an event for the instance."""

    @abstractmethod
    def pop_event(self, key: int, event_type: str) -> tuple[Any, float] | None:
        """Take the oldest buffered event of this type (first in, first out)."""

    # -- logs -------------------------------------------------------------------------

    @abstractmethod
    def append_logs(self, key: int, lines: Sequence[tuple[float, str, str]]) -> None:
        """Append ``(ts, level, message)`` lines to the instance's log."""

    @abstractmethod
    def read_logs(self, key: int, after_id: int, limit: int) -> list[LogRecord]:
        """Log lines with an id above ``after_id``, oldest first."""

    # -- code versions ------------------------------------------------------------------

    @abstractmethod
    def put_code_version(self, tenant_id: str, version: str, files: bytes, now: float) -> None:
        """Store a tenant's code, content-addressed (idempotent)."""

    @abstractmethod
    def get_code_version(self, tenant_id: str, version: str) -> bytes | None:
        """A stored code version, or None."""


class Store(ABC):
    """A database holding every instance, journal, event, timer and code version."""

    #: Whether several supervisors may share this store (PostgreSQL): instances are then
    #: held under leases that expire, and recovery takes only expired ones.
    shared: bool = False

    @abstractmethod
    def write(self, units: Sequence[Unit]) -> list[Outcome]:
        """Run ``units`` in one transaction (a savepoint each) and commit durably once."""

    @abstractmethod
    def read(self, fn: Callable[[StoreTxn], T]) -> T:
        """Run ``fn`` on a consistent read-only snapshot."""

    def listen(self, on_notices: NoticeHandler) -> Callable[[], None]:
        """Hear the other supervisors' notices (``on_notices`` runs on another thread);
        returns a function that stops listening. Nothing to hear by default."""
        return lambda: None

    @abstractmethod
    def close(self) -> None:
        """Close every connection (idempotent)."""


def open_store(url: str) -> Store:
    """Open the store named by ``url``.

    ``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db`` follow
    SQLAlchemy's convention; a URL-less path is taken as a SQLite file.
    ``postgresql://...`` (or ``postgres://``) is a libpq URL; add
    ``?options=-csearch_path%3DNAME`` to keep tenantflow's tables in schema NAME.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from ._storage_postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
    elif "://" in url:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH")
    else:
        path = url
    from ._storage_sqlite import SqliteStore

    return SqliteStore(path)
