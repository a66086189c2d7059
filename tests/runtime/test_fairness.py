"""Concurrency slots: bounded globally and per tenant, shared max-min fairly, woken first."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from runtime import Engine, InProcessRunner, InstanceStatus, MockClock, open_store
from sandbox.sdk import WorkflowEntrypoint

WAIT = 20


@asynccontextmanager
async def engine_on(
    tmp_path: Path,
    *,
    max_concurrency: int,
    tenant_limit: Callable[[str], int] | None = None,
    runner: InProcessRunner | None = None,
) -> AsyncIterator[tuple[Engine, InProcessRunner, MockClock]]:
    store = open_store(str(tmp_path / "engine.db"))
    clock = MockClock()
    runner = runner or InProcessRunner({})
    engine = Engine(
        store,
        runner,
        clock=clock,
        max_concurrency=max_concurrency,
        tenant_concurrency=tenant_limit,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine, runner, clock
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def gated(gate: threading.Semaphore, started: list[str]) -> type[WorkflowEntrypoint]:
    class Gated(WorkflowEntrypoint):
        def run(self, event, step):
            started.append(event.instance_id)
            step.do("work", lambda: gate.acquire(timeout=WAIT))
            return event.instance_id

    return Gated


async def counts(engine: Engine, tenant: str) -> dict[str, int]:
    return await engine.count_by_status(tenant)


async def until(predicate: Callable[[], object]) -> None:
    with trio.fail_after(WAIT):
        while not predicate():
            await trio.sleep(0.005)


async def test_a_flooding_tenant_cannot_starve_another(tmp_path):
    gate = threading.Semaphore(0)
    started: list[str] = []
    async with engine_on(tmp_path, max_concurrency=2) as (engine, runner, _):
        runner.register("flood", gated(gate, started))
        runner.register("small", gated(gate, started))
        await engine.create_many("flood", [(f"f{i}", None) for i in range(60)])
        await until(lambda: len(started) == 2)
        await engine.create("small", instance_id="s1")
        assert await engine.status("small", "s1") is InstanceStatus.QUEUED
        gate.release()  # one flood instance finishes: its slot goes to the other tenant
        await until(lambda: "s1" in started)
        flood = await counts(engine, "flood")
        assert flood.get("queued", 0) >= 55, flood
        assert started[2] == "s1"  # the third slot ever granted
        for _ in range(70):
            gate.release()
        with trio.fail_after(WAIT):
            await engine.wait_for_status("small", "s1", ["complete"])


async def test_slots_alternate_between_tenants_with_queued_work(tmp_path):
    gate = threading.Semaphore(0)
    started: list[str] = []
    async with engine_on(tmp_path, max_concurrency=1) as (engine, runner, _):
        for tenant in ("a", "b"):
            runner.register(tenant, gated(gate, started))
        for i in range(5):
            await engine.create("a", instance_id=f"a{i}")
        await until(lambda: started == ["a0"])
        for i in range(3):
            await engine.create("b", instance_id=f"b{i}")
        for expected in range(2, 8):
            gate.release()
            await until(lambda n=expected: len(started) >= n)
        assert started[:7] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3"]
        for _ in range(10):
            gate.release()


class WarmRunner(InProcessRunner):
    """An in-process runner that says which tenants are warm, as a sandbox pool does."""

    def __init__(self) -> None:
        super().__init__({})
        self.warm: set[str] = set()

    def warm_tenants(self) -> set[str]:
        return self.warm


async def turns_taken(tmp_path: Path, queues: dict[str, int], warm: set[str]) -> list[str]:
    """The order in which queued instances of ``queues`` (tenant -> how many, created in
    one batch each while ``z0`` holds the only slot) start, with ``warm`` tenants warm."""
    gate = threading.Semaphore(0)
    started: list[str] = []
    runner = WarmRunner()
    async with engine_on(tmp_path, max_concurrency=1, runner=runner) as (engine, _, _):
        for tenant in ("z", *queues):
            runner.register(tenant, gated(gate, started))
        await engine.create("z", instance_id="z0")
        await until(lambda: started == ["z0"])
        runner.warm = warm
        for tenant, count in queues.items():
            await engine.create_many(tenant, [(f"{tenant}{i}", None) for i in range(count)])
        total = 1 + sum(queues.values())
        for n in range(2, total + 1):
            gate.release()
            await until(lambda n=n: len(started) >= n)
        gate.release()
    return started


async def test_a_warm_tenant_takes_a_quantum_of_turns_in_a_row(tmp_path):
    """With more tenants queued than sandboxes stay warm, one instance per turn costs a
    cold start per instance. A tenant whose sandbox is warm keeps its place for up to
    WARM_QUANTUM turns; then the next tenant's turn comes, as round-robin."""
    from runtime._dispatcher import WARM_QUANTUM

    started = await turns_taken(tmp_path, {"a": WARM_QUANTUM + 2, "b": 2}, warm={"a", "b"})
    a = [f"a{i}" for i in range(WARM_QUANTUM + 2)]
    # a's quantum, then b (never served, as long ago as a's place), then a's rest
    assert started == ["z0", *a[:WARM_QUANTUM], "b0", "b1", *a[WARM_QUANTUM:]]


