"""Benchmarks of the durable engine alone: real SQLite file, WallClock, in-process runner.

Every engine here is the real one (``open_engine`` on ``open_store`` of a file in the
benchmark's fresh directory: WAL, ``synchronous=FULL``, group commit) driven by the
``InProcessRunner``, so what is measured is the engine's durable path without the cost
of a sandbox process.

How completion is observed: the workflows count their ``run()`` returns on a
``ReturnCounter`` (a trio wake-up, no store access), and only then does the benchmark
call ``Engine.wait_for_status`` to see the final commit land. Calling
``wait_for_status`` from the start would put an observer in the measurement: it re-reads
the status (a SELECT on a worker thread) after every change the engine announces, which
added 0.2-0.3 ms to the p50 of every step here.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio

from runtime import (
    FINISHED_STATUSES,
    Engine,
    InProcessRunner,
    InstanceStatus,
    WallClock,
    open_engine,
    open_store,
)
from sandbox.sdk import WorkflowEntrypoint

from ._core import BenchContext, Direction, Measurement, benchmark, percentile

__all__ = [
    "CreationsRound",
    "EngineOpener",
    "ReturnCounter",
    "StepsRound",
    "ThreeStepRun",
    "blocking_workflow",
    "concurrent_steps_per_second",
    "concurrent_steps_round",
    "create_concurrently",
    "creations_per_second_inprocess",
    "creations_round",
    "run_creators",
    "run_engine",
    "running_engine",
    "sequential_step_overhead",
    "sqlite_commit_floor",
    "three_step_concurrent",
    "three_step_sequential",
]

T = TypeVar("T")
TENANT: Final = "bench"
#: A benchmark body that has not finished after this long is broken, not slow.
TIME_LIMIT_SECONDS: Final = 600.0
ROUNDS: Final = 3

WorkflowFactory = Callable[[], Any]


class EngineOpener(Protocol):
    """Opens a running engine with ``workflow`` for tenant ``bench``: the workloads below
    take one, so the same workload runs on SQLite (``functools.partial(running_engine,
    workdir)``) and on PostgreSQL (``postgres_bench.running_pg_engine``)."""

    def __call__(
        self, workflow: WorkflowFactory, *, max_concurrency: int = ...
    ) -> AbstractAsyncContextManager[Engine]: ...


class BenchError(Exception):
    """The engine did something other than what the benchmark expects (a wrong result)."""


# ---------------------------------------------------------------------- harness


@asynccontextmanager
async def running_engine(
    workdir: Path, workflow: WorkflowFactory, *, max_concurrency: int = 1000
) -> AsyncIterator[Engine]:
    """A real engine on ``workdir/tenantflow.db`` running ``workflow`` for tenant ``bench``."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    store = open_store(str(workdir / "tenantflow.db"))
    runner = InProcessRunner({TENANT: workflow})
    try:
        async with open_engine(
            store, runner, clock=WallClock(), max_concurrency=max_concurrency
        ) as engine:
            yield engine
    finally:
        with trio.CancelScope(shield=True):
            await runner.aclose()
        store.close()


def run_engine(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run`` an async benchmark body, bounded by ``TIME_LIMIT_SECONDS``."""

    async def bounded() -> T:
        with trio.fail_after(TIME_LIMIT_SECONDS):
            return await fn()

    return trio.run(bounded)


class ReturnCounter:
    """Counts ``run()`` returns made on workflow threads; trio code waits for a count.

    Create it inside ``trio.run``. ``bump`` is safe from any thread; it costs one
    ``run_sync_soon`` and never touches the store.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._count = 0
        self._changed = trio.Event()

    def bump(self) -> None:
        try:
            self._token.run_sync_soon(self._bump)
        except trio.RunFinishedError:
            pass

    def _bump(self) -> None:
        self._count += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, count: int) -> None:
        """Return once ``count`` runs have returned (or raised) in all."""
        while self._count < count:
            await self._changed.wait()


