"""The engine on PostgreSQL (one and two supervisors), and how fast one supervisor
reacts to what was done through another. (DBOS on PostgreSQL beside it: ``dbos_postgres_bench``.)

Every benchmark here runs on the server named by ``TENANTFLOW_TEST_POSTGRES_URL``
(default ``postgresql://postgres@127.0.0.1:5432/test``), each round in a fresh schema
``tf_bench_<uuid>`` (``PostgresStore(url, schema=...)``) dropped afterwards. If the
server cannot be reached, every row says ``skipped: <reason>``.

The workloads are ``engine_bench``'s (``concurrent_steps_round``, ``creations_round``)
run on ``running_pg_engine`` instead of a SQLite file. "Two supervisors" means two
OS processes, each running its own ``Engine`` (its own ``owner``, leases) on the same
schema: the parent starts them (their imports overlap), waits until both are ready,
releases them together and measures the total itself (steps: polling the schema until
every instance is complete; creations: until both report their creators done). The
children are this module's ``_child_main`` run by ``python -c`` with the same
interpreter.

``postgres.cross_supervisor`` runs two engines in this process on one schema (as
``tests/cluster/test_notices.py`` does) and times terminate, create, send_event and
pause sent to one supervisor until they take effect on the other: with LISTEN/NOTIFY
(``notices=True``, the default) and with polling only (``notices=False``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from runtime import Engine, InProcessRunner, InstanceStatus, WallClock
from runtime._engine import DEFAULT_LEASE_SECONDS
from sandbox.sdk import WorkflowEntrypoint

from ._core import BenchContext, Measurement, benchmark, percentile
from .engine_bench import (
    TENANT,
    TIME_LIMIT_SECONDS,
    BenchError,
    CountingWorkflow,
    EngineOpener,
    ReturnCounter,
    WorkflowFactory,
    blocking_workflow,
    concurrent_steps_round,
    create_concurrently,
    creations_round,
    run_creators,
    run_engine,
)

__all__ = [
    "check_server",
    "concurrent_steps_per_second",
    "creations_per_second",
    "cross_supervisor",
    "fresh_schema",
    "listing",
    "pg_opener",
    "postgres_url",
    "rounds_for",
    "running_pg_engine",
]

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
ROOT: Final = Path(__file__).resolve().parent.parent
STEPS: Final = 10
CREATORS: Final = 100
WARMUP: Final = 10
#: A child that has not answered after this long is broken, not slow.
CHILD_TIMEOUT: Final = 300.0
#: How often the parent counts complete instances while two supervisors run.
POLL_SECONDS: Final = 0.005
_CHILD_CODE: Final = (
    "import sys; from bench.postgres_bench import _child_main; sys.exit(_child_main(sys.argv[1:]))"
)


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be used: the rows are skipped with this reason."""


def postgres_url() -> str:
    return os.environ.get("TENANTFLOW_TEST_POSTGRES_URL") or DEFAULT_URL


