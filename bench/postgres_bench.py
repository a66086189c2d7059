"""The engine on PostgreSQL (one and two supervisors), and DBOS on PostgreSQL beside it.

Every benchmark here runs on the server named by ``TENANTFLOW_TEST_POSTGRES_URL``
(default ``postgresql://postgres@127.0.0.1:5432/test``), each round in a fresh schema
``tf_bench_<uuid>`` (``PostgresStore(url, schema=...)``) dropped afterwards; DBOS gets a
fresh database of its own, dropped afterwards. If the server cannot be reached, every
row says ``skipped: <reason>``.

The workloads are those of ``engine_bench`` (concurrent steps, creations) and of
``dbos_bench`` (three-step workflows). "Two supervisors" means two OS processes, each
running its own ``Engine`` (its own ``owner``, leases) on the same schema: the parent
starts them, waits until both are ready, releases them together and measures the total
itself (steps: polling the schema until every instance is complete; creations: until
both report their creators done). The children are this module's ``_child_main`` run by
``python -c`` with the same interpreter; DBOS runs in a subprocess too, so its globals
stay out of this process.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from runtime import Engine, InProcessRunner, InstanceStatus, WallClock
from sandbox.sdk import WorkflowEntrypoint

from ._core import BenchContext, Direction, Measurement, benchmark
from .engine_bench import (
    TENANT,
    TIME_LIMIT_SECONDS,
    BenchError,
    ReturnCounter,
    ThreeStepWorkflow,
    _CountingWorkflow,
    run_engine,
    wait_complete,
)

__all__ = [
    "concurrent_steps_per_second",
    "creations_per_second",
    "postgres_url",
    "three_step_workflows",
]

DEFAULT_URL: Final = "postgresql://postgres@127.0.0.1:5432/test"
ROOT: Final = Path(__file__).resolve().parent.parent
RESULT_PREFIX: Final = "BENCH_RESULT "
STEPS: Final = 10
CREATORS: Final = 100
WARMUP: Final = 10
RATIO_TARGET: Final = 5.0
DBOS_ROW: Final = "dbos.postgres_three_step_workflows"
#: A child that has not answered after this long is broken, not slow.
CHILD_TIMEOUT: Final = 300.0
_CHILD_CODE: Final = (
    "import sys; from bench.postgres_bench import _child_main; sys.exit(_child_main(sys.argv[1:]))"
)


class PostgresUnavailable(Exception):
    """PostgreSQL (or DBOS on it) cannot be used: the rows are skipped with this reason."""


def postgres_url() -> str:
    return os.environ.get("TENANTFLOW_TEST_POSTGRES_URL") or DEFAULT_URL


def _check_server(url: str) -> str:
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
    url: str, schema: str, workflow: Any, *, max_concurrency: int = 1000
) -> AsyncIterator[Engine]:
    """A real engine on ``PostgresStore(url, schema=schema)`` running ``workflow``."""
    from runtime._storage_postgres import PostgresStore

    store = await trio.to_thread.run_sync(functools.partial(PostgresStore, url, schema=schema))
    runner = InProcessRunner({TENANT: workflow})
    engine = Engine(
        store,
        runner,
        clock=WallClock(),
        max_concurrency=max_concurrency,
        owner=f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}",
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


def _count(url: str, schema: str, status: str) -> tuple[int, int]:
    """(instances with ``status``, all instances) in the schema."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FILTER (WHERE status = %s), count(*) FROM "{schema}".instances',
            (status,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------------- workloads, one engine


def _steps_one_engine(url: str, schema: str, instances: int) -> float:
    """``instances`` x ``STEPS`` steps created concurrently on one engine; seconds."""

    async def body() -> float:
        returns = ReturnCounter()
        factory = functools.partial(_CountingWorkflow, returns)
        async with running_pg_engine(url, schema, factory) as engine:
            ids: list[str] = []

            async def create() -> None:
                iid, _ = await engine.create(TENANT, params={"steps": STEPS})
                ids.append(iid)

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(instances):
                    nursery.start_soon(create)
            await returns.wait_for(instances)
            for iid in ids:
                await wait_complete(engine, iid)
            wall = time.perf_counter() - start
            view = await engine.get(TENANT, ids[-1])
            if view.record.output != STEPS:
                raise BenchError(f"expected output {STEPS}, got {view.record.output!r}")
            return wall

    return run_engine(body)


def _creations_one_engine(url: str, schema: str, total: int) -> tuple[float, int]:
    """``total`` creates by ``CREATORS`` concurrent creators, nothing running; (s, done)."""
    gate = threading.Event()
    per_creator = total // CREATORS
    done = per_creator * CREATORS

    class _Blocking(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            gate.wait(TIME_LIMIT_SECONDS)

    async def body() -> float:
        factory = _Blocking
        async with running_pg_engine(url, schema, factory, max_concurrency=1) as engine:
            try:
                blocker, _ = await engine.create(TENANT)
                await engine.wait_for_status(TENANT, blocker, [InstanceStatus.RUNNING])

                async def creator() -> None:
                    for _ in range(per_creator):
                        await engine.create(TENANT, params={"n": 1})

                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(CREATORS):
                        nursery.start_soon(creator)
                wall = time.perf_counter() - start
                counts = await engine.count_by_status(TENANT)
                if counts.get("queued", 0) != done:
                    raise BenchError(f"expected {done} queued, got {counts}")
                return wall
            finally:
                gate.set()

    return run_engine(body), done


# ---------------------------------------------------------------------- two supervisors


def _child_main(argv: list[str]) -> int:
    """One supervisor process: ``READY`` once its engine runs, work on ``GO``, exit on EOF.

    ``steps``: create ``--count`` instances of ``STEPS`` steps concurrently, print
    ``CREATED``, keep running (the other supervisor's instances may land here) until
    stdin closes. ``creations``: a blocking instance holds the only slot (before
    ``READY``); on ``GO`` ``CREATORS`` tasks create ``--count`` instances, print ``DONE``.
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

    class _Blocking(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            gate.wait(TIME_LIMIT_SECONDS)

    async def body() -> None:
        if args.mode == "steps":
            factory: Any = functools.partial(_CountingWorkflow, ReturnCounter())
            limit = 1000
        else:
            factory = _Blocking
            limit = 1
        async with running_pg_engine(args.url, args.schema, factory, max_concurrency=limit) as e:
            try:
                if args.mode == "creations":
                    blocker, _ = await e.create(TENANT)
                    await e.wait_for_status(TENANT, blocker, [InstanceStatus.RUNNING])
                say("READY")
                await trio.to_thread.run_sync(sys.stdin.readline)  # GO
                if args.mode == "steps":
                    async with trio.open_nursery() as nursery:
                        for _ in range(args.count):
                            nursery.start_soon(
                                functools.partial(e.create, TENANT, params={"steps": STEPS})
                            )
                    say("CREATED")
                else:
                    per_creator = args.count // CREATORS

                    async def creator() -> None:
                        for _ in range(per_creator):
                            await e.create(TENANT, params={"n": 1})

                    async with trio.open_nursery() as nursery:
                        for _ in range(CREATORS):
                            nursery.start_soon(creator)
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


def _two_supervisors(url: str, schema: str, mode: str, total: int, cwd: Path) -> tuple[float, int]:
    """Run the workload on two supervisor processes; (seconds measured here, items)."""
    from runtime._storage_postgres import PostgresStore

    PostgresStore(url, schema=schema).close()  # migrate once, before both start
    half = total // 2 if mode == "steps" else (total // 2 // CREATORS) * CREATORS
    procs: list[subprocess.Popen[str]] = []
    logs: list[Path] = []
    try:
        # One after the other: in ``creations`` each must claim its own blocking instance.
        for i in range(2):
            logs.append(cwd / f"supervisor-{schema}-{i}.log")
            procs.append(_spawn(url, schema, mode, half, logs[i]))
            _expect(procs[i], "READY", logs[i])
        start = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        if mode == "steps":
            deadline = start + CHILD_TIMEOUT
            while _count(url, schema, "complete")[0] < 2 * half:
                if time.perf_counter() > deadline:
                    raise BenchError("two supervisors did not finish in time")
                if any(p.poll() is not None for p in procs):
                    raise BenchError("a supervisor child exited early")
                time.sleep(0.002)
            wall = time.perf_counter() - start
            for proc, log_path in zip(procs, logs, strict=True):
                _expect(proc, "CREATED", log_path)
            return wall, 2 * half * STEPS
        for proc, log_path in zip(procs, logs, strict=True):
            _expect(proc, "DONE", log_path)
        wall = time.perf_counter() - start
        queued, _ = _count(url, schema, "queued")
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


# ---------------------------------------------------------------------- benchmarks


def _rounds(ctx: BenchContext) -> int:
    return 3 if ctx.full else 1


def _listing(values: list[float], decimals: int = 0) -> str:
    return ", ".join(f"{v:,.{decimals}f}" for v in values)


@benchmark(
    "postgres.concurrent_steps_per_second",
    "durable steps per second on PostgreSQL, one and two supervisor processes",
)
def concurrent_steps_per_second(ctx: BenchContext) -> list[Measurement]:
    """``engine.concurrent_steps_per_second`` on PostgreSQL, with one and two supervisors.

    Method: ``instances`` x ``STEPS`` steps created concurrently; steps/s = total steps /
    wall time from the first create to the last instance complete. One supervisor: the
    engine in this process (as the SQLite row). Two: two supervisor processes on the same
    schema each create half; the parent releases them together and polls the schema
    until every instance is complete. Fresh schema per round; median round.
    """
    name = "postgres.concurrent_steps_per_second"
    instances = ctx.size(200, 1_000)
    rounds = _rounds(ctx)
    url = postgres_url()
    params: dict[str, Any] = {"instances": instances, "steps_per_instance": STEPS, "rounds": rounds}
    try:
        server = _check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip(name, str(exc), unit="steps/s", label=label, params=params)
            for label in ("1 supervisor", "2 supervisors")
        ]
    one: list[float] = []
    two: list[float] = []
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            one.append(instances * STEPS / _steps_one_engine(url, schema, instances))
        with fresh_schema(url) as schema:
            wall, steps = _two_supervisors(url, schema, "steps", instances, ctx.workdir)
            two.append(steps / wall)
    one.sort()
    two.sort()
    return [
        Measurement(
            name, statistics.median(one), "steps/s", "1 supervisor",
            notes=f"{instances} x {STEPS} steps, in-process runner; rounds {_listing(one)}; "
            f"{server}",
            params={**params, "supervisors": 1, "rounds_steps_per_second": one},
        ),
        Measurement(
            name, statistics.median(two), "steps/s", "2 supervisors",
            notes=(
                f"two supervisor processes on one schema, {instances // 2} instances each, "
                f"timed by the parent polling the schema; rounds {_listing(two)}"
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
    creations commit; ``CREATORS`` concurrent creators make ``total`` creates (with two
    supervisor processes, ``CREATORS`` each making half). Fresh schema per round.
    """
    name = "postgres.creations_per_second"
    total = ctx.size(2_000, 20_000)
    rounds = _rounds(ctx)
    url = postgres_url()
    params: dict[str, Any] = {"creations": total, "creators": CREATORS, "rounds": rounds}
    try:
        server = _check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip(name, str(exc), unit="creations/s", label=label, params=params)
            for label in ("1 supervisor", "2 supervisors")
        ]
    one: list[float] = []
    two: list[float] = []
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            wall, done = _creations_one_engine(url, schema, total)
            one.append(done / wall)
        with fresh_schema(url) as schema:
            wall, done = _two_supervisors(url, schema, "creations", total, ctx.workdir)
            two.append(done / wall)
    one.sort()
    two.sort()
    return [
        Measurement(
            name, statistics.median(one), "creations/s", "1 supervisor",
            notes=f"{total} creates by {CREATORS} concurrent creators; rounds {_listing(one)}; "
            f"{server}",
            params={**params, "supervisors": 1, "rounds_creations_per_second": one},
        ),
        Measurement(
            name, statistics.median(two), "creations/s", "2 supervisors",
            notes=(
                f"two supervisor processes on one schema, {CREATORS} creators each making half; "
                f"rounds {_listing(two)}"
            ),
            params={**params, "supervisors": 2, "rounds_creations_per_second": two},
        ),
    ]  # fmt: skip


# ---------------------------------------------------------------------- three steps vs DBOS


def _three_step_tenantflow(url: str, schema: str, count: int, warmup: int) -> float:
    """``engine_bench.three_step_sequential`` on PostgreSQL; seconds of the timed part."""

    async def body() -> float:
        returns = ReturnCounter()
        factory = functools.partial(ThreeStepWorkflow, returns)
        async with running_pg_engine(url, schema, factory) as engine:
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
            if view.record.output != count * 2 - 3:
                raise BenchError(f"expected {count * 2 - 3}, got {view.record.output!r}")
            return seconds

    return run_engine(body)


def _dbos_main(argv: list[str]) -> int:
    """The DBOS side, in its own process: prints ``BENCH_RESULT {json}``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args(argv)

    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {
        "name": "tenantflow-bench",
        "system_database_url": args.url,
        "log_level": "WARNING",
    }
    DBOS(config=config)

    @DBOS.step()
    def one(x: int) -> int:
        return x + 1

    @DBOS.step()
    def two(x: int) -> int:
        return x + x

    @DBOS.step()
    def three(x: int) -> int:
        return x - 3

    @DBOS.workflow()
    def three_steps(x: int) -> int:
        return three(two(one(x)))

    @DBOS.workflow()
    def no_steps(x: int) -> int:
        return x

    DBOS.launch()
    try:
        for x in range(args.warmup):
            three_steps(x)
            no_steps(x)
        started = time.perf_counter()
        for x in range(args.count):
            if three_steps(x) != (x + 1) * 2 - 3:
                raise SystemExit(f"DBOS returned a wrong result for x={x}")
        three_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for x in range(args.count):
            no_steps(x)
        zero_seconds = time.perf_counter() - started
    finally:
        DBOS.destroy()
    result = {
        "dbos_version": importlib.metadata.version("dbos"),
        "three_step_seconds": three_seconds,
        "zero_step_seconds": zero_seconds,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


@dataclass(frozen=True, slots=True)
class _DbosRun:
    count: int
    three_step_seconds: float
    zero_step_seconds: float
    version: str

    @property
    def per_second(self) -> float:
        return self.count / self.three_step_seconds

    @property
    def ms_per_step(self) -> float:
        return (self.three_step_seconds - self.zero_step_seconds) / self.count / 3 * 1000


def _run_dbos(url: str, count: int, warmup: int, cwd: Path, timeout: float) -> _DbosRun:
    if importlib.util.find_spec("dbos") is None:
        raise PostgresUnavailable("dbos is not installed (pip install -e '.[bench]')")
    code = _CHILD_CODE.replace("_child_main", "_dbos_main")
    command = [
        sys.executable, "-c", code, "--url", url, "--count", str(count), "--warmup", str(warmup),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PostgresUnavailable(f"the DBOS run took more than {timeout:.0f} s") from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise PostgresUnavailable(f"DBOS on PostgreSQL failed: {tail[:160]}")
    data = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    return _DbosRun(
        count, float(data["three_step_seconds"]), float(data["zero_step_seconds"]),
        str(data["dbos_version"]),
    )  # fmt: skip


@benchmark(
    "dbos.postgres_three_step_workflows",
    "sequential three-step workflows on PostgreSQL: tenantflow vs DBOS, and the ratio",
)
def three_step_workflows(ctx: BenchContext) -> list[Measurement]:
    """``dbos.three_step_workflows`` with both systems on PostgreSQL.

    Method: ``count`` workflows ``x -> x + 1 -> * 2 -> - 3`` one after another after
    ``WARMUP`` untimed ones; tenantflow (one engine, in-process runner, fresh schema)
    then DBOS (subprocess, system database a fresh PostgreSQL database) in each round;
    rows are median rounds, the ratio the median of the rounds' ratios. DBOS's ms per
    step is the marginal cost (3-step - 0-step workflow time) / 3.
    """
    count = ctx.size(300, 1_000)
    rounds = _rounds(ctx)
    url = postgres_url()
    params: dict[str, Any] = {
        "workflows": count, "warmup": WARMUP, "steps_per_workflow": 3, "rounds": rounds,
    }  # fmt: skip
    ratio_name = "ratio.tenantflow_vs_dbos_postgres"
    try:
        server = _check_server(url)
    except PostgresUnavailable as exc:
        return [
            Measurement.skip("postgres.three_step_workflows", str(exc), unit="wf/s", params=params),
            Measurement.skip(DBOS_ROW, str(exc), unit="wf/s", params=params),
            Measurement.skip(
                ratio_name, str(exc), unit="x", target=RATIO_TARGET,
                direction=Direction.AT_LEAST, params=params,
            ),
        ]  # fmt: skip
    timeout = 600.0 if ctx.full else 120.0
    ours: list[float] = []
    theirs: list[_DbosRun] = []
    skipped: str | None = None
    for _ in range(rounds):
        with fresh_schema(url) as schema:
            ours.append(count / _three_step_tenantflow(url, schema, count, WARMUP))
        if skipped is None:
            try:
                with fresh_database(url) as dbos_url:
                    theirs.append(_run_dbos(dbos_url, count, WARMUP, ctx.workdir, timeout))
            except PostgresUnavailable as exc:
                skipped = str(exc)
    rows = [
        Measurement(
            "postgres.three_step_workflows", statistics.median(ours), "wf/s",
            notes=f"rounds {_listing(sorted(ours), 1)} wf/s; one engine, in-process runner; "
            f"{server}",
            params={**params, "rounds_wf_per_second": sorted(ours)},
        )
    ]  # fmt: skip
    if skipped is not None:
        return [
            *rows,
            Measurement.skip(DBOS_ROW, skipped, unit="wf/s", params=params),
            Measurement.skip(
                ratio_name, skipped, unit="x", target=RATIO_TARGET,
                direction=Direction.AT_LEAST, params=params,
            ),
        ]  # fmt: skip
    dbos_rates = sorted(r.per_second for r in theirs)
    ratios = sorted(o / t.per_second for o, t in zip(ours, theirs, strict=True))
    dbos_params = {**params, "dbos_version": theirs[0].version}
    return [
        *rows,
        Measurement(
            "dbos.postgres_three_step_workflows", statistics.median(dbos_rates), "wf/s",
            notes=(
                f"dbos {theirs[0].version}, system database on PostgreSQL (fresh database); "
                f"rounds {_listing(dbos_rates, 1)} wf/s"
            ),
            params={**dbos_params, "rounds_wf_per_second": dbos_rates},
        ),
        Measurement(
            "dbos.postgres_three_step_workflows", statistics.median(r.ms_per_step for r in theirs),
            "ms", label="per step",
            notes="marginal: (3-step - 0-step workflow time) / 3, median round",
            params=dbos_params,
        ),
        Measurement(
            ratio_name, statistics.median(ratios), "x", target=RATIO_TARGET,
            direction=Direction.AT_LEAST,
            notes=f"median of the rounds' ratios ({_listing(ratios, 2)})",
            params={**dbos_params, "rounds_ratio": ratios},
        ),
    ]  # fmt: skip