class _Counted(WorkflowEntrypoint):
    """Base of the benchmark workflows: bumps the counter however ``run()`` ends."""

    def __init__(self, returns: ReturnCounter) -> None:
        super().__init__()
        self._returns = returns

    def run(self, event: Any, step: Any) -> Any:
        try:
            return self.body(event, step)
        finally:
            self._returns.bump()

    def body(self, event: Any, step: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError


async def wait_complete(engine: Engine, instance_id: str) -> None:
    """Wait until the instance finishes; raise BenchError unless it completed."""
    status = await engine.wait_for_status(TENANT, instance_id, FINISHED_STATUSES)
    if status is not InstanceStatus.COMPLETE:
        view = await engine.get(TENANT, instance_id)
        raise BenchError(f"instance {instance_id} ended {status.value}: {view.record.error}")


def _add(value: int, delta: int) -> int:
    return value + delta


def _units_per_commit(engine: Engine, before: tuple[int, int]) -> tuple[float, int, int]:
    commits = engine.writer.commits - before[0]
    units = engine.writer.units - before[1]
    return (units / commits if commits else 0.0), units, commits


def sqlite_commit_floor(workdir: Path, commits: int = 300) -> tuple[float, float]:
    """p50 and p99 (ms) of a bare one-row commit, WAL + synchronous=FULL, in ``workdir``.

    The hardware floor under every durable step: what one fsync'd SQLite commit costs on
    this disk with no engine around it.
    """
    path = workdir / "floor.sqlite"
    times: list[float] = []
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        for _ in range(commits):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(64),))
            conn.execute("COMMIT")
            times.append((time.perf_counter() - start) * 1000)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return percentile(times, 50), percentile(times, 99)


# ---------------------------------------------------------------------- 1. step overhead


class _StampingWorkflow(_Counted):
    """``steps`` trivial ``step.do`` calls; each callback appends ``perf_counter()``."""

    def __init__(self, returns: ReturnCounter, steps: int, stamps: list[float]) -> None:
        super().__init__(returns)
        self._steps = steps
        self._stamps = stamps

    def body(self, event: Any, step: Any) -> int:
        for _ in range(self._steps):
            step.do("tick", self._tick)
        return len(self._stamps)

    def _tick(self) -> int:
        self._stamps.append(time.perf_counter())
        return len(self._stamps)


@benchmark(
    "engine.sequential_step_overhead",
    "per-step durable overhead of one instance running trivial steps back to back",
)
def sequential_step_overhead(ctx: BenchContext) -> list[Measurement]:
    """Per-step durable overhead, as the workflow sees it.

    Method: one instance runs ``steps`` trivial ``step.do`` calls. Each callback stamps
    ``time.perf_counter()``; the gap between two consecutive stamps is one full durable
    step cycle: the result goes to the engine, is committed (one fsync, nothing else to
    group with), the reply comes back and the next step starts. The callbacks do nothing,
    so every gap is overhead. p50 and p99 are over the ``steps - 1`` gaps. The note gives
    the mean, the wall time per step including the instance's start and finish, and the
    floor: a bare SQLite commit (WAL, synchronous=FULL) on the same disk.
    """
    steps = ctx.size(1_000, 5_000)
    stamps: list[float] = []

    async def body() -> tuple[float, float, int]:
        returns = ReturnCounter()
        factory = functools.partial(_StampingWorkflow, returns, steps, stamps)
        async with running_engine(ctx.workdir, factory) as engine:
            before = (engine.writer.commits, engine.writer.units)
            start = time.perf_counter()
            iid, _ = await engine.create(TENANT)
            await returns.wait_for(1)
            await wait_complete(engine, iid)
            wall = time.perf_counter() - start
            units_per_commit, _, commits = _units_per_commit(engine, before)
            return wall, units_per_commit, commits

    wall, units_per_commit, commits = run_engine(body)
    if len(stamps) != steps:
        raise BenchError(f"{len(stamps)} callbacks ran for {steps} steps (a replay?)")
    floor_p50, floor_p99 = sqlite_commit_floor(ctx.workdir)
    gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    params = {"steps": steps, "runner": "in-process", "clock": "wall"}
    notes = (
        f"mean {statistics.fmean(gaps_ms):.3f} ms, max {max(gaps_ms):.2f} ms over "
        f"{len(gaps_ms)} gaps; wall {wall * 1000 / steps:.3f} ms/step incl. start and finish; "
        f"{commits} commits ({units_per_commit:.2f} units each); floor: a bare SQLite commit "
        f"here takes p50 {floor_p50:.3f} ms, p99 {floor_p99:.3f} ms"
    )
    name = "engine.sequential_step_overhead"
    return [
        Measurement(
            name, percentile(gaps_ms, 50), "ms", "p50", 0.5, Direction.AT_MOST, notes, params
        ),
        Measurement(name, percentile(gaps_ms, 99), "ms", "p99", params=params),
    ]


