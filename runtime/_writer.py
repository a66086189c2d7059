"""Group commit: every write queued while a commit is in flight shares the next one.

One task owns the store's writer. Callers hand it *units* (functions of a
``StoreTxn``); it takes everything queued, runs it in one transaction on a worker
thread, commits once (one fsync), and wakes each caller with its own outcome. Under
load a commit carries hundreds of instances' step results; alone, a unit waits for
exactly one commit, so sequential latency stays at one fsync.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import trio

from ._storage import Outcome, Store, StoreTxn, Unit

__all__ = ["GroupCommitWriter"]

T = TypeVar("T")
_MAX_UNITS_PER_COMMIT: Final = 2000


class _Slot:
    """Where one waiting caller receives its unit's outcome."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome = Outcome()


class GroupCommitWriter:
    """Serializes all writes through one task and groups them into shared commits."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[Unit, _Slot | Callable[[], None] | None]] = []
        self._wakeup = trio.Event()
        self._committing = False
        self.commits = 0
        self.units = 0

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being committed."""
        return not self._queue and not self._committing

    async def submit(self, unit: Callable[[StoreTxn], T]) -> T:
        """Run ``unit`` in the next commit and return its value (or raise its error)."""
        slot = _Slot()
        self._queue.append((unit, slot))
        self._wakeup.set()
        await slot.done.wait()
        if slot.outcome.error is not None:
            raise slot.outcome.error
        value: T = slot.outcome.value
        return value

    def submit_nowait(self, unit: Unit, on_commit: Callable[[], None] | None = None) -> None:
        """Queue ``unit`` without waiting for its commit (ordered with every other unit).

        ``on_commit`` runs (in the writer task) once the unit is durable.
        """
        self._queue.append((unit, on_commit))
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: runs until cancelled, finishing any commit it has started."""
        thread = _CommitThread(self._store)
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
                try:
                    # Shielded: a commit that started must finish and wake its callers.
                    with trio.CancelScope(shield=True):
                        outcomes = await thread.commit([u for u, _ in batch])
                finally:
                    self._committing = False
                self.commits += 1
                self.units += len(batch)
                for (_, slot), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(slot, _Slot):
                        slot.outcome = outcome
                        slot.done.set()
                    elif slot is not None and outcome.error is None:
                        slot()
        finally:
            thread.stop()


class _CommitThread:
    """One long-lived thread that owns the store's writer connection.

    Cheaper per commit than ``trio.to_thread`` (no thread-cache handoff), and every
    write happens on the same OS thread, as SQLite prefers.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._jobs: queue.SimpleQueue[tuple[list[Unit], Callable[[list[Outcome]], None]] | None]
        self._jobs = queue.SimpleQueue()
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

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            units, report = job
            try:
                outcomes = self._store.write(units)
            except Exception as exc:  # the whole commit failed: every unit gets the error
                outcomes = [Outcome(error=exc) for _ in units]
            try:
                report(outcomes)
            except trio.RunFinishedError:
                return

    def stop(self) -> None:
        self._jobs.put(None)
