"""A restart with many overdue timers catches up within the concurrency bound."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio
import trio.lowlevel

from runtime import Engine, InProcessRunner, MockClock, open_store
from sandbox.sdk import WorkflowEntrypoint

N = 60
BOUND = 3


async def test_overdue_timers_after_a_restart_wake_without_a_herd(tmp_path: Path):
    lock = threading.Lock()
    running = [0]
    peak = [0]

    class Nap(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")

            def busy():
                with lock:
                    running[0] += 1
                    peak[0] = max(peak[0], running[0])
                time.sleep(0.002)
                with lock:
                    running[0] -= 1
                return event.instance_id

            return step.do("after", busy)

    db = tmp_path / "engine.db"
    clock = MockClock()
    store = open_store(str(db))
    engine = Engine(store, InProcessRunner({"t": Nap}), clock=clock, max_concurrency=BOUND)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        ids = [iid for iid, _ in [await engine.create("t") for _ in range(N)]]
        with trio.fail_after(30):
            while (await engine.count_by_status("t")).get("waiting", 0) < N:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # the supervisor stops while all of them sleep
    store.close()

    clock.advance(3 * 3600)  # ... and comes back long after every timer was due
    store = open_store(str(db))
    engine = Engine(store, InProcessRunner({"t": Nap}), clock=clock, max_concurrency=BOUND)
    seen_running = [0]
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)

        async def watch() -> None:
            while True:
                seen_running[0] = max(seen_running[0], engine.running_count)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(watch)
        with trio.fail_after(60):
            for iid in ids:
                await engine.wait_for_status("t", iid, ["complete"])
        nursery.cancel_scope.cancel()
    store.close()
    assert peak[0] <= BOUND
    assert seen_running[0] <= BOUND
    assert peak[0] >= 1