# ---------------------------------------------------------------------- 2. concurrent steps


class CountingWorkflow(_Counted):
    """``event.payload["steps"]`` trivial steps, each adding one to the previous result."""

    def body(self, event: Any, step: Any) -> int:
        total = 0
        for _ in range(event.payload["steps"]):
            total = step.do("add", functools.partial(_add, total, 1))
        return total


@dataclass(frozen=True, slots=True)
class StepsRound:
    """One round of concurrent steps: wall time and the writer's units and commits."""

    seconds: float
    units: int
    commits: int


async def create_concurrently(engine: Engine, count: int, params: Any) -> list[str]:
    """``count`` ``engine.create`` calls at once (one trio task each); their ids."""
    ids: list[str] = []

    async def create() -> None:
        iid, _ = await engine.create(TENANT, params=params)
        ids.append(iid)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(create)
    return ids


def concurrent_steps_round(open_engine: EngineOpener, instances: int, steps: int) -> StepsRound:
    """``instances`` x ``steps`` trivial steps created at once; time to all complete."""

    async def body() -> StepsRound:
        returns = ReturnCounter()
        factory = functools.partial(CountingWorkflow, returns)
        async with open_engine(factory) as engine:
            before = (engine.writer.commits, engine.writer.units)
            start = time.perf_counter()
            ids = await create_concurrently(engine, instances, {"steps": steps})
            await returns.wait_for(instances)
            for iid in ids:
                await wait_complete(engine, iid)
            wall = time.perf_counter() - start
            _, units, commits = _units_per_commit(engine, before)
            view = await engine.get(TENANT, ids[-1])
            if view.record.output != steps:
                raise BenchError(f"expected output {steps}, got {view.record.output!r}")
            return StepsRound(wall, units, commits)

    return run_engine(body)


@benchmark(
    "engine.concurrent_steps_per_second",
    "durable steps per second with many instances running at once (group commit)",
)
def concurrent_steps_per_second(ctx: BenchContext) -> list[Measurement]:
    """Steps per second with ``instances`` instances of ``steps`` steps running at once.

    Method: all instances are created concurrently (one trio task each); the clock runs
    from just before the first create to the moment the last instance is seen complete.
    steps/s = instances x steps / that time (the creations, claims and finishes are
    inside the time but not counted as steps). ``ROUNDS`` rounds, each on a fresh engine
    and database; the row is the median round. The note gives the writer's units per
    commit (how many records each fsync carried) over the rounds.
    """
    instances = ctx.size(200, 1_000)
    steps = 10

    def one_round(workdir: Path) -> StepsRound:
        return concurrent_steps_round(functools.partial(running_engine, workdir), instances, steps)

    rounds = [one_round(ctx.workdir / f"round{i}") for i in range(ROUNDS)]
    total = instances * steps
    rates = sorted(total / r.seconds for r in rounds)
    units = sum(r.units for r in rounds)
    commits = sum(r.commits for r in rounds)
    return [
        Measurement(
            "engine.concurrent_steps_per_second",
            statistics.median(rates),
            "steps/s",
            target=5_000,
            direction=Direction.AT_LEAST,
            notes=(
                f"median of {ROUNDS} rounds of {instances} instances x {steps} steps "
                f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)} steps/s); "
                f"{units / commits:.1f} units per commit ({units} units / {commits} commits)"
            ),
            params={
                "instances": instances,
                "steps_per_instance": steps,
                "rounds": ROUNDS,
                "rounds_steps_per_second": rates,
                "units_per_commit": units / commits,
                "runner": "in-process",
            },
        )
    ]


