"""``wait_for_status``: every status it waits for is seen, with as few reads as possible.

A commit that sets an instance's status tells its watchers the status it set, so a
waiter on an instance running here needs no read at all; a change whose status is not
known (a timer, another supervisor, an activation that stopped) makes it read again.
"""

from __future__ import annotations

import threading

import trio
import trio.testing

from sandbox.sdk import WorkflowEntrypoint

T = "acme"
WAIT = 20


def counting_reads(env) -> list[int]:
    """Count the store's reads from now on (the real store underneath)."""
    count = [0]
    read = env.store.read

    def counted(fn):
        count[0] += 1
        return read(fn)

    env.store.read = counted
    return count


async def test_waiting_for_an_instance_running_here_reads_nothing(manual_env):
    gate = threading.Event()

    class Gated(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("one", lambda: gate.wait(WAIT))
            return step.do("two", lambda: "done")

    manual_env.runner.register(T, Gated)
    engine = manual_env.engine
    iid, _ = await engine.create(T)
    reads = counting_reads(manual_env)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            results = []

            async def wait(statuses):
                results.append(await engine.wait_for_status(T, iid, statuses))

            nursery.start_soon(wait, ["complete"])
            nursery.start_soon(wait, ["complete", "errored"])
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert results == ["complete", "complete"]
    assert reads[0] == 0  # the finishing commit's own status woke them


async def test_a_waiter_sees_each_status_as_the_instance_sleeps_and_wakes(manual_env):
    gate = threading.Event()

    class Sleeper(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("one", lambda: gate.wait(WAIT))
            step.sleep("nap", "1 hour")
            return step.do("two", lambda: "done")

    manual_env.runner.register(T, Sleeper)
    engine, clock = manual_env.engine, manual_env.clock
    iid, _ = await engine.create(T)
    seen: dict[str, str] = {}

    async def wait(name, statuses):
        seen[name] = await engine.wait_for_status(T, iid, statuses)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            # all three start while it runs here, before any of these statuses exists
            nursery.start_soon(wait, "asleep", ["waiting"])
            nursery.start_soon(wait, "queued or done", ["queued", "complete"])
            nursery.start_soon(wait, "done", ["complete"])
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            while "asleep" not in seen:
                await trio.sleep(0.001)
            clock.advance(3600)  # the timer wakes it (queued), then it completes
    assert seen["asleep"] == "waiting"
    assert seen["queued or done"] in ("queued", "complete")
    assert seen["done"] == "complete"


async def test_a_waiter_on_an_instance_stopped_here_sees_it_terminated(manual_env):
    gate = threading.Event()

    class Stuck(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("one", lambda: gate.wait(WAIT))

    manual_env.runner.register(T, Stuck)
    engine = manual_env.engine
    iid, _ = await engine.create(T)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            got = []

            async def wait():
                got.append(await engine.wait_for_status(T, iid, ["terminated"]))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert await engine.terminate(T, iid) == "terminated"
    gate.set()
    assert got == ["terminated"]
