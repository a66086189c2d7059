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

from runtime import Engine, InProcessRunner, WallClock
from runtime._timers import WAKE_BATCH
from sandbox.sdk import WorkflowEntrypoint

T = "t"


class Nap(WorkflowEntrypoint):
    def run(self, event, step):
        step.sleep_until("nap", event.payload["until"])
        return step.do("after", lambda: event.instance_id)


@asynccontextmanager
async def wall_engine(store_location, **kwargs) -> AsyncIterator[Engine]:
    store = store_location.open()
    engine = Engine(store, InProcessRunner({T: Nap}), clock=WallClock(), **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def sleep_step(engine: Engine, iid: str):
    view = await engine.get(T, iid)
    return next(s for s in view.steps if s.kind.value == "sleep")


async def test_a_sleep_wakes_on_the_alarm(store_location):
    async with wall_engine(store_location) as engine:
        until = time.time() + 0.3
        iid, _ = await engine.create(T, params={"until": until})
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
        nap = await sleep_step(engine, iid)
        assert nap.status == "complete"
        assert nap.ended_at >= until  # never early


async def test_an_earlier_timer_rearms_the_alarm(store_location):
    """The alarm is set for a far timer; a nearer one set later still fires first."""
    async with wall_engine(store_location) as engine:
        far, _ = await engine.create(T, params={"until": time.time() + 3600})
        with trio.fail_after(30):
            await engine.wait_for_status(T, far, ["waiting"])
        near, _ = await engine.create(T, params={"until": time.time() + 0.2})
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, near, ["complete"]) == "complete"
        assert await engine.status(T, far) == "waiting"


async def test_a_burst_larger_than_a_round_all_wakes(store_location):
    """More instances due at once than one round resolves: the alarm rings again."""
    n = WAKE_BATCH + 100
    async with wall_engine(store_location, max_concurrency=50) as engine:
        until = time.time() + 3.0
        created = await engine.create_many(T, [(None, {"until": until}) for _ in range(n)])
        ids = [item[0] for item in created if isinstance(item, tuple)]
        assert len(ids) == n
        with trio.fail_after(120):
            while (await engine.count_by_status(T)).get("complete", 0) < n:
                await trio.sleep(0.05)
        for iid in ids[:: n // 10]:
            assert (await sleep_step(engine, iid)).ended_at >= until


async def test_a_timer_fires_while_the_event_loop_is_blocked(store_location):
    """The round runs in the commit thread: a trio loop stuck in synchronous work (here a
    blocking sleep of the trio thread) does not hold the timer back."""
    async with wall_engine(store_location) as engine:
        # The round that reads the next timer must have committed before the loop blocks.
        until = time.time() + 1.0
        iid, _ = await engine.create(T, params={"until": until})
        with trio.fail_after(30):
            await engine.wait_for_status(T, iid, ["waiting"])
        await trio.sleep(max(0.0, until - 0.5 - time.time()))
        time.sleep(max(0.0, until - time.time()) + 2.0)  # noqa: ASYNC251 - the point of the test
        unblocked = time.time()
        nap = await sleep_step(engine, iid)
        assert nap.status == "complete"
        assert until <= nap.ended_at < unblocked
        with trio.fail_after(30):
            assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
