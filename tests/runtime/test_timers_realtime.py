"""Durable timers in real time: rounds run on the commit thread's alarm, not in trio.

Real SQLite files or PostgreSQL schemas (``store_location``), the wall clock, short sleeps.
No test asserts how late a timer fires (``make bench`` measures that); they assert what
fires, in which order, and that a blocked event loop does not hold a timer back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from runtime import Engine, InProcessRunner, WallClock, open_engine
from runtime._timers import WAKE_BATCH
from sandbox.sdk import WorkflowEntrypoint

T = "t"


class Nap(WorkflowEntrypoint):
    """A relative sleep: sleep_until a moment that passed before the instance got to
    run (a loaded machine) would be an error, not a late timer."""

    def run(self, event, step):
        step.sleep("nap", event.payload["seconds"])
        return step.do("after", lambda: event.instance_id)


@asynccontextmanager
async def wall_engine(store_location, workflow=Nap, **options) -> AsyncIterator[Engine]:
    store = store_location.open()
    try:
        async with open_engine(
            store, InProcessRunner({T: workflow}), clock=WallClock(), **options
        ) as engine:
            yield engine
    finally:
        store.close()


async def sleep_step(engine: Engine, iid: str):
    view = await engine.get(T, iid)
    return next(s for s in view.steps if s.kind.value == "sleep")


async def test_a_sleep_wakes_on_the_alarm(store_location):
    async with wall_engine(store_location) as engine:
        iid, _ = await engine.create(T, params={"seconds": 0.3})
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
        nap = await sleep_step(engine, iid)
        assert nap.status == "complete"
        assert nap.ended_at >= nap.wake_at  # never early


async def test_an_earlier_timer_rearms_the_alarm(store_location):
    """The alarm is set for a far timer; a nearer one set later still fires first."""
    async with wall_engine(store_location) as engine:
        far, _ = await engine.create(T, params={"seconds": 3600})
        with trio.fail_after(30):
            await engine.wait_for_status(T, far, ["waiting"])
        near, _ = await engine.create(T, params={"seconds": 0.2})
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, near, ["complete"]) == "complete"
        assert await engine.status(T, far) == "waiting"


async def test_a_burst_larger_than_a_round_all_wakes(store_location):
    """More instances due at once than one round resolves: the alarm rings again.

    They sleep for an hour; once all sleep, their timers are moved (as ``resume`` moves
    them) to one moment a second away, so the burst does not depend on how fast they
    got to sleep on a loaded machine."""
    n = WAKE_BATCH + 100

    class LongNap(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")
            return step.do("after", lambda: event.instance_id)

    async with wall_engine(store_location, LongNap, max_concurrency=50) as engine:
        created = await engine.create_many(T, [(None, None) for _ in range(n)])
        ids = [item[0] for item in created if isinstance(item, tuple)]
        assert len(ids) == n
        with trio.fail_after(90):
            while (await engine.count_by_status(T)).get("waiting", 0) < n:
                await trio.sleep(0.05)
        keys = [(await engine.get(T, iid)).record.key for iid in ids]
        due = time.time() + 1.0

        def move_timers(txn):
            for key in keys:
                record = txn.get_instance_by_key(key)
                txn.shift_step_wakes(key, due - record.wake_at)
                txn.update_instance(key, record.updated_at, wake_at=due)

        await engine.writer.submit(move_timers)
        engine.kick_timers(due)
        with trio.move_on_after(90):
            while (await engine.count_by_status(T)).get("complete", 0) < n:
                await trio.sleep(0.05)
        assert await engine.count_by_status(T) == {"complete": n}
        for iid in ids[:: n // 10]:
            nap = await sleep_step(engine, iid)
            assert due <= nap.ended_at


async def test_a_timer_fires_while_the_event_loop_is_blocked(store_location):
    """The round runs in the commit thread: a trio loop stuck in synchronous work (here a
    blocking sleep of the trio thread) does not hold the timer back."""
    async with wall_engine(store_location) as engine:
        iid, _ = await engine.create(T, params={"seconds": 1.0})
        with trio.fail_after(30):
            await engine.wait_for_status(T, iid, ["waiting"])
        due = (await sleep_step(engine, iid)).wake_at
        await trio.sleep(max(0.0, due - 0.5 - time.time()))
        time.sleep(max(0.0, due - time.time()) + 2.0)  # noqa: ASYNC251 - the point of the test
        unblocked = time.time()
        nap = await sleep_step(engine, iid)
        assert nap.status == "complete"
        assert due <= nap.ended_at < unblocked
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