# ---------------------------------------------------------------------- 3. creations


def blocking_workflow(gate: threading.Event) -> type[WorkflowEntrypoint]:
    """A workflow whose ``run()`` blocks until ``gate`` is set: it holds a slot."""

    class Blocking(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            gate.wait(TIME_LIMIT_SECONDS)

    return Blocking


async def run_creators(
    engine: Engine, creators: int, per_creator: int, latencies: list[float] | None = None
) -> None:
    """``creators`` trio tasks, each calling ``engine.create`` ``per_creator`` times in a
    row; each call's latency (ms) goes to ``latencies`` if given."""

    async def creator() -> None:
        for _ in range(per_creator):
            t0 = time.perf_counter()
            await engine.create(TENANT, params={"n": 1})
            if latencies is not None:
                latencies.append((time.perf_counter() - t0) * 1000)

    async with trio.open_nursery() as nursery:
        for _ in range(creators):
            nursery.start_soon(creator)


@dataclass(frozen=True, slots=True)
class CreationsRound:
    """One round of creations: wall time, per-call latencies (ms), commits, creations."""

    seconds: float
    latencies: list[float]
    commits: int
    done: int


def creations_round(open_engine: EngineOpener, total: int, creators: int) -> CreationsRound:
    """``total`` creates by ``creators`` concurrent creators while nothing else runs.

    The engine gets ``max_concurrency=1``, held by a blocking instance, so the
    dispatcher starts nothing and every commit is a creation.
    """
    per_creator = total // creators
    done = per_creator * creators
    gate = threading.Event()

    async def body() -> CreationsRound:
        async with open_engine(blocking_workflow(gate), max_concurrency=1) as engine:
            try:
                blocker, _ = await engine.create(TENANT)
                await engine.wait_for_status(TENANT, blocker, [InstanceStatus.RUNNING])
                latencies: list[float] = []
                before = (engine.writer.commits, engine.writer.units)
                start = time.perf_counter()
                await run_creators(engine, creators, per_creator, latencies)
                wall = time.perf_counter() - start
                _, _, commits = _units_per_commit(engine, before)
                counts = await engine.count_by_status(TENANT)
                if counts.get("queued", 0) != done:
                    raise BenchError(f"expected {done} queued, got {counts}")
                return CreationsRound(wall, latencies, commits, done)
            finally:
                gate.set()

    return run_engine(body)


@benchmark(
    "engine.creations_per_second_inprocess",
    "Engine.create calls per second from many concurrent creators, nothing else running",
)
def creations_per_second_inprocess(ctx: BenchContext) -> list[Measurement]:
    """Durable ``engine.create`` calls per second, creation only.

    Method: the engine runs with ``max_concurrency=1`` and one instance that blocks
    (its ``run()`` waits on a threading.Event), so the dispatcher starts nothing else
    and every commit is a creation. Then ``creators`` trio tasks each call
    ``engine.create`` ``total / creators`` times back to back; creations/s = total / wall
    time from the first call to the last return. Each create returns after its row is
    committed (grouped with the other creators'). ``ROUNDS`` rounds on fresh engines;
    the row is the median round; the note gives per-call latency over all rounds.
    """
    total = ctx.size(2_000, 20_000)
    creators = 100
    done = total // creators * creators

    def one_round(workdir: Path) -> tuple[float, list[float], int]:
        run = creations_round(functools.partial(running_engine, workdir), total, creators)
        return run.seconds, run.latencies, run.commits

    rounds = [one_round(ctx.workdir / f"round{i}") for i in range(ROUNDS)]
    rates = sorted(done / wall for wall, _, _ in rounds)
    latencies = [ms for _, lat, _ in rounds for ms in lat]
    commits = sum(c for _, _, c in rounds)
    return [
        Measurement(
            "engine.creations_per_second_inprocess",
            statistics.median(rates),
            "creations/s",
            notes=(
                f"median of {ROUNDS} rounds of {done} creates by {creators} concurrent creators "
                f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)}/s); latency p50 "
                f"{percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms; "
                f"{done * ROUNDS / commits:.1f} creations per commit"
            ),
            params={
                "creations": done,
                "concurrent_creators": creators,
                "rounds": ROUNDS,
                "rounds_creations_per_second": rates,
            },
        )
    ]