async def test_cold_tenants_alternate_turns_as_round_robin(tmp_path):
    """The same queues with no warm sandbox (or a runner that warms nothing): one turn
    each, in turn."""
    started = await turns_taken(tmp_path, {"a": 3, "b": 3}, warm=set())
    assert started == ["z0", "a0", "b0", "a1", "b1", "a2", "b2"]


async def test_a_tenant_never_holds_more_than_its_own_limit(tmp_path):
    gate = threading.Semaphore(0)
    started: list[str] = []
    limits = {"capped": 2}
    async with engine_on(
        tmp_path, max_concurrency=10, tenant_limit=lambda t: limits.get(t, 10)
    ) as (engine, runner, _):
        runner.register("capped", gated(gate, started))
        runner.register("free", gated(gate, started))
        await engine.create_many("capped", [(f"c{i}", None) for i in range(6)])
        await engine.create_many("free", [(f"x{i}", None) for i in range(4)])
        await until(lambda: len(started) == 6)
        await trio.sleep(0.05)  # nothing more may start: capped is at its limit
        assert len([s for s in started if s.startswith("c")]) == 2
        assert (await counts(engine, "capped")).get("running") == 2
        for _ in range(20):
            gate.release()
        with trio.fail_after(WAIT):
            for i in range(6):
                await engine.wait_for_status("capped", f"c{i}", ["complete"])


async def test_waiting_instances_hold_no_slot_and_go_before_new_ones(tmp_path):
    gate = threading.Semaphore(0)
    order: list[str] = []

    class Sleeper(WorkflowEntrypoint):
        def run(self, event, step):
            order.append(event.instance_id)
            step.sleep("nap", "1 hour")
            step.do("after", lambda: gate.acquire(timeout=WAIT))
            return "woke"

    async with engine_on(tmp_path, max_concurrency=1) as (engine, runner, clock):
        runner.register("sleepy", Sleeper)
        runner.register("busy", gated(gate, order))
        await engine.create("sleepy", instance_id="w")
        with trio.fail_after(WAIT):
            await engine.wait_for_status("sleepy", "w", ["waiting"])
        # a sleeping instance holds no slot: the next one runs
        for i in range(3):
            await engine.create("busy", instance_id=f"n{i}")
        await until(lambda: order == ["w", "n0"])
        clock.advance(3600)  # w wakes while n0 runs: it is queued, ahead of n1 and n2
        with trio.fail_after(WAIT):
            await engine.wait_for_status("sleepy", "w", ["queued"])
        gate.release()
        await until(lambda: len(order) >= 3)
        assert order[2] == "w", order
        for _ in range(5):
            gate.release()
