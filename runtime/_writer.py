"""Group commit: every write queued while a commit is in flight shares the next one.

One task owns the store's writer. Callers hand it *units* (functions of a
``StoreTxn``); it takes everything queued, runs it in one transaction on a worker
thread, commits once (one fsync), and wakes each caller with its own outcome. Under
load a commit carries hundreds of instances' step results; alone, a unit waits for
exactly one commit, so sequential latency stays at one fsync.

The commit thread also keeps an **alarm** (``set_alarm`` / ``arm``): a unit it runs by
itself at a wall-clock time, without a trip through the event loop. Durable timers use
it, so a timer resolves within a commit of its time however busy trio is with other
work (cold starts, HTTP): the event loop only learns afterwards what woke.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import trio

from ._storage import Outcome, Store, StoreTxn, Unit

__all__ = ["AlarmUnit", "GroupCommitWriter"]

T = TypeVar("T")
_MAX_UNITS_PER_COMMIT: Final = 2000

#: The alarm's unit: does its work and returns (a value for the report, the next time
#: the alarm should ring or None).
AlarmUnit = Callable[[StoreTxn], tuple[Any, float | None]]
AlarmReport = Callable[[Outcome], None]


class _Slot:
    """Where one waiting caller receives its unit's outcome."""

    __slots__ = ("done", "outcome", "then")

    def __init__(self, then: Callable[[Outcome], None] | None = None) -> None:
        self.done = trio.Event()
        self.outcome = Outcome()
        self.then = then