def check_server(url: str) -> str:
    """The server's durability settings; raise PostgresUnavailable if it is unreachable."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), current_setting('fsync'), "
                "current_setting('synchronous_commit')"
            ).fetchone()
    except (psycopg.Error, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PostgresUnavailable(f"PostgreSQL unreachable at {_safe(url)}: {first[:120]}") from exc
    assert row is not None
    return f"PostgreSQL {row[0]}, fsync={row[1]}, synchronous_commit={row[2]}"


def _safe(url: str) -> str:
    """The URL without a password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:
        return "<invalid URL>"
    return f"{info.get('host', '?')}:{info.get('port', 5432)}/{info.get('dbname', '?')}"


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A schema name ``tf_bench_<uuid>`` (created by the store), dropped on exit."""
    import psycopg

    name = f"tf_bench_{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """The URL of a database ``tf_bench_<uuid>`` (DBOS creates it), dropped on exit."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"tf_bench_{uuid.uuid4().hex}"
    info = conninfo_to_dict(url)
    user = info.get("user", "postgres")
    password = f":{info['password']}" if info.get("password") else ""
    where = f"{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}"
    target = f"postgresql://{user}{password}@{where}/{name}"
    try:
        yield target
    finally:
        admin = make_conninfo(url)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def running_pg_engine(
    url: str,
    schema: str,
    workflow: WorkflowFactory | Mapping[str, WorkflowFactory],
    *,
    max_concurrency: int = 1000,
    owner: str | None = None,
    notices: bool = True,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    tenant_concurrency: Callable[[str], int] | None = None,
) -> AsyncIterator[Engine]:
    """A real engine on ``PostgresStore(url, schema=schema)`` (an ``EngineOpener`` once
    ``url`` and ``schema`` are bound) running ``workflow`` for tenant ``bench``, or a
    mapping of tenant -> workflow."""
    from runtime._storage_postgres import PostgresStore

    store = await trio.to_thread.run_sync(functools.partial(PostgresStore, url, schema=schema))
    workflows = dict(workflow) if isinstance(workflow, Mapping) else {TENANT: workflow}
    runner = InProcessRunner(workflows)
    engine = Engine(
        store,
        runner,
        clock=WallClock(),
        max_concurrency=max_concurrency,
        owner=owner or f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        lease_seconds=lease_seconds,
        notices=notices,
        tenant_concurrency=tenant_concurrency,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await runner.aclose()
        store.close()


def pg_opener(url: str, schema: str) -> EngineOpener:
    """``engine_bench``'s workloads take an ``EngineOpener``: this one opens on ``schema``."""
    return functools.partial(running_pg_engine, url, schema)


# ---------------------------------------------------------------------- two supervisors


def _child_main(argv: list[str]) -> int:
    """One supervisor process: its engine starts on ``START``, it says ``READY``, works on
    ``GO`` and exits when stdin closes.

    ``steps``: create ``--count`` instances of ``STEPS`` steps concurrently, print
    ``CREATED``, keep running (the other supervisor's instances may land here) until
    stdin closes. ``creations``: a blocking instance holds the only slot (before
    ``READY``); on ``GO`` ``CREATORS`` tasks create ``--count`` instances, print ``DONE``,
    and keep the slot held until stdin closes (so the parent can count them queued).
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--mode", choices=("steps", "creations"), required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    gate = threading.Event()

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def body() -> None:
        if args.mode == "steps":
            factory: Any = functools.partial(CountingWorkflow, ReturnCounter())
            limit = 1000
        else:
            factory = blocking_workflow(gate)
            limit = 1
        await trio.to_thread.run_sync(sys.stdin.readline)  # START
        async with running_pg_engine(args.url, args.schema, factory, max_concurrency=limit) as e:
            try:
                if args.mode == "creations":
                    blocker, _ = await e.create(TENANT)
                    await e.wait_for_status(TENANT, blocker, [InstanceStatus.RUNNING])
                say("READY")
                await trio.to_thread.run_sync(sys.stdin.readline)  # GO
                if args.mode == "steps":
                    await create_concurrently(e, args.count, {"steps": STEPS})
                    say("CREATED")
                else:
                    await run_creators(e, CREATORS, args.count // CREATORS)
                    say("DONE")
                await trio.to_thread.run_sync(sys.stdin.read)  # EOF: stop
            finally:
                gate.set()

    run_engine(body)
    return 0


def _expect(proc: subprocess.Popen[str], word: str, log_path: Path) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != word:
        proc.kill()
        proc.wait()
        lines = log_path.read_text(errors="replace").strip().splitlines()
        tail = (lines or [f"exit status {proc.returncode}"])[-1]
        raise BenchError(f"supervisor child said {line.strip()!r}, not {word}: {tail[:200]}")


def _tell(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def _child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def _spawn(url: str, schema: str, mode: str, count: int, log_path: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-c", _CHILD_CODE,
        "--url", url, "--schema", schema, "--mode", mode, "--count", str(count),
    ]  # fmt: skip
    with log_path.open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, cwd=log_path.parent, env=_child_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip


def _wait_complete(
    url: str, schema: str, want: int, procs: Sequence[subprocess.Popen[str]]
) -> None:
    """Poll the schema (one connection) until ``want`` instances are complete."""
    import psycopg

    deadline = time.perf_counter() + CHILD_TIMEOUT
    query = f"SELECT count(*) FROM \"{schema}\".instances WHERE status = 'complete'"
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(query).fetchone()
            if row is not None and row[0] >= want:
                return
            if time.perf_counter() > deadline:
                raise BenchError("two supervisors did not finish in time")
            if any(p.poll() is not None for p in procs):
                raise BenchError("a supervisor child exited early")
            time.sleep(POLL_SECONDS)


def _count_queued(url: str, schema: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM \"{schema}\".instances WHERE status = 'queued'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _two_supervisors(url: str, schema: str, mode: str, total: int, cwd: Path) -> tuple[float, int]:
    """Run the workload on two supervisor processes; (seconds measured here, items)."""
    from runtime._storage_postgres import PostgresStore

    PostgresStore(url, schema=schema).close()  # migrate once, before both start
    half = total // 2 if mode == "steps" else (total // 2 // CREATORS) * CREATORS
    logs = [cwd / f"supervisor-{schema}-{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[str]] = []
    try:
        # Both import at once; the engines start on START. In ``creations`` one after the
        # other, so that each claims its own blocking instance.
        procs = [_spawn(url, schema, mode, half, log) for log in logs]
        for proc, log in zip(procs, logs, strict=True):
            _tell(proc, "START")
            if mode == "creations":
                _expect(proc, "READY", log)
        if mode == "steps":
            for proc, log in zip(procs, logs, strict=True):
                _expect(proc, "READY", log)
        start = time.perf_counter()
        for proc in procs:
            _tell(proc, "GO")
        if mode == "steps":
            _wait_complete(url, schema, 2 * half, procs)
            wall = time.perf_counter() - start
            for proc, log in zip(procs, logs, strict=True):
                _expect(proc, "CREATED", log)
            return wall, 2 * half * STEPS
        for proc, log in zip(procs, logs, strict=True):
            _expect(proc, "DONE", log)
        wall = time.perf_counter() - start
        queued = _count_queued(url, schema)
        if queued != 2 * half:
            raise BenchError(f"expected {2 * half} queued, got {queued}")
        return wall, 2 * half
    finally:
        for proc in procs:
            _close(proc)


def _close(proc: subprocess.Popen[str]) -> None:
    """Close the child's stdin (its signal to stop) and wait for it; kill it if it hangs."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# ---------------------------------------------------------------------- throughput benchmarks


def rounds_for(ctx: BenchContext) -> int:
    return 3 if ctx.full else 1


def listing(values: Sequence[float], decimals: int = 0) -> str:
    return ", ".join(f"{v:,.{decimals}f}" for v in values)


@benchmark(
    "postgres.concurrent_steps_per_second",
    "durable steps per second on PostgreSQL, one and two supervisor processes",
)
def concurrent_steps_per_second(ctx: BenchContext) -> list[Measurement]:
    """``engine.concurrent_steps_per_second`` on PostgreSQL, with one and two supervisors.

    Method: ``instances`` x ``STEPS`` steps created concurrently; steps/s = total steps /
    wall time from the first create to the last instance complete. One supervisor:
    ``engine_bench.concurrent_steps_round`` on this process's engine. Two: two supervisor
    processes on the same schema each create half; the parent releases them together and
    polls the schema until every instance is complete. Fresh schema per round; median.
    """
    name = "postgres.concurrent_steps_per_second"
    instances = ctx.size(100, 1_000)
    rounds = rounds_for(ctx)
    url = postgres_url()
    params: dict[str, Any] = {"instances": instances, "steps_per_instance": STEPS, "rounds": rounds}
    try:
        server = check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip(name, str(exc), unit="steps/s", label=label, params=params)
            for label in ("1 supervisor", "2 supervisors")
        ]
    one: list[float] = []
    two: list[float] = []
    units = commits = 0
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            run = concurrent_steps_round(pg_opener(url, schema), instances, STEPS)
            one.append(instances * STEPS / run.seconds)
            units, commits = units + run.units, commits + run.commits
        with fresh_schema(url) as schema:
            wall, steps = _two_supervisors(url, schema, "steps", instances, ctx.workdir)
            two.append(steps / wall)
    one.sort()
    two.sort()
    return [
        Measurement(
            name, statistics.median(one), "steps/s", "1 supervisor",
            notes=f"{instances} x {STEPS} steps, in-process runner; rounds {listing(one)}; "
            f"{units / commits:.1f} units per commit; {server}",
            params={**params, "supervisors": 1, "rounds_steps_per_second": one,
                    "units_per_commit": units / commits},
        ),
        Measurement(
            name, statistics.median(two), "steps/s", "2 supervisors",
            notes=(
                f"two supervisor processes on one schema, {instances // 2} instances each, "
                f"timed by the parent polling the schema every {POLL_SECONDS * 1000:g} ms; "
                f"rounds {listing(two)}"
            ),
            params={**params, "supervisors": 2, "rounds_steps_per_second": two},
        ),
    ]  # fmt: skip


