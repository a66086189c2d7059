"""The durable engine: instance API, dispatcher, timers and recovery.

Three tasks run in the engine's nursery, next to one task per running instance::

    writer      GroupCommitWriter: every database write, grouped into shared commits
    dispatcher  queued instances -> running, woken before new, up to max_concurrency
    timers      sleeps, retry backoffs and event timeouts that are due -> queued

Nothing the engine needs in order to resume lives only in memory: statuses, the
journal, buffered events and timers are rows. Memory holds only what is running now
(``Session``) and caches that can be rebuilt; a restart after SIGKILL calls
``recover_running`` and carries on from the database.

On a shared store (PostgreSQL, several supervisors) a fourth task runs::

    leases      LeaseKeeper (``_leases.py``): renews every lease this supervisor holds
                every lease_seconds / 3; an activation whose instance was taken over is
                aborted; instances whose lease expired (their supervisor died or
                stalled) go back to the queue

and recovery at start takes only expired leases (``recover_expired``), never the live
instances of the other supervisors. Leases decide who *should* run an instance; the
fencing token (``run_token``) guarantees that nobody else *can* write it.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgpack
import trio

from sandbox.protocol import (
    DEFAULT_MAX_STEPS,
    MAX_ID_LENGTH,
    MAX_PAYLOAD_BYTES,
    TENANT_ID_PATTERN,
    Activate,
    ErrorInfo,
    JournalEntry,
    StepKind,
    StepStatus,
    WorkflowFinished,
    is_valid_id,
)

from ._activation import ActivationDriver, Session, _with
from ._clock import Clock, WallClock
from ._dispatcher import FairDispatcher
from ._faults import crash_point
from ._leases import LeaseKeeper, recover_expired_unit
from ._models import (
    FINISHED_STATUSES,
    InstanceRecord,
    InstanceStatus,
    InstanceSummary,
    LogRecord,
    StepRecord,
)
from ._notices import NoticeBoard
from ._runner import Runner, RunnerError, RunTarget
from ._storage import Notice, Outcome, Store, StoreTxn
from ._timers import TimerService
from ._watches import Watches
from ._writer import GroupCommitWriter
from .errors import (
    BadRequest,
    CannotTerminate,
    InstanceNotFound,
    InvalidEventType,
    InvalidInstanceId,
    InvalidInstanceState,
    LeaseLost,
    PayloadTooLarge,
    StorageBusy,
    StorageError,
    TenantNotFound,
)

__all__ = [
    "DEFAULT_WORKFLOW",
    "LATENCY_BUCKETS",
    "Engine",
    "EngineStats",
    "InstanceView",
    "open_engine",
]

T = TypeVar("T")
log = logging.getLogger("tenantflow.engine")
DEFAULT_WORKFLOW: Final = "TenantWorkflow"
#: Crashes in a row, outside any step and without progress, before an instance fails.
MAX_CRASHES: Final = 5
#: Back-pressure defaults: the write lag (s) and the queued writes beyond which API
#: writes are refused (``storage.busy``), and the reads the API may have in flight.
DEFAULT_MAX_WRITE_LAG: Final = 5.0
MAX_WRITE_BACKLOG: Final = 50_000
_API_READERS: Final = 16
#: Default lease of a running instance on a shared store (SPEC 10: ``--lease-seconds``).
DEFAULT_LEASE_SECONDS: Final = 15.0


#: Upper bounds (seconds) of the step latency histogram's buckets.
LATENCY_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0)


@dataclass
class EngineStats:
    """Counters for ``/metrics`` (monotonic since the engine started)."""

    steps_completed: int = 0
    steps_failed: int = 0
    activations: int = 0
    step_latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    step_latency_sum: float = 0.0
    step_latency_count: int = 0
    busy_refusals: int = 0  #: API calls refused with storage.busy (back-pressure)

    def observe_step(self, seconds: float, ok: bool) -> None:
        if ok:
            self.steps_completed += 1
        else:
            self.steps_failed += 1
        self.step_latency_sum += seconds
        self.step_latency_count += 1
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.step_latency_buckets[index] += 1
                break


@dataclass(frozen=True, slots=True)
class InstanceView:
    """An instance with its journal, as ``GET .../instances/{id}`` shows it."""

    record: InstanceRecord
    steps: tuple[StepRecord, ...]


def check_tenant_id(tenant_id: object) -> str:
    """Return ``tenant_id`` if it matches the pattern of SPEC 3, else raise TenantNotFound."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise TenantNotFound(f"invalid tenant id {tenant_id!r:.80}")
    return tenant_id


