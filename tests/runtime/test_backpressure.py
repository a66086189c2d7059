"""Back-pressure on the embedded SQLite store: a writer lock held outside the supervisor.

(PostgreSQL, through the HTTP API: tests/cluster/test_backpressure.py.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from runtime import InProcessRunner, WallClock, open_engine, open_store
from runtime.errors import StorageBusy
from sandbox.sdk import WorkflowEntrypoint

T = "t"


class One(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: event.payload)


async def test_a_locked_database_refuses_new_writes_and_keeps_the_accepted(tmp_path: Path):
    path = tmp_path / "engine.db"
    store = open_store(str(path))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        runner = InProcessRunner({T: One})
        async with (
            open_engine(store, runner, clock=WallClock(), max_write_lag=0.3) as engine,
            trio.open_nursery() as nursery,
        ):
            other.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
            accepted: list[str] = []

            async def create() -> None:
                accepted.append((await engine.create(T, params=1))[0])

            nursery.start_soon(create)
            with trio.fail_after(20):
                while not engine.write_congested():
                    await trio.sleep(0.02)
            with pytest.raises(StorageBusy) as refused:
                await engine.create(T, params=2)
            assert refused.value.code == "storage.busy"
            assert refused.value.retry_after >= 1
            other.execute("ROLLBACK")
            with trio.fail_after(20):
                while not accepted:
                    await trio.sleep(0.02)
                assert await engine.wait_for_status(T, accepted[0], ["complete"]) == "complete"
            assert await engine.count_by_status(T) == {"complete": 1}
            iid, _ = await engine.create(T, params=3)  # and it takes writes again
            with trio.fail_after(20):
                assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
    finally:
        other.close()
        store.close()