@benchmark(
    "postgres.creations_per_second",
    "Engine.create calls per second on PostgreSQL, one and two supervisor processes",
)
def creations_per_second(ctx: BenchContext) -> list[Measurement]:
    """``engine.creations_per_second_inprocess`` on PostgreSQL, one and two supervisors.

    Method: each engine has ``max_concurrency=1`` held by one blocking instance, so only
    creations commit; ``CREATORS`` concurrent creators make ``total`` creates
    (``engine_bench.creations_round``; with two supervisor processes, ``CREATORS`` each
    making half). Fresh schema per round.
    """
    name = "postgres.creations_per_second"
    total = ctx.size(1_000, 20_000)
    rounds = rounds_for(ctx)
    url = postgres_url()
    params: dict[str, Any] = {"creations": total, "creators": CREATORS, "rounds": rounds}
    try:
        server = check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip(name, str(exc), unit="creations/s", label=label, params=params)
            for label in ("1 supervisor", "2 supervisors")
        ]
    one: list[float] = []
    two: list[float] = []
    latencies: list[float] = []
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            run = creations_round(pg_opener(url, schema), total, CREATORS)
            one.append(run.done / run.seconds)
            latencies += run.latencies
        with fresh_schema(url) as schema:
            wall, done = _two_supervisors(url, schema, "creations", total, ctx.workdir)
            two.append(done / wall)
    one.sort()
    two.sort()
    return [
        Measurement(
            name, statistics.median(one), "creations/s", "1 supervisor",
            notes=f"{total} creates by {CREATORS} concurrent creators; rounds {listing(one)}; "
            f"latency p50 {percentile(latencies, 50):.2f} ms, p99 "
            f"{percentile(latencies, 99):.2f} ms; {server}",
            params={**params, "supervisors": 1, "rounds_creations_per_second": one},
        ),
        Measurement(
            name, statistics.median(two), "creations/s", "2 supervisors",
            notes=(
                f"two supervisor processes on one schema, {CREATORS} creators each making half; "
                f"rounds {listing(two)}"
            ),
            params={**params, "supervisors": 2, "rounds_creations_per_second": two},
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------------- cross-supervisor reactions

#: Tenants of the cross-supervisor benchmark. ``PINNED`` and ``HOLD`` run on A only (B's
#: concurrency for them is 0), so what B is sent always concerns an activation on A;
#: ``TENANT`` may run on either.
PINNED: Final = "pinned"
HOLD: Final = "hold"
_A_ONLY: Final = frozenset({PINNED, HOLD})
#: The ``loop`` workflow's steps: far more than a measurement lets it run.
LOOP_STEPS: Final = 1_000_000
#: The dispatcher's safety net (``runtime._dispatcher._SAFETY_NET_SECONDS``): how often an
#: idle dispatcher looks for queued work it was not told about.
SAFETY_NET_SECONDS: Final = 5.0


class _Probe:
    """What the workflows on both engines tell the measuring trio code.

    ``stamp(iid, label, where)`` from a workflow thread records ``perf_counter()`` and
    which engine (``"A"``/``"B"``) ran the callback; ``await wait(iid, label)`` returns
    that. Every instance id gets its own gate, which ``hold`` steps wait on.
    """

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}
        self._waiters: dict[tuple[str, str], trio.Event] = {}
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.ticks: Counter[str] = Counter()

    def new_id(self) -> str:
        iid = uuid.uuid4().hex
        self._gates[iid] = threading.Event()
        return iid

    def gate(self, iid: str) -> threading.Event:
        return self._gates[iid]

    def release(self, iid: str) -> None:
        self._gates[iid].set()

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def stamp(self, iid: str, label: str, where: str) -> str:
        now = time.perf_counter()
        try:
            self._token.run_sync_soon(self._record, (iid, label), (where, now))
        except trio.RunFinishedError:
            pass
        return where

    def tick(self, iid: str, where: str) -> int:
        with self._lock:
            self.ticks[iid] += 1
            count = self.ticks[iid]
        if count == 1:
            self.stamp(iid, "started", where)
        return count

    def _record(self, key: tuple[str, str], value: tuple[str, float]) -> None:
        self._seen.setdefault(key, value)  # the first wins (a replay does not stamp again)
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter.set()

    async def wait(self, iid: str, label: str) -> tuple[str, float]:
        key = (iid, label)
        while key not in self._seen:
            await self._waiters.setdefault(key, trio.Event()).wait()
        return self._seen[key]


class _ProbeWorkflow(WorkflowEntrypoint):
    """One workflow for every scenario, chosen by ``params["mode"]``.

    ``hold``: one long step that waits on the instance's gate. ``once``: one step.
    ``event``: a step, ``wait_for_event("go")``, a step. ``loop``: trivial steps back to
    back. Callbacks stamp on the probe with the name of the engine running them.
    """

    def __init__(self, probe: _Probe, where: str) -> None:
        super().__init__()
        self._probe = probe
        self._where = where

    def run(self, event: Any, step: Any) -> Any:
        probe, where, iid = self._probe, self._where, event.instance_id
        mode = event.payload["mode"]
        if mode == "hold":

            def hold() -> str:
                probe.stamp(iid, "started", where)
                probe.gate(iid).wait(TIME_LIMIT_SECONDS)
                return where

            return step.do("hold", hold)
        if mode == "once":
            return step.do("once", lambda: probe.stamp(iid, "ran", where))
        if mode == "event":
            step.do("before", lambda: probe.stamp(iid, "before", where))
            step.wait_for_event("go", type="go", timeout="1 hour")
            return step.do("after", lambda: probe.stamp(iid, "after", where))
        if mode == "loop":
            for _ in range(LOOP_STEPS):
                step.do("tick", lambda: probe.tick(iid, where))
            return None
        raise ValueError(f"unknown mode {mode!r}")


@dataclass
class _Pair:
    """Two supervisors on one schema: A holds the instances, B is sent the requests."""

    a: Engine
    b: Engine
    probe: _Probe


def _b_concurrency(tenant_id: str) -> int:
    return 0 if tenant_id in _A_ONLY else 1000


async def _wait_listening(url: str, channel: str, count: int) -> None:
    """Until ``count`` connections LISTEN on ``channel`` (the engines start listening on
    a thread of their own, after ``Engine.run`` reports started)."""
    import psycopg

    def listeners(conn: Any) -> int:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'idle'",
            (f'LISTEN "{channel}"',),
        ).fetchone()
        return int(row[0])

    conn = await trio.to_thread.run_sync(functools.partial(psycopg.connect, url, autocommit=True))
    try:
        with trio.fail_after(30):
            while True:  # polled: nothing tells us when another thread has listened
                if await trio.to_thread.run_sync(listeners, conn) >= count:
                    return
                await trio.sleep(0.02)
    finally:
        conn.close()


