"""A create that finds a free slot claims its instance in the same commit and starts it.

One commit instead of three (insert, the dispatcher's read, the claim): what lets a
sequential workflow start in one fsync. These tests pin down what must still hold: the
instance is claimed exactly once, a caller that goes away mid-create strands nothing,
a lease renewal sharing that commit does not mistake it for an orphan, and a new
instance never jumps ahead of queued ones. (A lease renewal sharing the create's commit:
tests/cluster/test_leases.py.)
"""

from __future__ import annotations

import threading

import trio

from runtime import InstanceStatus
from sandbox.sdk import WorkflowEntrypoint

T = "acme"
WAIT = 20


def gated(gate: threading.Event, started: list[str]) -> type[WorkflowEntrypoint]:
    class Gated(WorkflowEntrypoint):
        def run(self, event, step):
            started.append(event.instance_id)
            step.do("work", lambda: gate.wait(WAIT))
            return event.instance_id

    return Gated


async def until(predicate) -> None:
    with trio.fail_after(WAIT):
        while not predicate():
            await trio.sleep(0.002)


async def test_a_create_with_a_free_slot_is_running_when_it_returns(manual_env):
    gate, started = threading.Event(), []
    manual_env.runner.register(T, gated(gate, started))
    engine = manual_env.engine
    iid, status = await engine.create(T, instance_id="at-once")
    assert status is InstanceStatus.QUEUED  # the status it was accepted with (SPEC)
    # Checked before anything else can run: the create itself took the slot; the
    # dispatcher was never asked (through the queue it would hold no slot yet).
    assert engine.running_count == 1
    assert T not in engine.dispatcher.queued_tenants
    record = (await engine.get(T, iid)).record
    assert record.status is InstanceStatus.RUNNING
    assert record.run_token == 1
    await until(lambda: started == ["at-once"])
    gate.set()
    with trio.fail_after(WAIT):
        assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
    assert (await engine.get(T, iid)).record.run_token == 1  # never claimed again
    assert engine.stats.activations == 1


async def test_a_create_whose_caller_is_cancelled_still_runs_its_instance(manual_env):
    gate, started = threading.Event(), []
    gate.set()
    manual_env.runner.register(T, gated(gate, started))
    engine = manual_env.engine
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled at its first checkpoint: waiting for the commit
        await engine.create(T, instance_id="orphan")
    assert scope.cancelled_caught
    await engine.writer.submit(lambda txn: None)  # units commit in order: it is in
    with trio.fail_after(WAIT):
        assert await engine.wait_for_status(T, "orphan", ["complete"]) == "complete"
    assert started == ["orphan"]
    assert engine.running_count == 0


async def test_a_new_instance_waits_behind_queued_ones(manual_env):
    gate, started = threading.Event(), []
    engine = manual_env.engine
    engine.max_concurrency = 1
    manual_env.runner.register(T, gated(gate, started))
    await engine.create(T, instance_id="a")
    await until(lambda: started == ["a"])
    await engine.create(T, instance_id="b")  # no slot: queued
    gate.set()
    await until(lambda: "b" in started)
    # a slot is free again as soon as b ends; c, created meanwhile or after, runs last
    await engine.create(T, instance_id="c")
    with trio.fail_after(WAIT):
        for iid in "abc":
            await engine.wait_for_status(T, iid, ["complete"])
    assert started == ["a", "b", "c"]
