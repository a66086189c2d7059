"""Draining: a stopping supervisor parks running instances at their next step boundary."""

from __future__ import annotations

import threading

import trio

from runtime import InstanceStatus
from sandbox.sdk import WorkflowEntrypoint


async def test_drain_parks_running_instances_at_a_step_boundary(env):
    release = threading.Event()
    ran: list[str] = []

    class Slow(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: ran.append("first") or release.wait(10))
            step.do("second", lambda: ran.append("second"))
            return "done"

    env.runner.register("acme", Slow)
    iid, _ = await env.engine.create("acme")
    with trio.fail_after(10):
        while "first" not in ran:
            await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            results: list[bool] = []

            async def drain() -> None:
                results.append(await env.engine.drain(grace=10))

            nursery.start_soon(drain)
            await trio.sleep(0.05)
            release.set()
        assert results == [True]
    # the first step is durable, the second never started, the instance waits in the queue
    view = await env.engine.get("acme", iid)
    assert view.record.status is InstanceStatus.QUEUED
    assert [(s.name, s.status.value) for s in view.steps] == [("first", "complete")]
    assert ran == ["first"]
    # nothing new starts while draining
    other, _ = await env.engine.create("acme")
    await trio.sleep(0.05)
    assert await env.engine.status("acme", other) is InstanceStatus.QUEUED