@asynccontextmanager
async def _pair(
    url: str, schema: str, probe: _Probe, *, notices: bool, a_concurrency: int = 1000
) -> AsyncIterator[_Pair]:
    """Engines A and B (default 15 s leases) on ``schema``, both listening if ``notices``."""

    def workflows(where: str) -> dict[str, WorkflowFactory]:
        factory = functools.partial(_ProbeWorkflow, probe, where)
        return {TENANT: factory, PINNED: factory, HOLD: factory}

    opener = functools.partial(running_pg_engine, url, schema)
    async with (
        opener(workflows("A"), owner="A", notices=notices, max_concurrency=a_concurrency) as a,
        opener(workflows("B"), owner="B", notices=notices, tenant_concurrency=_b_concurrency) as b,
    ):
        try:
            if notices:
                await _wait_listening(url, a.store.channel, 2)  # type: ignore[attr-defined]
            yield _Pair(a, b, probe)
        finally:
            probe.release_all()


def _key_on(engine: Engine, iid: str) -> int:
    """The key of ``iid``'s activation on ``engine``."""
    for key, session in engine._sessions.items():
        if session.instance_id == iid:
            return key
    raise BenchError(f"instance {iid} does not run on {engine.owner}")


async def _session_gone(engine: Engine, key: int) -> float:
    """Wait until ``engine`` no longer runs ``key``; the time it was seen gone."""
    while key in engine._sessions:
        await engine._sessions_changed.wait()
    return time.perf_counter()