class GroupCommitWriter:
    """Serializes all writes through one task and groups them into shared commits."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[Unit, _Slot | Callable[[], None] | None]] = []
        self._queued_since: float | None = None  # when the oldest queued unit came
        self._commit_since: float | None = None  # when the commit in flight started
        self._wakeup = trio.Event()
        self._committing = False
        self._alarm = _Alarm()
        self.commits = 0
        self.units = 0

    def set_alarm(self, unit: AlarmUnit, report: AlarmReport) -> None:
        """Install the alarm (before ``run``): ``unit`` runs in the commit thread each time
        the alarm rings; ``report`` gets its outcome in the trio thread."""
        self._alarm.unit, self._alarm.report = unit, report

    def arm(self, at: float) -> None:
        """Ring the alarm at wall time ``at`` (epoch seconds) or earlier if already set so."""
        self._alarm.arm(at)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being committed."""
        return not self._queue and not self._committing

    @property
    def backlog(self) -> int:
        """Units queued for a commit."""
        return len(self._queue)

    def lag(self) -> float:
        """How long (seconds) the oldest pending write has waited: 0 when keeping up."""
        now = time.monotonic()
        since = [t for t in (self._queued_since, self._commit_since) if t is not None]
        return now - min(since) if since else 0.0

    async def submit(
        self, unit: Callable[[StoreTxn], T], then: Callable[[Outcome], None] | None = None
    ) -> T:
        """Run ``unit`` in the next commit and return its value (or raise its error).

        ``then`` gets the unit's outcome in the writer task as soon as the commit ends,
        before any waiting task runs and whether or not the caller is still waiting
        (cancelled): for bookkeeping that must follow the commit without a gap.
        """
        slot = _Slot(then)
        self._enqueue(unit, slot)
        await slot.done.wait()
        if slot.outcome.error is not None:
            raise slot.outcome.error
        value: T = slot.outcome.value
        return value

    async def submit_all(self, units: list[Unit]) -> list[Outcome]:
        """Queue ``units`` in this order (the same commit when they fit) and return each
        one's outcome; one failing does not undo the others."""
        slots = [_Slot() for _ in units]
        for unit, slot in zip(units, slots, strict=True):
            self._enqueue(unit, slot)
        for slot in slots:
            await slot.done.wait()
        return [slot.outcome for slot in slots]

    def submit_nowait(self, unit: Unit, on_commit: Callable[[], None] | None = None) -> None:
        """Queue ``unit`` without waiting for its commit (ordered with every other unit).

        ``on_commit`` runs (in the writer task) once the unit is durable.
        """
        self._enqueue(unit, on_commit)

    def _enqueue(self, unit: Unit, slot: _Slot | Callable[[], None] | None) -> None:
        if not self._queue:
            self._queued_since = time.monotonic()
        self._queue.append((unit, slot))
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: runs until cancelled, finishing any commit it has started."""
        thread = _CommitThread(self._store, self._alarm, trio.lowlevel.current_trio_token())
        try:
            task_status.started()
            while True:
                if not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    continue
                batch = self._queue[:_MAX_UNITS_PER_COMMIT]
                del self._queue[:_MAX_UNITS_PER_COMMIT]
                self._committing = True
                self._commit_since = self._queued_since
                self._queued_since = time.monotonic() if self._queue else None
                try:
                    # Shielded: a commit that started must finish and wake its callers.
                    with trio.CancelScope(shield=True):
                        outcomes = await thread.commit([u for u, _ in batch])
                finally:
                    self._committing = False
                    self._commit_since = None
                self.commits += 1
                self.units += len(batch)
                for (_, slot), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(slot, _Slot):
                        slot.outcome = outcome
                        slot.done.set()
                        if slot.then is not None:
                            slot.then(outcome)
                    elif slot is not None and outcome.error is None:
                        slot()
        finally:
            thread.stop()


class _Alarm:
    """When the commit thread should run the alarm unit next (shared with trio's thread)."""

    def __init__(self) -> None:
        self.unit: AlarmUnit | None = None
        self.report: AlarmReport | None = None
        self._lock = threading.Lock()
        self._at: float | None = None
        self._ringing = False
        self._asked: float | None = None  # arm() calls while ringing: kept for after
        self._poke: Callable[[], None] = lambda: None

    def arm(self, at: float) -> None:
        with self._lock:
            if self._ringing:
                self._asked = at if self._asked is None else min(self._asked, at)
                return
            if self._at is not None and self._at <= at:
                return
            self._at = at
        self._poke()  # the thread may be asleep until a later time: make it look again

    def seconds_left(self) -> float | None:
        with self._lock:
            return None if self._at is None or self.unit is None else self._at - time.time()

    def take_if_due(self) -> AlarmUnit | None:
        with self._lock:
            if self.unit is None or self._at is None or self._at > time.time():
                return None
            self._at, self._ringing = None, True
            return self.unit

    def rang(self, next_at: float | None) -> None:
        with self._lock:
            self._ringing = False
            wanted = [t for t in (next_at, self._asked) if t is not None]
            self._asked = None
            if wanted:
                self._at = min(wanted) if self._at is None else min(self._at, *wanted)


_Job = tuple[list[Unit], Callable[[list[Outcome]], None] | None]
_POKE: Final[_Job] = ([], None)  #: no units: only look at the alarm again


class _CommitThread:
    """One long-lived thread that owns the store's writer connection.

    Cheaper per commit than ``trio.to_thread`` (no thread-cache handoff), and every
    write happens on the same OS thread, as SQLite prefers. Between jobs it sleeps
    until the alarm's time at most.
    """

    def __init__(self, store: Store, alarm: _Alarm, token: trio.lowlevel.TrioToken) -> None:
        self._store = store
        self._alarm = alarm
        self._token = token
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        alarm._poke = lambda: self._jobs.put(_POKE)
        self._thread = threading.Thread(target=self._serve, name="tenantflow-writer", daemon=True)
        self._thread.start()

    async def commit(self, units: list[Unit]) -> list[Outcome]:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[list[Outcome]] = []

        def report(outcomes: list[Outcome]) -> None:
            result.append(outcomes)
            token.run_sync_soon(done.set)

        self._jobs.put((units, report))
        await done.wait()
        return result[0]

    def _next_job(self) -> _Job | None:
        left = self._alarm.seconds_left()
        try:
            if left is None:
                return self._jobs.get()
            return self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return _POKE

    def _serve(self) -> None:
        while (job := self._next_job()) is not None:
            units, report = job
            alarm = self._alarm.take_if_due()
            if alarm is not None:
                units = [alarm, *units]
            if not units:
                continue
            try:
                outcomes = self._store.write(units)
            except Exception as exc:  # the whole commit failed: every unit gets the error
                outcomes = [Outcome(error=exc) for _ in units]
            try:
                if alarm is not None:
                    self._rang(outcomes.pop(0))
                if report is not None:
                    report(outcomes)
            except trio.RunFinishedError:
                return

    def _rang(self, outcome: Outcome) -> None:
        # Re-armed here, before the next job commits: a timer that job sets is announced
        # by arm() after it, so min() keeps the earlier of the two.
        next_at = None if outcome.error is not None else outcome.value[1]
        self._alarm.rang(next_at)
        report = self._alarm.report
        if report is not None:
            self._token.run_sync_soon(report, outcome)

    def stop(self) -> None:
        self._jobs.put(None)