def check_instance_id(instance_id: object) -> str:
    """Return ``instance_id`` if it matches SPEC 4's rule, else raise InvalidInstanceId."""
    if not is_valid_id(instance_id):
        raise InvalidInstanceId(
            f"invalid instance id {instance_id!r:.120}: at most {MAX_ID_LENGTH} characters of "
            "letters, digits, '_' and '-', not starting with '-'"
        )
    return instance_id


def check_payload(value: Any, what: str) -> None:
    """Refuse what msgpack cannot carry and what exceeds 1 MiB."""
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{what} is not serializable: {exc}") from None
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"{what} is {size} bytes, more than the limit of {MAX_PAYLOAD_BYTES}")


#: What an instance with an activation on this supervisor may be in.
_ACTIVE: Final = frozenset({InstanceStatus.RUNNING, InstanceStatus.WAITING_FOR_PAUSE})


class Engine:
    """Runs tenants' workflow instances durably on a ``Store`` through a ``Runner``."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        *,
        clock: Clock | None = None,
        max_concurrency: int = 1000,
        max_steps: int = DEFAULT_MAX_STEPS,
        current_version: Callable[[str], str | None] | None = None,
        tenant_concurrency: Callable[[str], int] | None = None,
        owner: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        notices: bool = True,
        max_write_lag: float = DEFAULT_MAX_WRITE_LAG,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        #: This supervisor's id: the owner of the leases it takes.
        self.owner = owner or uuid.uuid4().hex
        self.lease_seconds = float(lease_seconds)
        #: On a shared store: hear the other supervisors' notices (LISTEN/NOTIFY). Off,
        #: they are found by polling only (the benchmarks compare the two).
        self.listens = notices
        #: Back-pressure: past this many seconds of write lag (or MAX_WRITE_BACKLOG queued
        #: units) API writes are refused with StorageBusy and no activation starts.
        self.max_write_lag = float(max_write_lag)
        self._api_readers = trio.CapacityLimiter(_API_READERS)
        self.notices: NoticeBoard | None = None
        self.store = store
        self.runner = runner
        self.clock = clock or WallClock()
        self.writer = GroupCommitWriter(store)
        self.max_concurrency = max_concurrency
        self.max_steps = max_steps
        self._current_version = current_version
        self._sessions: dict[int, Session] = {}
        self._session_keys: dict[tuple[str, str], int] = {}  #: (tenant, id) -> key, running here
        self._claiming: set[int] = set()
        #: Instances being created already claimed (``_create_running``): slots taken
        #: before their key is known.
        self._starting = 0
        self._crashes: dict[int, int] = {}
        self._activation_ids = itertools.count(1)
        self.dispatcher = FairDispatcher(
            self, tenant_concurrency or (lambda tenant_id: max_concurrency)
        )
        self.timers = TimerService(self)
        self.leases = LeaseKeeper(self)
        self.watches = Watches()
        self._nursery: trio.Nursery | None = None
        self.recovered = 0
        self.stats = EngineStats()
        self.draining = False
        self._sessions_changed = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: recover what a crash left running, then dispatch."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.writer.run)
            now = self.clock.now()
            if self.store.shared:
                if self.listens:
                    self.notices = NoticeBoard(self)
                    nursery.start_soon(self._listen, self.notices)
                # Others may be running instances right now: take only expired leases.
                recovered = await self.writer.submit(recover_expired_unit(now))
                self.recovered = len(recovered)
                nursery.start_soon(self.leases.run)
            else:
                # The store is ours alone (SQLite's file lock): whatever runs is a leftover.
                self.recovered = await self.writer.submit(lambda txn: txn.recover_running(now))
            nursery.start_soon(self.timers.run)
            nursery.start_soon(self.dispatcher.run)
            task_status.started()

    async def _listen(self, board: NoticeBoard) -> None:
        stop = self.store.listen(board.from_thread)
        try:
            await trio.sleep_forever()
        finally:
            stop()

    async def renew_leases(self) -> list[int]:
        """Renew every lease we hold now (see ``LeaseKeeper.renew``)."""
        return await self.leases.renew()

    async def recover_expired(self) -> list[tuple[int, str]]:
        """Requeue instances whose lease expired now (see ``LeaseKeeper.recover_expired``)."""
        return await self.leases.recover_expired()

    @property
    def leases_lost(self) -> int:
        """Activations aborted because another supervisor took their instance."""
        return self.leases.lost

    def session(self, key: int) -> Session | None:
        """The activation running this instance here, if any."""
        return self._sessions.get(key)

    def sessions(self) -> dict[int, Session]:
        """A copy of the activations running here, by instance key."""
        return dict(self._sessions)

    async def drain(self, grace: float) -> bool:
        """Start nothing new; let running activations stop at their next step boundary.

        Returns True if every activation stopped within ``grace`` seconds (real time).
        What a still-running one had recorded is durable either way; its step in
        flight runs again after the restart (steps are at least once).
        """
        self.draining = True
        with trio.move_on_after(grace):
            while self._sessions or self._claiming or self._starting:
                await self._sessions_changed.wait()
        return not (self._sessions or self._claiming or self._starting)

    def is_idle(self) -> bool:
        """Nothing runs, nothing is queued or being written: only timers remain."""
        return (
            not self._sessions
            and not self._claiming
            and not self._starting
            and self.writer.idle
            and self.dispatcher.idle
            and self.timers.idle
            and not self.dispatcher.wakeup.is_set()
        )

    @property
    def running_count(self) -> int:
        """Instances holding a concurrency slot now."""
        return len(self._sessions) + len(self._claiming) + self._starting

    # ------------------------------------------------------------------ notifications

    def kick_dispatch(self, tenant_id: str | None) -> None:
        """Tell the dispatcher an instance of ``tenant_id`` was queued (None: a slot freed)."""
        self.dispatcher.kick(tenant_id)

    def busy_keys(self) -> set[int]:
        """Instances with an activation now (claiming or running)."""
        return set(self._sessions) | self._claiming

    def start_instance(self, key: int, tenant_id: str) -> None:
        """Claim and run a queued instance in a slot the dispatcher granted."""
        assert self._nursery is not None
        self._claiming.add(key)
        self._nursery.start_soon(self._run_instance, key, tenant_id)

    async def read(self, fn: Callable[[StoreTxn], T]) -> T:
        """Run ``fn`` on a read-only snapshot, on a worker thread."""
        return await self._read(fn)

    def kick_timers(self, wake_at: float | None = None) -> None:
        """Tell the timers a timer changed (due at ``wake_at``; None: look again now)."""
        self.timers.kick(wake_at)

    def notify_change(self, key: int, status: InstanceStatus | None = None) -> None:
        """An instance's status or journal changed (wakes its ``wait_for_*`` watchers).

        ``status``: its status as of the commit that changed it, when the caller knows
        it; a watcher waiting for that status then needs no read.
        """
        self.watches.changed(key, status)

    def notify_log(self, key: int) -> None:
        """An instance's log grew (wakes its log followers)."""
        self.watches.logged(key)

    def change_event(self, key: int) -> trio.Event:
        """An event set at the next change of this instance (take it before reading)."""
        return self.watches.watch(key).event

    def log_event(self, key: int) -> trio.Event:
        """An event set when this instance's log next grows."""
        return self.watches.log_event(key)

    # ------------------------------------------------------------------ the instance API

    async def create(
        self,
        tenant_id: str,
        *,
        instance_id: str | None = None,
        params: Any = None,
        code_version: str = "",
        workflow_name: str = DEFAULT_WORKFLOW,
    ) -> tuple[str, InstanceStatus]:
        """Persist a new ``queued`` instance and schedule it."""
        check_tenant_id(tenant_id)
        iid = uuid.uuid4().hex if instance_id is None else check_instance_id(instance_id)
        check_payload(params, "params")
        self._admit_write()
        now = self.clock.now()
        if self._may_start_at_once(tenant_id):
            await self._create_running(tenant_id, iid, code_version, params, now, workflow_name)
        else:
            await self.writer.submit(
                _insert_unit(tenant_id, iid, code_version, params, now, workflow_name)
            )
            self.kick_dispatch(tenant_id)
        # The status it was accepted with (SPEC: "persisted as queued"), even when it was
        # claimed in the same commit and is running by now.
        return iid, InstanceStatus.QUEUED

    def _may_start_at_once(self, tenant_id: str) -> bool:
        """A new instance may skip the queue: a slot is free for it, globally and in its
        tenant, and nothing we know of is queued (which would be owed the slot first)."""
        dispatcher = self.dispatcher
        return (
            self._nursery is not None
            and not self.draining
            and dispatcher.knows_queue
            and not dispatcher.queued_tenants
            and self.running_count < self.max_concurrency
            and dispatcher.room(tenant_id) > 0
        )

    async def _create_running(
        self,
        tenant_id: str,
        instance_id: str,
        code_version: str,
        params: Any,
        now: float,
        workflow_name: str,
    ) -> None:
        """Insert an instance already claimed by us and start it: one commit instead of
        three (insert, the dispatcher's read, the claim) and no trip through the queue.

        The slot is reserved before the commit and handed over in the writer task right
        after it (``then``): a caller cancelled meanwhile cannot strand a running
        instance, and a lease renewal never sees it held with no activation.
        """
        self.dispatcher.take_slot(tenant_id)
        self._starting += 1
        owner = self.owner if self.store.shared else None
        lease = self.lease_seconds if self.store.shared else None

        def unit(txn: StoreTxn) -> InstanceRecord:
            return txn.insert_claimed(
                tenant_id, instance_id, workflow_name, code_version, params, now, owner, lease
            )

        def then(outcome: Outcome) -> None:
            self._starting -= 1
            if outcome.error is not None or self._nursery is None:
                self._sessions_did_change()
                self.dispatcher.release(tenant_id)
                return
            record: InstanceRecord = outcome.value
            session = self._open_session(record)
            self._nursery.start_soon(self._run_session, session, record, [])

        await self.writer.submit(unit, then)

    async def create_many(
        self, tenant_id: str, items: Iterable[tuple[str | None, Any]], *, code_version: str = ""
    ) -> list[tuple[str, InstanceStatus] | Exception]:
        """Create several instances in one commit; each item succeeds or fails alone."""
        check_tenant_id(tenant_id)
        self._admit_write()
        now = self.clock.now()
        results: list[tuple[str, InstanceStatus] | Exception] = []
        units: dict[int, Callable[[StoreTxn], Any]] = {}
        for index, (instance_id, params) in enumerate(items):
            try:
                iid = uuid.uuid4().hex if instance_id is None else check_instance_id(instance_id)
                check_payload(params, "params")
            except Exception as exc:
                results.append(exc)
                continue
            results.append((iid, InstanceStatus.QUEUED))
            units[index] = _insert_unit(tenant_id, iid, code_version, params, now)
        # In the order given: a batch's instances are queued (and run) in that order.
        outcomes = await self.writer.submit_all(list(units.values()))
        for index, outcome in zip(units, outcomes, strict=True):
            if isinstance(outcome.error, Exception):
                results[index] = outcome.error
            elif outcome.error is not None:
                raise outcome.error
        self.kick_dispatch(tenant_id)
        return results

    async def get(self, tenant_id: str, instance_id: str) -> InstanceView:
        """The instance and its journal, with the attempts running now."""
        check_tenant_id(tenant_id)

        def read(txn: StoreTxn) -> InstanceView | None:
            record = txn.get_instance(tenant_id, instance_id)
            if record is None:
                return None
            return InstanceView(record, tuple(txn.load_steps(record.key)))

        view = await self._api_read(read)
        if view is None:
            raise InstanceNotFound(tenant_id, instance_id)
        session = self._sessions.get(view.record.key)
        if session is None or not session.inflight:
            return view
        steps = {s.seq: s for s in view.steps}
        for attempt in session.inflight.values():
            previous = steps.get(attempt.seq)
            steps[attempt.seq] = StepRecord(
                attempt.seq,
                attempt.name,
                attempt.count,
                StepKind.DO,
                StepStatus.RUNNING,
                attempts=attempt.attempt,
                started_at=previous.started_at if previous else attempt.started_at,
                error=previous.error if previous else None,
            )
        return InstanceView(view.record, tuple(steps[s] for s in sorted(steps)))

    async def status(self, tenant_id: str, instance_id: str) -> InstanceStatus:
        """Just the instance's status."""
        return (await self._get_record(tenant_id, instance_id)).status

    async def list_instances(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[InstanceSummary], str | None]:
        """A page of instances, newest first, and the cursor of the next page (or None)."""
        check_tenant_id(tenant_id)
        if status is not None and status not in {s.value for s in InstanceStatus}:
            raise BadRequest(f"unknown status {status!r}")
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        try:
            after = int(cursor) if cursor else None
        except ValueError:
            raise BadRequest(f"invalid cursor {cursor!r}") from None
        rows = await self._api_read(
            lambda txn: txn.list_instances(tenant_id, status, limit + 1, after)
        )
        page = rows[:limit]
        next_cursor = str(page[-1][0]) if len(rows) > limit else None
        return [summary for _, summary in page], next_cursor

    async def count_by_status(self, tenant_id: str | None = None) -> dict[str, int]:
        """Instances per status, for one tenant or all."""
        return await self._api_read(lambda txn: txn.count_by_status(tenant_id))

    async def read_logs(
        self, tenant_id: str, instance_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[LogRecord]:
        """Log lines of an instance after ``after_id``."""
        key = (await self._get_record(tenant_id, instance_id)).key
        return await self._api_read(lambda txn: txn.read_logs(key, after_id, limit))

    async def pause(self, tenant_id: str, instance_id: str) -> InstanceStatus:
        """Pause now if nothing runs, else at the next step boundary (``waitingForPause``)."""
        now = self.clock.now()

        def unit(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            record = self._require(txn, tenant_id, instance_id)
            status = record.status
            if status in FINISHED_STATUSES:
                raise InvalidInstanceState(f"cannot pause a {status.value} instance")
            if status in (InstanceStatus.QUEUED, InstanceStatus.WAITING):
                txn.update_instance(record.key, now, status=InstanceStatus.PAUSED, paused_at=now)
                return record.key, InstanceStatus.PAUSED
            if status is InstanceStatus.RUNNING:
                txn.update_instance(record.key, now, status=InstanceStatus.WAITING_FOR_PAUSE)
                return record.key, InstanceStatus.WAITING_FOR_PAUSE
            return record.key, status

        return await self._admin(tenant_id, unit)

    async def resume(self, tenant_id: str, instance_id: str) -> InstanceStatus:
        """Continue a paused instance, shifting its pending timers by the time it was paused."""
        now = self.clock.now()

        def unit(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            record = self._require(txn, tenant_id, instance_id)
            status = record.status
            if status is InstanceStatus.WAITING_FOR_PAUSE:
                txn.update_instance(record.key, now, status=InstanceStatus.RUNNING)
                return record.key, InstanceStatus.RUNNING
            if status is not InstanceStatus.PAUSED:
                if status in FINISHED_STATUSES:
                    raise InvalidInstanceState(f"cannot resume a {status.value} instance")
                return record.key, status
            shift = max(0.0, now - (record.paused_at or now))
            txn.shift_step_wakes(record.key, shift)
            pending, wake = txn.pending_wake(record.key)
            if pending == 0:
                txn.update_instance(
                    record.key,
                    now,
                    status=InstanceStatus.QUEUED,
                    paused_at=None,
                    wake_at=None,
                    priority=0,
                )
                return record.key, InstanceStatus.QUEUED
            txn.update_instance(
                record.key, now, status=InstanceStatus.WAITING, paused_at=None, wake_at=wake
            )
            return record.key, InstanceStatus.WAITING

        status = await self._admin(tenant_id, unit)
        if status is InstanceStatus.WAITING:
            self.kick_timers()  # it waits for a timer again: a round reads when
        return status

    async def terminate(self, tenant_id: str, instance_id: str) -> InstanceStatus:
        """Stop the instance at once; a running activation is aborted."""
        now = self.clock.now()

        def unit(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            record = self._require(txn, tenant_id, instance_id)
            if record.status in FINISHED_STATUSES:
                raise CannotTerminate(f"instance {instance_id!r} is already {record.status.value}")
            txn.update_instance(
                record.key, now, status=InstanceStatus.TERMINATED, wake_at=None, new_token=True
            )
            return record.key, InstanceStatus.TERMINATED

        return await self._admin(tenant_id, unit, stop=True)

    async def restart(self, tenant_id: str, instance_id: str) -> InstanceStatus:
        """Discard the journal and run again with the same id and params, on the current code."""
        now = self.clock.now()
        version = self._current_version(tenant_id) if self._current_version else None

        def unit(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            record = self._require(txn, tenant_id, instance_id)
            txn.delete_steps(record.key)
            txn.update_instance(
                record.key,
                now,
                status=InstanceStatus.QUEUED,
                output=None,
                error=None,
                wake_at=None,
                paused_at=None,
                new_token=True,
                priority=1,
                code_version=version or record.code_version,
            )
            return record.key, InstanceStatus.QUEUED

        return await self._admin(tenant_id, unit, stop=True)

    async def send_event(
        self, tenant_id: str, instance_id: str, event_type: str, payload: Any = None
    ) -> None:
        """Deliver an event: to the step waiting for its type, or into the FIFO buffer."""
        if not is_valid_id(event_type):
            raise InvalidEventType(
                f"invalid event type {event_type!r:.120}: at most {MAX_ID_LENGTH} characters "
                "of letters, digits, '_' and '-', not starting with '-'"
            )
        check_payload(payload, "event payload")
        now = self.clock.now()

        def unit(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            record = self._require(txn, tenant_id, instance_id)
            if record.status in FINISHED_STATUSES:
                raise InvalidInstanceState(
                    f"instance {instance_id!r} is {record.status.value}: it takes no events"
                )
            txn.push_event(record.key, event_type, payload, now)
            step = txn.find_waiting_event_step(record.key, event_type)
            if step is None:
                return record.key, record.status
            event = txn.pop_event(record.key, event_type)
            assert event is not None
            value = {"type": event_type, "payload": event[0], "timestamp": event[1]}
            txn.put_step(
                record.key, None, _with(step, StepStatus.COMPLETE, ended_at=now, output=value)
            )
            if record.status is InstanceStatus.WAITING:
                pending, wake = txn.pending_wake(record.key)
                if pending == 0:
                    txn.update_instance(
                        record.key, now, status=InstanceStatus.QUEUED, wake_at=None, priority=0
                    )
                    return record.key, InstanceStatus.QUEUED
                txn.update_instance(record.key, now, wake_at=wake)
            return record.key, record.status

        await self._admin(tenant_id, unit)
        crash_point("event.after_record", event_type)

    async def wait_for_status(
        self, tenant_id: str, instance_id: str, statuses: Iterable[InstanceStatus | str]
    ) -> InstanceStatus:
        """Return once the instance is in one of ``statuses`` (no timeout: wrap it in one)."""
        wanted = {InstanceStatus(s) for s in statuses}
        check_tenant_id(tenant_id)
        running_here = self._session_keys.get((tenant_id, instance_id))
        if running_here is not None and not wanted & _ACTIVE:
            # Its activation runs here: it is running (or waiting for a pause) until a
            # commit of ours says otherwise, and every such commit notifies: no read.
            key, reread = running_here, False
            seen = self.watches.watch(key).version
        else:
            changes = self.watches.changes
            record = await self._get_record(tenant_id, instance_id)
            key = record.key
            if record.status in wanted:
                return record.status
            seen = self.watches.watch(key).version
            reread = self.watches.changes != changes  # it may have changed while we read it

        async def read_status() -> InstanceStatus | None:
            return await self._read(lambda txn: txn.get_status(key))

        status = await self.watches.wait_for(key, wanted, read_status, seen=seen, reread=reread)
        if status is None:
            raise InstanceNotFound(tenant_id, instance_id)
        return status

    async def put_code_version(self, tenant_id: str, version: str, files: bytes) -> None:
        """Store a tenant's code version (content-addressed; idempotent)."""
        now = self.clock.now()
        await self.writer.submit(lambda txn: txn.put_code_version(tenant_id, version, files, now))

    async def get_code_version(self, tenant_id: str, version: str) -> bytes | None:
        """A stored code version."""
        return await self._read(lambda txn: txn.get_code_version(tenant_id, version))

    # ------------------------------------------------------------------ helpers

    def write_congested(self) -> bool:
        """The database is not keeping up with our writes (back-pressure applies)."""
        return self.writer.lag() > self.max_write_lag or self.writer.backlog > MAX_WRITE_BACKLOG

    def _admit_write(self) -> None:
        """Refuse a new API write up front (nothing queued) while writes lag."""
        if self.write_congested():
            self.stats.busy_refusals += 1
            raise StorageBusy(
                f"the database is not keeping up ({self.writer.backlog} writes queued, the "
                f"oldest for {self.writer.lag():.1f} s): nothing was done; try again",
                retry_after=min(30.0, max(1.0, self.writer.lag() / 2)),
            )

    async def _api_read(self, fn: Callable[[StoreTxn], T]) -> T:
        """A read for the API: refused (StorageBusy) rather than queued without bound
        when reads do not finish (a slow or unreachable database)."""
        with trio.move_on_after(self.max_write_lag) as waited:
            await self._api_readers.acquire()
        if waited.cancelled_caught:
            self.stats.busy_refusals += 1
            raise StorageBusy(
                f"the database is not keeping up: {_API_READERS} reads in flight for over "
                f"{self.max_write_lag:g} s; try again"
            )
        try:
            return await self._read(fn)
        finally:
            self._api_readers.release()

    async def _read(self, fn: Callable[[StoreTxn], T]) -> T:
        return await trio.to_thread.run_sync(self.store.read, fn)

    async def _get_record(self, tenant_id: str, instance_id: str) -> InstanceRecord:
        check_tenant_id(tenant_id)
        record = await self._api_read(lambda txn: txn.get_instance(tenant_id, instance_id))
        if record is None:
            raise InstanceNotFound(tenant_id, instance_id)
        return record

    @staticmethod
    def _require(txn: StoreTxn, tenant_id: str, instance_id: str) -> InstanceRecord:
        check_tenant_id(tenant_id)
        record = txn.get_instance(tenant_id, instance_id)
        if record is None:
            raise InstanceNotFound(tenant_id, instance_id)
        return record

    async def _admin(
        self,
        tenant_id: str,
        unit: Callable[[StoreTxn], tuple[int, InstanceStatus]],
        *,
        stop: bool = False,
    ) -> InstanceStatus:
        self._admit_write()

        def announced(txn: StoreTxn) -> tuple[int, InstanceStatus]:
            key, status = unit(txn)
            txn.announce(Notice.CHANGED, key)
            if stop:
                txn.announce(Notice.STOP, key)
            if status is InstanceStatus.QUEUED:
                txn.announce(Notice.QUEUED, tenant_id)
            return key, status

        key, status = await self.writer.submit(announced)
        if stop:
            await self.abort_activation(key, "stopped by the API")
        self.notify_change(key)
        if status is InstanceStatus.QUEUED:
            self.kick_dispatch(tenant_id)
        # No timer round here: these calls only remove timers or move them later (a round
        # at the old time finds nothing due); resume, which sets one, asks for its own.
        return status

    def stop_activation(self, key: int, reason: str) -> None:
        """Abort the instance's activation here, if it has one (its token is stale)."""
        if key in self._sessions and self._nursery is not None:
            self._nursery.start_soon(self.abort_activation, key, reason)

    async def abort_activation(self, key: int, reason: str) -> None:
        """Stop an activation whose token is stale (terminated, restarted, lease lost)."""
        session = self._sessions.get(key)
        if session is None or session.stopped:
            return
        session.stopped = True  # it writes nothing more (fencing would refuse it anyway)
        if session.channel is not None:
            try:
                await session.channel.abort(reason)
            except Exception as exc:  # a runner must not take its caller (the lease loop) down
                log.warning("aborting %s failed: %s", session.instance_id, exc)
        session.scope.cancel()

    # ------------------------------------------------------------------ dispatcher

    async def _run_instance(self, key: int, tenant_id: str) -> None:
        now = self.clock.now()

        owner = self.owner if self.store.shared else None
        lease = self.lease_seconds if self.store.shared else None

        def claim(txn: StoreTxn) -> tuple[InstanceRecord, list[StepRecord]] | None:
            record = txn.claim_queued(key, now, owner, lease)
            return None if record is None else (record, txn.load_steps(key))

        try:
            claimed = await self.writer.submit(claim)
        except BaseException as exc:
            self._claiming.discard(key)
            self.dispatcher.release(tenant_id)
            if isinstance(exc, StorageError) and self.store.shared:
                # Claimed or not, nobody knows: if it was, the lease loop gives it back.
                log.warning("claiming instance %s failed: %s", key, exc)
                return
            raise
        if claimed is None:
            self._claiming.discard(key)
            self.dispatcher.release(tenant_id)
            return
        record, steps = claimed
        await self._run_session(self._open_session(record), record, steps)

    def _sessions_did_change(self) -> None:
        """Wake ``drain``: an activation (or a reserved start) ended."""
        ended, self._sessions_changed = self._sessions_changed, trio.Event()
        ended.set()

    def _open_session(self, record: InstanceRecord) -> Session:
        """Register the activation of a claimed instance (its slot is already counted)."""
        key = record.key
        session = Session(
            key, record.tenant_id, record.instance_id, record.run_token, next(self._activation_ids)
        )
        self._sessions[key] = session
        self._session_keys[(record.tenant_id, record.instance_id)] = key
        self._claiming.discard(key)
        self.stats.activations += 1
        self.notify_change(key, InstanceStatus.RUNNING)
        return session

    async def _run_session(
        self, session: Session, record: InstanceRecord, steps: list[StepRecord]
    ) -> None:
        key, tenant_id = session.key, session.tenant_id
        try:
            await self._drive(session, record, steps)
        except StorageError as exc:
            if not self.store.shared:
                raise
            # The database failed under this activation (e.g. a COMMIT with an unknown
            # outcome): abandon it. The instance is still leased to us with no activation
            # behind it; the lease loop gives it back to the queue.
            log.warning(
                "activation of %s/%s abandoned: %s", record.tenant_id, record.instance_id, exc
            )
        finally:
            del self._sessions[key]
            self._session_keys.pop((session.tenant_id, session.instance_id), None)
            self._sessions_did_change()
            self.dispatcher.release(tenant_id)
            # Its last commit's status if that ended it (nothing ran since), else unknown:
            # a wait_for_status that relied on this activation running reads it again.
            self.notify_change(key, session.final_status)

    async def _drive(
        self, session: Session, record: InstanceRecord, steps: list[StepRecord]
    ) -> None:
        activation = Activate(
            activation_id=session.activation_id,
            instance_id=record.instance_id,
            workflow_name=record.workflow_name,
            payload=record.params,
            timestamp=record.created_at,
            journal=tuple(
                JournalEntry(
                    s.seq,
                    s.name,
                    s.count,
                    s.kind,
                    s.status,
                    s.attempts,
                    s.output,
                    s.error,
                    s.wake_at,
                )
                for s in steps
            ),
            max_steps=self.max_steps,
            now=self.clock.now(),
        )
        target = RunTarget(record.tenant_id, record.code_version, record.workflow_name)
        driver = ActivationDriver(self, session, self.max_steps)
        final = None
        crash: RunnerError | None = None
        try:
            async with self.runner.open_activation(target, activation) as channel:
                final = await driver.converse(channel)
        except LeaseLost:
            return  # terminated or restarted while running: the new owner decides
        except StorageError as exc:
            self._give_up_activation(session, exc)
            return
        except RunnerError as exc:
            crash = exc
        if session.stopped:
            return
        if crash is not None and driver.aborted:
            crash = None  # the runner died because we killed it over a step timeout
        if driver.silent:
            crash = RunnerError(
                "the activation stopped answering outside any step",
                error=ErrorInfo("SandboxCrashedError", "the sandbox stopped answering"),
            )
        if driver.progress:
            self._crashes.pop(session.key, None)  # a crash loop is crashes without progress
        try:
            if crash is not None and (
                crash.permanent or (_is_limit(crash) and not session.inflight)
            ):
                # Code that cannot load, or a limit broken outside any step (replaying the
                # same code breaks it again): the instance fails instead of looping.
                error = crash.error or ErrorInfo("RunnerError", str(crash), False)
                final = WorkflowFinished(session.activation_id, ok=False, error=error)
            if isinstance(final, WorkflowFinished):
                self._crashes.pop(session.key, None)
                await driver.finish(final)
            elif crash is not None and not session.inflight:
                await self._park_after_crash(session, driver, crash)
            else:
                if crash is not None:
                    await driver.fail_inflight(
                        crash.error or ErrorInfo("SandboxCrashedError", str(crash))
                    )
                await driver.suspend()
        except LeaseLost:
            return
        except StorageError as exc:
            self._give_up_activation(session, exc)

    def _give_up_activation(self, session: Session, exc: StorageError) -> None:
        """The database failed under an activation (e.g. a COMMIT with an unknown outcome).

        On a shared database the instance is left to the leases: this supervisor's
        renewal gives back what it holds without an activation, or another supervisor
        takes it once the lease expires; it resumes from its journal either way. On
        SQLite there is no one else to carry on: the error is raised.
        """
        if not self.store.shared:
            raise exc
        session.stopped = True
        log.warning("activation of %s/%s given up: %s", session.tenant_id, session.instance_id, exc)

    async def _park_after_crash(
        self, session: Session, driver: ActivationDriver, crash: RunnerError
    ) -> None:
        # A runner that fails between steps (or cannot start) is retried with a capped
        # exponential delay, so a crash loop costs little and never spins; after
        # MAX_CRASHES in a row without a step recorded, the instance fails.
        crashes = self._crashes.get(session.key, 0) + 1
        self._crashes[session.key] = crashes
        if crashes >= MAX_CRASHES:
            self._crashes.pop(session.key, None)
            error = crash.error or ErrorInfo("SandboxCrashedError", str(crash))
            message = f"{error.message} ({crashes} times in a row, outside any step)"
            await driver.finish(
                WorkflowFinished(
                    session.activation_id,
                    ok=False,
                    error=ErrorInfo(error.name, message, False, error.code),
                )
            )
            return
        now = self.clock.now()
        wake = now + min(60.0, 0.1 * 2 ** min(crashes - 1, 10))
        key, token = session.key, session.token
        message = f"activation failed ({crash}); retrying at +{wake - now:.1f}s"

        def unit(txn: StoreTxn) -> None:
            txn.update_instance(key, now, token=token, status=InstanceStatus.WAITING, wake_at=wake)
            txn.append_logs(key, [(now, "error", message)])

        await self.writer.submit(unit)
        self.notify_log(key)
        self.kick_timers(wake)


def _is_limit(crash: RunnerError) -> bool:
    return crash.error is not None and crash.error.name == "SandboxLimitError"


def _insert_unit(
    tenant_id: str,
    instance_id: str,
    code_version: str,
    params: Any,
    now: float,
    workflow_name: str = DEFAULT_WORKFLOW,
) -> Callable[[StoreTxn], int]:
    def unit(txn: StoreTxn) -> int:
        key = txn.insert_instance(tenant_id, instance_id, workflow_name, code_version, params, now)
        txn.announce(Notice.QUEUED, tenant_id)
        return key

    return unit


@asynccontextmanager
async def open_engine(store: Store, runner: Runner, **options: Any) -> AsyncIterator[Engine]:
    """Start an engine in a nursery of its own; stop it (and close nothing else) on exit.

    ``options`` are ``Engine``'s keyword arguments (clock, max_concurrency, ...).
    """
    engine = Engine(store, runner, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            yield engine
        finally:
            nursery.cancel_scope.cancel()