async def _hold_on_a(pair: _Pair) -> tuple[str, int]:
    """An instance inside a long step on A: (its id, its key)."""
    iid = pair.probe.new_id()
    await pair.a.create(PINNED, instance_id=iid, params={"mode": "hold"})
    where, _ = await pair.probe.wait(iid, "started")
    if where != "A":
        raise BenchError(f"the pinned instance runs on {where}")
    return iid, _key_on(pair.a, iid)


@dataclass
class _Series:
    """Delays (ms) of one reaction, and what the note says about them."""

    delays: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)  #: the API call on B itself (ms)
    early: int = 0  #: reactions already done when the API call returned
    ran_on: Counter[str] = field(default_factory=Counter)
    steps_after: list[int] = field(default_factory=list)


async def _terminate(pair: _Pair, series: _Series, at: float | None = None) -> None:
    """terminate on B -> A drops the activation (``at``: call B at that trio time)."""
    iid, key = await _hold_on_a(pair)
    if at is not None:
        await trio.sleep_until(at)
    called = time.perf_counter()
    if await pair.b.terminate(PINNED, iid) is not InstanceStatus.TERMINATED:
        raise BenchError("terminate did not answer terminated")
    returned = time.perf_counter()
    series.early += key not in pair.a._sessions
    gone = await _session_gone(pair.a, key)
    pair.probe.release(iid)
    series.calls.append((returned - called) * 1000)
    series.delays.append((gone - returned) * 1000)