# ---------------------------------------------------------------------- three steps (vs DBOS)


class ThreeStepWorkflow(_Counted):
    """The workload shared with the DBOS run: x -> x + 1 -> * 2 -> - 3, one step each."""

    def body(self, event: Any, step: Any) -> int:
        x: int = event.payload["x"]
        a = step.do("one", functools.partial(_add, x, 1))
        b = step.do("two", functools.partial(_add, a, a))
        c: int = step.do("three", functools.partial(_add, b, -3))
        return c


@dataclass(frozen=True, slots=True)
class ThreeStepRun:
    """``count`` three-step workflows run one after another, after ``warmup`` untimed ones."""

    count: int
    warmup: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


def three_step_sequential(open_engine: EngineOpener, count: int, warmup: int) -> ThreeStepRun:
    """Run ``ThreeStepWorkflow`` sequentially: create, wait until complete, next."""

    async def body() -> float:
        returns = ReturnCounter()
        factory = functools.partial(ThreeStepWorkflow, returns)
        async with open_engine(factory) as engine:
            finished = 0

            async def one(x: int) -> str:
                nonlocal finished
                iid, _ = await engine.create(TENANT, params={"x": x})
                finished += 1
                await returns.wait_for(finished)
                await wait_complete(engine, iid)
                return iid

            for x in range(warmup):
                await one(x)
            start = time.perf_counter()
            last = ""
            for x in range(count):
                last = await one(x)
            seconds = time.perf_counter() - start
            view = await engine.get(TENANT, last)
            expected = (count - 1 + 1) * 2 - 3
            if view.record.output != expected:
                raise BenchError(f"expected output {expected}, got {view.record.output!r}")
            return seconds

    return ThreeStepRun(count, warmup, run_engine(body))


def three_step_concurrent(
    open_engine: EngineOpener, count: int, warmup: int, callers: int
) -> ThreeStepRun:
    """``callers`` concurrent callers share ``count`` ``ThreeStepWorkflow`` runs, each
    running its share one after another (create, wait until complete, next), after
    ``warmup`` sequential untimed ones: the same shape as DBOS's ``--callers`` run."""

    async def body() -> float:
        factory = functools.partial(ThreeStepWorkflow, ReturnCounter())
        async with open_engine(factory) as engine:
            ids: dict[int, str] = {}

            async def one(x: int) -> None:
                iid, _ = await engine.create(TENANT, params={"x": x})
                await wait_complete(engine, iid)
                ids[x] = iid

            async def share(caller: int) -> None:
                for x in range(caller, count, callers):
                    await one(x)

            for x in range(warmup):
                await one(x)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for caller in range(callers):
                    nursery.start_soon(share, caller)
            seconds = time.perf_counter() - start
            for x in range(max(0, count - callers), count):  # each caller's last, untimed
                output = (await engine.get(TENANT, ids[x])).record.output
                if output != (x + 1) * 2 - 3:
                    raise BenchError(f"expected {(x + 1) * 2 - 3} for x={x}, got {output!r}")
            return seconds

    return ThreeStepRun(count, warmup, run_engine(body))