async def _queued(pair: _Pair, series: _Series, at: float | None = None) -> None:
    """create on A (full) -> the instance's step runs on B."""
    iid = pair.probe.new_id()
    if at is not None:
        await trio.sleep_until(at)
    await pair.a.create(TENANT, instance_id=iid, params={"mode": "once"})
    returned = time.perf_counter()
    where, ran = await pair.probe.wait(iid, "ran")
    series.ran_on[where] += 1
    series.delays.append((ran - returned) * 1000)


async def _event(pair: _Pair, series: _Series) -> None:
    """send_event on B -> the waiting instance's next step runs (on either engine)."""
    iid = pair.probe.new_id()
    await pair.a.create(TENANT, instance_id=iid, params={"mode": "event"})
    first, _ = await pair.probe.wait(iid, "before")
    ran_first = pair.a if first == "A" else pair.b  # its watchers hear its own commits
    await ran_first.wait_for_status(TENANT, iid, [InstanceStatus.WAITING])
    called = time.perf_counter()
    await pair.b.send_event(TENANT, iid, "go", None)
    returned = time.perf_counter()
    where, ran = await pair.probe.wait(iid, "after")
    series.ran_on[where] += 1
    series.calls.append((returned - called) * 1000)
    series.delays.append((ran - returned) * 1000)


async def _pause(pair: _Pair, series: _Series) -> None:
    """pause on B -> A parks the instance (running steps back to back) at a step boundary."""
    probe = pair.probe
    iid = probe.new_id()
    await pair.a.create(PINNED, instance_id=iid, params={"mode": "loop"})
    await probe.wait(iid, "started")
    key = _key_on(pair.a, iid)
    called = time.perf_counter()
    status = await pair.b.pause(PINNED, iid)
    returned = time.perf_counter()
    ticks = probe.ticks[iid]
    gone = await _session_gone(pair.a, key)
    if status is not InstanceStatus.WAITING_FOR_PAUSE:
        raise BenchError(f"pause answered {status.value}, not waitingForPause")
    if (final := await pair.b.status(PINNED, iid)) is not InstanceStatus.PAUSED:
        raise BenchError(f"the instance ended {final.value}, not paused")
    series.calls.append((returned - called) * 1000)
    series.delays.append((gone - returned) * 1000)
    series.steps_after.append(probe.ticks[iid] - ticks)
    await pair.b.terminate(PINNED, iid)


async def _spread(
    pair: _Pair,
    scenario: Callable[[_Pair, _Series, float | None], Any],
    series: _Series,
    count: int,
    window: float,
) -> None:
    """``count`` runs of ``scenario`` at evenly spaced moments over ``window`` seconds.

    For a reaction that waits for a periodic poll (lease renewal, dispatcher safety
    net), moments spread over one period sample every phase of it, in one period's time.
    """
    base = trio.current_time() + 1.0  # room for the set-up (creates, claims)
    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(scenario, pair, series, base + window * (i + 0.5) / count)


@dataclass
class _Reactions:
    """Every series of one mode (notices on, or polling only)."""

    terminate: _Series = field(default_factory=_Series)
    queued: _Series = field(default_factory=_Series)
    event: _Series = field(default_factory=_Series)
    pause: _Series = field(default_factory=_Series)
    heard: int = 0  #: notices A and B applied
    leases_lost: int = 0  #: activations A aborted from its lease renewal


async def _measure_mode(url: str, notices: bool, repeats: int, spread: int) -> _Reactions:
    """Open two pairs of supervisors (T: A free; Q: A full) and run every scenario."""
    out = _Reactions()
    probe = _Probe()
    with fresh_schema(url) as schema_t, fresh_schema(url) as schema_q:
        async with (
            _pair(url, schema_t, probe, notices=notices) as pair_t,
            _pair(url, schema_q, probe, notices=notices, a_concurrency=1) as pair_q,
        ):
            # Q's A is full: its one slot is held by an instance B may not run.
            blocker = probe.new_id()
            await pair_q.a.create(HOLD, instance_id=blocker, params={"mode": "hold"})
            await probe.wait(blocker, "started")
            for _ in range(repeats):
                await _event(pair_t, out.event)
            for _ in range(repeats):
                await _pause(pair_t, out.pause)
            if notices:
                for _ in range(repeats):
                    await _terminate(pair_t, out.terminate)
                for _ in range(repeats):
                    await _queued(pair_q, out.queued)
            else:
                # Each waits for a poll (every lease/3; every SAFETY_NET_SECONDS): spread
                # the requests over one period, both scenarios at once.
                async with trio.open_nursery() as nursery:
                    renewal = pair_t.a.lease_seconds / 3
                    nursery.start_soon(_spread, pair_t, _terminate, out.terminate, spread, renewal)
                    nursery.start_soon(
                        _spread, pair_q, _queued, out.queued, spread, SAFETY_NET_SECONDS
                    )
            for engine in (pair_t.a, pair_t.b, pair_q.a, pair_q.b):
                out.heard += engine.notices.heard if engine.notices is not None else 0
            out.leases_lost = pair_t.a.leases_lost
    return out


def _summary(values: Sequence[float]) -> str:
    return f"p50 {percentile(values, 50):.2f} ms, p99 {percentile(values, 99):.2f} ms"


@benchmark(
    "postgres.cross_supervisor",
    "terminate, create, send_event, pause through one supervisor: when another reacts",
)
def cross_supervisor(ctx: BenchContext) -> list[Measurement]:
    """How fast a request sent to one supervisor takes effect on another (issue 6.5).

    Method: two engines in this process (``InProcessRunner``, a ``PostgresStore`` each,
    owners A and B, 15 s leases) share a fresh schema: pair T, and pair Q whose A has
    ``max_concurrency=1`` held by a blocking instance. Tenants ``pinned``/``hold`` run
    only on A (B's concurrency for them is 0). Scenarios, each timed from the API call
    on B (or A) returning:

    * terminate on B of an instance inside a long step on A -> A no longer has the
      activation (``engine._sessions``);
    * create on the full A -> the instance's step callback runs on B;
    * send_event on B to an instance waiting for it -> its next step's callback runs
      (on either engine);
    * pause on B of an instance running trivial steps back to back on A -> A's
      activation ends (the instance parked ``paused`` at a step boundary).

    Everything twice: with notices (LISTEN/NOTIFY, the default), ``repeats`` times in a
    row; and with ``notices=False`` on both engines (polling), where terminate and create
    wait for a periodic poll, so ``spread`` of each are sent at evenly spaced moments
    over one poll period (both scenarios at once, ~10 s in all).
    """
    repeats = ctx.size(20, 100)
    spread = ctx.size(10, 30)
    url = postgres_url()
    base = "postgres.cross_supervisor"
    both = ("p50, notices", "p99, notices", "p50, polling", "p99, polling")
    labels = {"terminate": both, "queued_to_idle": both, "event": both[:2], "pause": both[:2]}
    params: dict[str, Any] = {
        "repeats_with_notices": repeats, "polling_samples": spread,
        "lease_seconds": DEFAULT_LEASE_SECONDS, "runner": "in-process",
        "supervisors": "2 engines in one process",
    }  # fmt: skip
    try:
        server = check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip(f"{base}.{what}", str(exc), unit="ms", label=label, params=params)
            for what, row_labels in labels.items()
            for label in row_labels
        ]
    notices = run_engine(functools.partial(_measure_mode, url, True, repeats, spread))
    with _quiet("tenantflow.engine"):  # "lost the lease of ...": what polling is measured on
        polling = run_engine(functools.partial(_measure_mode, url, False, repeats, spread))
    renewal = DEFAULT_LEASE_SECONDS / 3
    for mode, reactions in (("notices", notices), ("polling", polling)):
        if set(reactions.queued.ran_on) != {"B"}:
            raise BenchError(f"{mode}: queued instances ran on {dict(reactions.queued.ran_on)}")
    notes = {
        "terminate": (
            f"B commits status terminated (new run token) with NOTIFY 'STOP <key>'; A's "
            f"listener thread hands it to trio, which aborts the activation; {repeats} in a "
            f"row; timed from B's call returning, and A had already dropped it then in "
            f"{notices.terminate.early} of {repeats} (0 ms); B's call itself took "
            f"{_summary(notices.terminate.calls)}; from the call's start to A dropping it: "
            f"{_summary(_sums(notices.terminate))}; notices applied by the 4 engines: "
            f"{notices.heard} (polling: {polling.heard}); {server}",
            f"notices=False on both: A sees it at its next lease renewal (every lease/3 = "
            f"{renewal:g} s), which finds the run token changed; {spread} terminates at "
            f"evenly spaced moments over one renewal period; A aborted "
            f"{polling.leases_lost} from its lease loop",
        ),
        "queued_to_idle": (
            f"A (max_concurrency=1, held) commits the create with NOTIFY 'QUEUED <tenant>'; "
            f"B's idle dispatcher is kicked and claims it (SKIP LOCKED); {repeats} in a row; "
            f"to its step callback on B",
            f"notices=False: B's idle dispatcher finds it at its next safety-net look "
            f"(every {SAFETY_NET_SECONDS:g} s); {spread} creates at evenly spaced moments over "
            f"one period",
        ),
        "event": (
            f"send_event on B queues the instance and kicks B's own dispatcher (A also hears "
            f"QUEUED); whoever claims first runs it: ran on {_where(notices.event)}; to the "
            f"next step's callback; B's call took {_summary(notices.event.calls)}; polling "
            f"(notices=False): {_summary(polling.event.delays)}, ran on "
            f"{_where(polling.event)}: no notice is needed when B has a free slot",
            "",
        ),
        "pause": (
            f"pause on B commits waitingForPause; A learns it at its next step boundary "
            f"(each step's commit reads the status: no notice involved) and parks it paused; "
            f"the instance runs trivial steps back to back; steps A ran after B's call "
            f"returned: median {statistics.median(notices.pause.steps_after):g}, max "
            f"{max(notices.pause.steps_after)}; polling (notices=False): "
            f"{_summary(polling.pause.delays)}",
            "",
        ),
    }
    series = {
        "terminate": (notices.terminate, polling.terminate),
        "queued_to_idle": (notices.queued, polling.queued),
        "event": (notices.event, polling.event),
        "pause": (notices.pause, polling.pause),
    }
    rows: list[Measurement] = []
    for what, (with_notices, with_polling) in series.items():
        name = f"{base}.{what}"
        note_notices, note_polling = notes[what]
        detail = {
            **params,
            "notices_ms": sorted(with_notices.delays),
            "polling_ms": sorted(with_polling.delays),
        }
        modes = [("notices", with_notices.delays, note_notices)]
        if note_polling:
            modes.append(("polling", with_polling.delays, note_polling))
        for mode, delays, note in modes:
            rows += [
                Measurement(name, percentile(delays, 50), "ms", f"p50, {mode}", notes=note,
                            params=detail),
                Measurement(name, percentile(delays, 99), "ms", f"p99, {mode}", params=detail),
            ]  # fmt: skip
    return rows


def _sums(series: _Series) -> list[float]:
    """Each reaction timed from the start of the API call instead of its return."""
    return [call + delay for call, delay in zip(series.calls, series.delays, strict=True)]


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hide a logger's warnings (expected ones) for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _where(series: _Series) -> str:
    return ", ".join(f"{where} {n}x" for where, n in sorted(series.ran_on.items()))
