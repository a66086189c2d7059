"""Benchmarks of the whole supervisor: HTTP API, env.WORKFLOWS, many tenants, fairness.

Every supervisor here is the real one (``open_supervisor``): a SQLite file in the
benchmark's fresh directory (WAL, ``synchronous=FULL``, group commit), ``WallClock``,
the zygote and one real sandbox process per (tenant, code version), the tenants' code
read from tenant folders (or, for ``scale.many_tenants``, registered directly: see
there). The HTTP benchmarks put ``serve_http`` (hypercorn on trio, in this process) in
front of it.

HTTP clients run in separate processes (``http.client`` on keep-alive connections, one
connection per thread; ``_CLIENT``), so the client's CPU is not taken from the server's
event loop; ``http.creations_per_second`` also measures an in-process ``httpx``
client under trio to show how much that costs. Every client process connects first,
says ``ready``, and starts on ``go``, so interpreter start-up is outside the timing.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import msgpack
import psutil  # type: ignore[import-untyped]  # no stubs installed
import trio

from loader import TenantCode, TenantRegistry, TenantState, code_version
from runtime import FINISHED_STATUSES, InstanceRecord, InstanceStatus, StepRecord, StoreTxn
from runtime._http import serve_http
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor
from sandbox.protocol import StepKind, StepStatus

from ._core import BenchContext, Direction, Measurement, benchmark, percentile
from .engine_bench import BenchError, run_engine, sqlite_commit_floor

__all__ = [
    "binding_creations_per_second",
    "fair_queue_drain",
    "http_creations_per_second",
    "ingress_latency",
    "many_tenants",
]

MIB: Final = 1024 * 1024
#: Lifts SPEC 7's default creation rate (100/s, burst 100) for the throughput tenants.
UNLIMITED: Final = "[limits]\ncreate_rate = 1000000000\ncreate_burst = 1000000000\n"

#: One tenant serves the HTTP and binding benchmarks: ``run()`` returns at once;
#: ``fetch`` answers ``{}``, or on ``/create?n=K`` creates K instances one by one.
QUICK_TENANT: Final = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return 1


def fetch(request, env):
    if request.path == "/create":
        n = int(request.query.get("n", "1"))
        for i in range(n):
            env.WORKFLOWS.create(params={"i": i})
        return {"created": n}
    return {}
"""

#: Two trivial steps (scale.fair_queue_drain).
TWO_STEPS: Final = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("one", lambda: 1)
        b = step.do("two", lambda: a + 1)
        return b
"""

#: scale.many_tenants: sleep until ``wake_at`` (never less than 1 s from now, so a
#: tenant reached late still sleeps), then one step stamping the sandbox's clock.
SLEEPER: Final = """\
import datetime
from tenantflow import WorkflowEntrypoint


def now():
    return datetime.datetime.now().timestamp()


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        p = event.payload or {}
        if p.get("calibrate"):
            return 0
        step.sleep_until("nap", max(p["wake_at"], now() + 1.0))
        return step.do("after", now)
"""

#: The client processes: ``http.client``, one keep-alive connection per thread.
_CLIENT: Final = r"""
import http.client, json, sys, threading, time

cfg = json.loads(sys.argv[1])
conns = [http.client.HTTPConnection("127.0.0.1", cfg["port"], timeout=120)
         for _ in range(cfg["threads"])]
for c in conns:  # open every connection before the clock starts
    c.request("GET", "/healthz")
    c.getresponse().read()
print("ready", flush=True)
sys.stdin.readline()
out = {"ok": 0, "errors": 0, "first_error": None}
cpu0 = time.process_time()
lock = threading.Lock()

def call(conn, method, path, body, expect):
    headers = {"content-type": "application/json"} if body else {}
    conn.request(method, path, body, headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != expect:
        with lock:
            out["errors"] += 1
            out["first_error"] = out["first_error"] or f"{r.status} {data[:300]!r}"
        return False
    return True

if cfg["mode"] == "create":
    tickets = iter(range(cfg["count"]))
    body = json.dumps({"params": {"bench": True}}).encode()
    def work(conn):
        ok = 0
        while True:
            with lock:
                t = next(tickets, None)
            if t is None:
                break
            ok += call(conn, "POST", cfg["path"], body, 201)
        with lock:
            out["ok"] += ok
    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
else:  # latency: one connection, sequential
    conn = conns[0]
    for _ in range(cfg["warmup"]):
        call(conn, "GET", cfg["path"], None, 200)
    times = []
    for _ in range(cfg["count"]):
        t0 = time.perf_counter()
        out["ok"] += call(conn, "GET", cfg["path"], None, 200)
        times.append((time.perf_counter() - t0) * 1000)
    out["times_ms"] = times
out["cpu"] = time.process_time() - cpu0
print(json.dumps(out), flush=True)
"""


# ---------------------------------------------------------------------- harness


@dataclass
class _Served:
    supervisor: Supervisor
    port: int  #: 0 when no HTTP server was asked for


def write_tenant(root: Path, tenant_id: str, source: str, toml: str | None = None) -> None:
    folder = root / tenant_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(source)
    if toml is not None:
        (folder / "tenant.toml").write_text(toml)


@asynccontextmanager
async def running_supervisor(
    workdir: Path,
    tenants: Mapping[str, str],
    *,
    toml: str | None = UNLIMITED,
    http: bool = False,
    max_concurrency: int = 1000,
    max_sandboxes: int = 64,
    idle_timeout: float = 60.0,
    scan_interval: float = 3600.0,
) -> AsyncIterator[_Served]:
    """``open_supervisor`` on ``workdir`` with these tenant folders, maybe ``serve_http``.

    Every tenant's code must load (a compile error is a BenchError). The folder is
    scanned once at start (``scan_interval`` keeps the watch loop out of the way).
    """
    root = workdir / "tenants"
    root.mkdir(parents=True, exist_ok=True)
    for tenant_id, source in tenants.items():
        write_tenant(root, tenant_id, source, toml)
    config = SupervisorConfig(
        tenants_dir=root,
        db_url=f"sqlite:///{workdir / 'tenantflow.db'}",
        max_concurrency=max_concurrency,
        max_sandboxes=max_sandboxes,
        idle_timeout=idle_timeout,
        scan_interval=scan_interval,
    )
    async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
        for tenant_id in tenants:
            state = supervisor.registry.tenants.get(tenant_id)
            if state is None or state.version is None:
                error = state.load_error if state is not None else "not found"
                raise BenchError(f"tenant {tenant_id!r} did not load: {error}")
        port = 0
        if http:
            port = await nursery.start(functools.partial(serve_http, supervisor, port=0))
        try:
            yield _Served(supervisor, port)
        finally:
            nursery.cancel_scope.cancel()


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    """One line from ``stream`` (``buffer`` keeps what came after it)."""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise BenchError(f"a client process exited early: {bytes(buffer)[-500:]!r}")
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


@dataclass
class _ClientRun:
    seconds: float  #: "go" sent -> the last process reported (this process's clock)
    results: list[dict[str, Any]]

    @property
    def ok(self) -> int:
        return sum(int(r["ok"]) for r in self.results)

    @property
    def errors(self) -> int:
        return sum(int(r["errors"]) for r in self.results)

    def first_error(self) -> str | None:
        return next((r["first_error"] for r in self.results if r["first_error"]), None)


async def run_clients(configs: Sequence[Mapping[str, Any]]) -> _ClientRun:
    """Start one ``_CLIENT`` process per config, wait for all ``ready``, send ``go``."""
    processes: list[trio.Process] = []
    buffers = [bytearray() for _ in configs]
    try:
        for cfg in configs:
            processes.append(
                await trio.lowlevel.open_process(
                    [sys.executable, "-I", "-S", "-c", _CLIENT, json.dumps(cfg)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        for process, buffer in zip(processes, buffers, strict=True):
            assert process.stdout is not None
            if await _read_line(process.stdout, buffer) != b"ready":
                raise BenchError("a client process did not say ready")
        results: list[dict[str, Any]] = [{} for _ in processes]
        start = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            await process.stdin.send_all(b"go\n")

        async def collect(index: int) -> None:
            stdout = processes[index].stdout
            assert stdout is not None
            results[index] = json.loads(await _read_line(stdout, buffers[index]))

        async with trio.open_nursery() as nursery:
            for index in range(len(processes)):
                nursery.start_soon(collect, index)
        seconds = time.perf_counter() - start
        return _ClientRun(seconds, results)
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        await pipe.aclose()


def _rss_mib(pid: int | None = None) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MIB


# ---------------------------------------------------------------------- 1. HTTP creations


@benchmark(
    "http.creations_per_second",
    "instance creations through POST /v1/tenants/{t}/instances on a real supervisor",
)
def http_creations_per_second(ctx: BenchContext) -> list[Measurement]:
    """Creations per second through the HTTP admin API.

    Method: a real supervisor (one tenant whose ``run()`` returns 1; ``tenant.toml``
    lifts the 100/s creation rate limit) behind ``serve_http`` on 127.0.0.1. ``total``
    ``POST /v1/tenants/{t}/instances`` (body ``{"params": {...}}``, answered 201 once the
    row is committed) by ``clients`` concurrent clients, each on its own keep-alive
    connection, in ``procs`` processes of ``http.client`` threads. Rate = successful
    creations / wall time from "go" to the last response. Three rounds on the same
    server (the later ones smaller in full mode):

    1. ``running`` (the row with the target): the created instances are dispatched and
       run in the tenant's sandbox meanwhile (at most 100 at once, the tenant's default
       ``max_concurrency``), competing with the creations for the event loop and the
       writer. The next round starts once they have all completed.
    2. ``dispatch held``: ``engine.draining`` is set, so nothing is dispatched and every
       commit is a creation: the HTTP + create path alone.
    3. ``httpx in-process``: as 2, with ``httpx.AsyncClient`` tasks in this process's
       trio loop instead of client processes (the client's CPU then comes out of the
       server's event loop); fewer creates, it is slow.

    The notes give how busy the server's event-loop thread was (its CPU time / wall
    time, from /proc) and the clients' CPU, to show which side is the bottleneck.
    """
    total = ctx.size(3_000, 20_000)
    held_total = ctx.size(3_000, 5_000)
    httpx_total = ctx.size(300, 500)
    procs, threads = 2, 16
    clients = procs * threads
    tenant = "creator"
    path = f"/v1/tenants/{tenant}/instances"

    @dataclass
    class _Round:
        run: _ClientRun
        loop: _LoopShare
        units_per_commit: float
        complete: int

    async def measured(served: _Served, total: int) -> _Round:
        engine = served.supervisor.engine
        counts = [total // procs + (i < total % procs) for i in range(procs)]
        configs = [
            {"mode": "create", "port": served.port, "threads": threads, "path": path, "count": n}
            for n in counts
        ]
        before = (engine.writer.commits, engine.writer.units)
        loop = _loop_time()
        run = await run_clients(configs)
        busy = _LoopShare.since(loop, run.seconds)
        commits = engine.writer.commits - before[0]
        units = engine.writer.units - before[1]
        if run.errors or run.ok != total:
            raise BenchError(f"{run.errors} of {total} creates failed: {run.first_error()}")
        done = (await engine.count_by_status(tenant)).get(InstanceStatus.COMPLETE.value, 0)
        return _Round(run, busy, units / max(1, commits), done)

    async def body() -> tuple[_Round, _Round, float, int, _LoopShare]:
        async with running_supervisor(ctx.workdir, {tenant: QUICK_TENANT}, http=True) as served:
            engine = served.supervisor.engine
            running = await measured(served, total)
            await _settled(served.supervisor, tenant)  # round 1's instances finish
            engine.draining = True
            held = await measured(served, held_total)
            loop = _loop_time()
            hx_seconds, hx_ok = await _httpx_creates(served.port, path, httpx_total, clients)
            hx_busy = _LoopShare.since(loop, hx_seconds)
            engine.draining = False
            return running, held, hx_seconds, hx_ok, hx_busy

    running, held, hx_seconds, hx_ok, hx_busy = run_engine(body)
    if hx_ok != httpx_total:
        raise BenchError(f"httpx: {hx_ok} of {httpx_total} creates answered 201")

    def client_cpu(run: _ClientRun) -> str:
        cpu = sum(float(r["cpu"]) for r in run.results)
        return f"the {procs} client processes used {cpu / run.seconds:.2f} CPU"

    name = "http.creations_per_second"
    params = {"creates": total, "clients": clients, "processes": procs, "client": "http.client"}
    notes = (
        f"{total} creates by {procs} processes x {threads} http.client threads (one "
        f"keep-alive connection each) in {running.run.seconds:.2f} s, "
        f"{running.run.seconds / total * clients * 1000:.1f} ms per request at {clients} in "
        f"flight, while the instances ran ({running.complete} of {total} had completed when "
        f"the last create returned); {running.units_per_commit:.1f} units per commit; "
        f"{running.loop}; {client_cpu(running.run)}"
    )
    held_notes = (
        f"{held_total} creates with dispatch held (engine.draining): "
        f"{held.run.seconds:.2f} s, {held.units_per_commit:.1f} creations per commit; "
        f"{held.loop}; {client_cpu(held.run)}"
    )
    hx_notes = (
        f"{hx_ok} creates by {clients} httpx.AsyncClient tasks in the server's own trio "
        f"loop, dispatch held: {hx_seconds:.2f} s; {hx_busy} (client and server share "
        f"it): the in-process client is the bottleneck, hence the client processes above"
    )
    return [
        Measurement(name, total / running.run.seconds, "creations/s", "instances running",
                    1_500, Direction.AT_LEAST, notes, params),
        Measurement(name, held_total / held.run.seconds, "creations/s", "dispatch held",
                    notes=held_notes, params={**params, "creates": held_total,
                                              "dispatch": "held"}),
        Measurement(name, hx_ok / hx_seconds, "creations/s", "httpx in-process, held",
                    notes=hx_notes, params={**params, "creates": httpx_total,
                                            "client": "httpx", "dispatch": "held"}),
    ]  # fmt: skip


def _loop_time() -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a CPU) of this process's main thread.

    The main thread runs the trio event loop: the supervisor, the engine and the HTTP
    server. From ``/proc/self/task/<tid>/schedstat`` (run time, run-queue delay, in ns).
    """
    with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
        run, wait, _ = f.read().split()
    return int(run) / 1e9, int(wait) / 1e9


@dataclass(frozen=True, slots=True)
class _LoopShare:
    """How the event-loop thread spent a stretch of wall time."""

    busy: float  #: on a CPU
    waited: float  #: runnable, waiting for a CPU (other processes had them)

    @classmethod
    def since(cls, before: tuple[float, float], seconds: float) -> _LoopShare:
        now = _loop_time()
        return cls((now[0] - before[0]) / seconds, (now[1] - before[1]) / seconds)

    def __str__(self) -> str:
        return (
            f"the server's event-loop thread was on a CPU {self.busy:.0%} of the time and "
            f"waited for one {self.waited:.0%}"
        )


async def _httpx_creates(port: int, path: str, total: int, clients: int) -> tuple[float, int]:
    """``total`` creates by ``clients`` httpx tasks in this trio run: (seconds, created)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    ok = 0
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=120
    ) as client:

        async def warm() -> None:
            (await client.get("/healthz")).raise_for_status()

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(warm)
        tickets = iter(range(total))

        async def work() -> None:
            nonlocal ok
            for _ in tickets:
                response = await client.post(path, json={"params": {"bench": True}})
                ok += response.status_code == 201

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(work)
        return time.perf_counter() - start, ok


# ---------------------------------------------------------------------- 2. binding creations


@benchmark(
    "binding.creations_per_second",
    "creations through env.WORKFLOWS.create in a loop inside one tenant fetch",
)
def binding_creations_per_second(ctx: BenchContext) -> list[Measurement]:
    """Creations per second through the binding, from tenant code.

    Method: ``Supervisor.fetch`` of the tenant's ``/create?n=K``: its ``fetch`` calls
    ``env.WORKFLOWS.create(params=...)`` K times in a loop, each a blocking RPC from the
    sandbox (a ``BindingCall`` frame) to the supervisor, which admits it (rate limit,
    lifted here), wraps the params in the envelope and commits the row before replying.
    So the calls are sequential: one commit each. The sandbox is warm (one untimed fetch
    of 10 creates first). Rate = K / the fetch's wall time. Two rounds: the created
    instances running meanwhile (the row), then with dispatch held (``engine.draining``:
    nothing runs, every commit is a creation). The note splits one create: the RPC
    (p50 of 100 bare fetches returning ``{}``) and a bare SQLite commit on this disk.
    """
    k = ctx.size(1_000, 3_000)
    tenant = "binder"

    async def body() -> tuple[float, float, list[float], int]:
        async with running_supervisor(ctx.workdir, {tenant: QUICK_TENANT}) as served:
            supervisor = served.supervisor
            engine = supervisor.engine

            async def create_k() -> float:
                start = time.perf_counter()
                result = await _fetch_ok(supervisor, tenant, "/create", {"n": str(k)})
                seconds = time.perf_counter() - start
                if json.loads(result) != {"created": k}:
                    raise BenchError(f"fetch answered {result!r}")
                return seconds

            await _fetch_ok(supervisor, tenant, "/create", {"n": "10"})
            running = await create_k()
            await _settled(supervisor, tenant)  # they finish before the bare fetches
            pings: list[float] = []
            for _ in range(100):
                start = time.perf_counter()
                await _fetch_ok(supervisor, tenant, "/ping", {})
                pings.append((time.perf_counter() - start) * 1000)
            engine.draining = True
            held = await create_k()
            engine.draining = False
            created = sum((await engine.count_by_status(tenant)).values())
            return running, held, pings, created

    running, held, pings, created = run_engine(body)
    if created != 2 * k + 10:
        raise BenchError(f"{created} instances exist after {2 * k + 10} creates")
    floor_p50, _ = sqlite_commit_floor(ctx.workdir)
    name = "binding.creations_per_second"
    notes = (
        f"one fetch creating {k} instances one after another took {running:.2f} s, "
        f"{running / k * 1000:.2f} ms per env.WORKFLOWS.create (RPC sandbox -> supervisor, "
        f"admit, one commit, reply), the instances running meanwhile; parts: a bare fetch "
        f"round trip p50 {percentile(pings, 50):.2f} ms, a bare SQLite commit here p50 "
        f"{floor_p50:.2f} ms"
    )
    held_notes = (
        f"the same {k} creates with dispatch held (nothing runs meanwhile): {held:.2f} s, "
        f"{held / k * 1000:.2f} ms per create"
    )
    params = {"creates": k}
    return [
        Measurement(name, k / running, "creations/s", "instances running", notes=notes,
                    params=params),
        Measurement(name, k / held, "creations/s", "dispatch held", notes=held_notes,
                    params={**params, "dispatch": "held"}),
    ]  # fmt: skip


async def _settled(supervisor: Supervisor, tenant: str) -> None:
    """Return once none of the tenant's instances is queued or running."""
    while True:
        counts = await _counts(supervisor, tenant)
        if not counts.get("queued") and not counts.get("running"):
            return
        await trio.sleep(0.05)


async def _counts(supervisor: Supervisor, tenant: str | None = None) -> dict[str, int]:
    """Instances by status (of one tenant or all); BenchError once one has failed."""
    counts = await supervisor.engine.count_by_status(tenant)
    if counts.get("errored") or counts.get("terminated"):
        raise BenchError(f"instances failed: {counts}")
    return counts


async def _fetch_ok(
    supervisor: Supervisor, tenant: str, path: str, query: Mapping[str, str]
) -> bytes:
    result = await supervisor.fetch(tenant, "GET", path, query, {}, b"")
    if result.error is not None or result.status != 200:
        raise BenchError(f"fetch {path} answered {result.status}: {result.error}")
    return result.body


# ---------------------------------------------------------------------- 3. ingress latency


@benchmark(
    "http.ingress_latency",
    "GET /t/{tenant}/ping through the HTTP server to a warm sandbox's fetch, p50/p99",
)
def ingress_latency(ctx: BenchContext) -> list[Measurement]:
    """Latency of one tenant ingress request, sequential, warm sandbox.

    Method: one ``http.client`` process on one keep-alive connection sends ``n`` ``GET
    /t/{tenant}/ping`` one after another (after ``warmup`` untimed ones, which also warm
    the sandbox), timing each with ``perf_counter`` from the request to the last byte
    of the response. The tenant's ``fetch`` returns ``{}``. One request is: hypercorn
    parses it, the ASGI app routes it, ``Supervisor.fetch`` sends a ``Fetch`` frame to
    the sandbox, which runs ``fetch`` on a thread and answers; the response goes back.
    The note gives ``GET /healthz`` on the same server (no sandbox) as the floor of the
    HTTP part.
    """
    n = ctx.size(1_000, 5_000)
    warmup = 100
    tenant = "pinger"

    async def body() -> tuple[list[float], list[float]]:
        async with running_supervisor(ctx.workdir, {tenant: QUICK_TENANT}, http=True) as served:
            cfg = {"mode": "latency", "port": served.port, "threads": 1, "count": n,
                   "warmup": warmup}  # fmt: skip
            ping = await run_clients([{**cfg, "path": f"/t/{tenant}/ping"}])
            health = await run_clients([{**cfg, "path": "/healthz", "count": min(n, 1_000)}])
        for run in (ping, health):
            if run.errors:
                raise BenchError(f"{run.errors} requests failed: {run.first_error()}")
        return ping.results[0]["times_ms"], health.results[0]["times_ms"]

    times, floor = run_engine(body)
    name = "http.ingress_latency"
    params = {"requests": n, "warmup": warmup, "client": "http.client, 1 connection"}
    notes = (
        f"{n} sequential GET /t/{tenant}/ping from a separate http.client process on one "
        f"keep-alive connection: mean {statistics.fmean(times):.3f} ms, max "
        f"{max(times):.2f} ms; floor: GET /healthz on the same server (no sandbox) p50 "
        f"{percentile(floor, 50):.3f} ms, p99 {percentile(floor, 99):.3f} ms"
    )
    return [
        Measurement(name, percentile(times, 50), "ms", "p50", notes=notes, params=params),
        Measurement(name, percentile(times, 99), "ms", "p99", params=params),
    ]


# ---------------------------------------------------------------------- 4. many tenants


@dataclass
class _ManyResult:
    tenants: int
    scan_write: float  #: writing the N folders
    scan_read: float  #: first scan of the N folders, without storing or probing
    rescan: float  #: a rescan of the N unchanged folders
    sample: int
    sample_scan: float  #: the real scan (read, store, probe in a sandbox) of the sample
    register: float  #: storing N - sample code versions and registering them directly
    cal_rate: float  #: tenants per second reaching their first activation, calibration
    hold: float  #: seconds from the first create to the start of the wake window
    asleep_count: int  #: instances waiting when the setup ended
    asleep_after: float  #: first create -> all N waiting
    late_sleepers: int  #: instances that reached their sleep after the window started
    counted_after: float  #: all waiting -> processes counted
    live_sandboxes: int
    zygote_children: int
    zombies: int
    zygote_alive: bool
    rss: float
    zygote_rss: float
    timer_late: list[float]
    timer_ended: list[float]  #: the sleep steps' ended_at
    e2e_late: list[float]
    drain: float  #: start of the wake window -> all complete
    cold_starts: int  #: sandboxes spawned during the wake phase
    peak_sandboxes: int


@benchmark(
    "scale.many_tenants",
    "N tenants each with one sleeping instance: processes alive, timer lateness",
)
def many_tenants(ctx: BenchContext) -> list[Measurement]:
    """Many tenants, each with one instance asleep: what stays alive, how late timers fire.

    Method: a supervisor (no tenant folder of its own) with ``max_sandboxes`` 64,
    ``idle_timeout`` 0.5 s and ``max_concurrency`` 64. Not the default 1000: each
    running instance of a tenant without a live sandbox asks the zygote for one, and
    with hundreds of spawns at once the zygote socket's send buffer fills and a second
    spawn waits to write the same fd: ``trio.BusyResourceError`` escapes the engine and
    the supervisor dies (seen at ~250 concurrent spawns; ``ZygoteClient.spawn`` has no
    send lock). Spawns in flight are not counted against ``max_sandboxes`` either, so
    the peak can exceed it.

    Tenants: all N are written as folders with the same main.py (so the same version
    hash, stored once per tenant). ``sample`` of them go through the real scan: a
    ``TenantRegistry`` wired like the supervisor's (read, store the version, load it in
    a fresh sandbox, one tenant after another), then join the supervisor's registry.
    That scan costs a cold start per tenant, minutes at 10,000 (the note extrapolates
    it), so the other N - sample are registered directly: their version stored with
    ``put_code_version``, their state put in the registry. The note also times reading
    all N folders (a scan that stores and probes nothing) and a rescan of them unchanged.

    Each tenant gets one instance (``Supervisor.binding(t).create``, in the envelope)
    that sleeps until ``wake_at`` and then runs one step. Reaching the sleep takes a
    sandbox per tenant (a cold start), so the wake times cannot be relative to the
    create: a calibration round (50 tenants, run to completion) measures how fast
    tenants get their first activation here, and every ``wake_at`` is set to
    ``hold + U(2, 5) s`` after the first create, ``hold`` being 1.4x the setup time
    that rate predicts plus 1 s (if the setup still overruns it, the process rows are
    skipped: there was no moment when all slept). The creates are paced like the
    calibration: at most
    2 x max_concurrency instances created and not yet asleep (all N queued at once
    would make every dispatcher round scan N queued tenants, and the setup would
    outlast the prediction). Once all N are ``waiting`` (or the first timer is due)
    and idle_timeout + 0.5 s have passed (or just before the first wake, if sooner),
    the sandboxes alive, the zygote's children and the RSS are read. Then all wake,
    each needing a sandbox again (a cold start per tenant), and the journal gives, per
    instance: timer lateness = the sleep step's ``ended_at`` (stamped by the engine's
    timer loop when it resolved the timer) - its ``wake_at``; end-to-end lateness = the
    next step's ``started_at`` (the engine received its StepStarted) - ``wake_at``.
    """
    n = ctx.size(2_000, 10_000)
    sample = ctx.size(20, 50)
    calibration = 50
    idle_timeout = 0.5
    max_sandboxes = 64
    max_concurrency = 64  # see the docstring: the default (1000) crashes the supervisor here
    rng = random.Random(1234)

    async def body() -> _ManyResult:
        root = ctx.workdir / "tenants"
        names = [f"t{i:05d}" for i in range(n)]
        started = time.perf_counter()
        await trio.to_thread.run_sync(_write_folders, root / "all", names, SLEEPER)
        scan_write = time.perf_counter() - started
        scan_read, rescan = await _time_scan(root / "all")

        config = SupervisorConfig(
            tenants_dir=None,  # the tenants are added below, not by the watch loop
            db_url=f"sqlite:///{ctx.workdir / 'tenantflow.db'}",
            max_concurrency=max_concurrency,
            max_sandboxes=max_sandboxes,
            idle_timeout=idle_timeout,
        )
        await trio.to_thread.run_sync(_write_folders, root / "sample", names[:sample], SLEEPER)
        async with open_supervisor(config) as sv:
            engine, runner = sv.engine, sv.sandboxes
            # The sample: the real folder scan, a TenantRegistry wired as open_supervisor
            # wires its own (store the version, probe it in a sandbox), timed.
            scan = TenantRegistry(root / "sample", _persist(sv), sv.probe)
            started = time.perf_counter()
            await scan.refresh()
            sample_scan = time.perf_counter() - started
            sv.registry.tenants.update(scan.tenants)
            for name in names[:sample]:
                sv.require_tenant(name)
            # The rest (and the calibration tenants): registered directly.
            cal_names = [f"cal{i:03d}" for i in range(calibration)]
            started = time.perf_counter()
            await _register(sv, [*names[sample:], *cal_names], {"main.py": SLEEPER})
            register = time.perf_counter() - started

            # Calibration: how fast do never-seen tenants get their first activation?
            started = time.perf_counter()
            cal_ids = await _create_all(sv, [(t, {"calibrate": True}) for t in cal_names])
            await _wait_all(sv, cal_ids)
            cal_rate = calibration / (time.perf_counter() - started)
            with trio.move_on_after(30):  # let the calibration sandboxes go idle and away
                while True:
                    if not runner.live():
                        break
                    await trio.sleep(0.05)

            hold = 1.4 * n / cal_rate + 1.0
            first_create = engine.clock.now()
            t0 = time.perf_counter()
            window = [first_create + hold + rng.uniform(2.0, 5.0) for _ in names]
            items = [(t, {"wake_at": w}) for t, w in zip(names, window, strict=True)]
            # Paced: at most 2 x max_concurrency instances created and not yet asleep, as
            # in the calibration (the dispatcher's rounds cost O(queued tenants)).
            ids: list[tuple[str, str]] = []
            peak = 0
            patience = 60 + 10 * n / cal_rate  # a bound on a wait, never an expectation
            with trio.move_on_after(patience) as scope:
                for offset in range(0, n, max_concurrency):
                    while True:
                        counts = await _counts(sv)
                        settled = counts.get("waiting", 0) + counts.get("complete", 0)
                        if len(ids) - (settled - calibration) < 2 * max_concurrency:
                            break
                        peak = max(peak, len(runner.live()))
                        await trio.sleep(0.05)
                    ids += await _create_all(sv, items[offset : offset + max_concurrency])
                # Until all are asleep, or the first timer is about to fire.
                while (await _counts(sv)).get("waiting", 0) < n:
                    if engine.clock.now() >= min(window) - 0.3:
                        break
                    peak = max(peak, len(runner.live()))
                    await trio.sleep(0.1)
            if scope.cancelled_caught:
                raise BenchError(f"setup not done after {patience:.0f} s: {await _counts(sv)}")
            asleep = time.perf_counter()
            asleep_count = (await _counts(sv)).get("waiting", 0)
            # Count once idle sandboxes are gone, or just before the first timer fires.
            first_wake = min(window) - engine.clock.now()
            await trio.sleep(max(0.0, min(idle_timeout + 0.5, first_wake - 0.2)))
            counted_after = time.perf_counter() - asleep
            zygote = psutil.Process(runner.zygote.pid)
            children = zygote.children(recursive=True)
            alive = [c for c in children if _is_alive(c)]
            live_sandboxes = len(runner.live())
            rss, zygote_rss = _rss_mib(), _rss_mib(runner.zygote.pid)
            zygote_alive = _is_alive(zygote)
            cold_mid = runner.stats.cold_starts
            # The wake: wait for every instance to complete.
            with trio.move_on_after(hold + patience) as scope:
                while (await _counts(sv)).get("complete", 0) < n + calibration:
                    peak = max(peak, len(runner.live()))
                    await trio.sleep(0.2)
            if scope.cancelled_caught:
                raise BenchError(f"not all complete after the wake: {await _counts(sv)}")
            drain = engine.clock.now() - (first_create + hold)
            journal = await engine.read(functools.partial(_journals, ids=ids))
            timer_late: list[float] = []
            timer_ended: list[float] = []
            e2e_late: list[float] = []
            late_sleepers = 0
            for record, steps in journal:
                if record.status is not InstanceStatus.COMPLETE:
                    raise BenchError(f"instance {record} did not complete")
                nap = next(s for s in steps if s.kind is StepKind.SLEEP)
                after = next(s for s in steps if s.kind is StepKind.DO)
                assert nap.wake_at is not None
                assert nap.ended_at is not None
                assert after.started_at is not None
                if nap.status is not StepStatus.COMPLETE:
                    raise BenchError(f"sleep step ended {nap.status}")
                if abs(nap.wake_at - record.params["params"]["wake_at"]) > 1e-6:
                    late_sleepers += 1
                timer_late.append((nap.ended_at - nap.wake_at) * 1000)
                timer_ended.append(nap.ended_at)
                e2e_late.append((after.started_at - nap.wake_at) * 1000)
            if len(timer_late) != n:
                raise BenchError(f"{len(timer_late)} journals read for {n} instances")
            return _ManyResult(
                n, scan_write, scan_read, rescan, sample, sample_scan, register, cal_rate,
                hold, asleep_count, asleep - t0, late_sleepers, counted_after, live_sandboxes,
                len(alive), len(children) - len(alive), zygote_alive, rss, zygote_rss,
                timer_late, timer_ended, e2e_late, drain, runner.stats.cold_starts - cold_mid,
                peak,
            )  # fmt: skip

    # 2N cold starts take minutes at 10,000 on a busy machine: a larger bound than
    # run_engine's (the waits inside have their own, scaled to the measured rate).
    r: _ManyResult = trio.run(_bounded, body, max(600.0, 0.2 * n))
    name = "scale.many_tenants"
    params = {"tenants": n, "max_sandboxes": max_sandboxes, "max_concurrency": max_concurrency,
              "idle_timeout_s": idle_timeout,
              "sleep": "until hold + U(2, 5) s", "clock": "wall"}  # fmt: skip
    per_tenant = r.sample_scan / r.sample
    asleep = (
        f"{n} tenants each with one waiting instance; counted {r.counted_after:.2f} s after "
        f"the last went to sleep"
        if r.asleep_count >= n
        else f"{n} tenants, but only {r.asleep_count} instances waiting when the first timer "
        f"was due (the setup took longer than the calibration predicted); counted "
        f"{r.counted_after:.2f} s later"
    )
    processes_note = (
        f"{asleep}: {r.live_sandboxes} live sandboxes, {r.zygote_children} "
        f"children of the zygote (+{r.zombies} zombies), zygote "
        f"{'alive' if r.zygote_alive else 'GONE'} (so {r.zygote_children + r.zygote_alive} "
        f"processes besides the supervisor); setup: first create -> all {n} waiting "
        f"{r.asleep_after:.1f} s ({n / r.asleep_after:.0f} tenants/s, a cold start each; "
        f"max_sandboxes {max_sandboxes}, peak {r.peak_sandboxes} alive), the creates paced "
        f"to keep at most {2 * max_concurrency} not yet asleep; {r.late_sleepers} reached "
        f"their sleep after their wake time (slept 1 s instead)"
    )
    scan_note = (
        f"tenant folders: writing {n} took {r.scan_write:.1f} s; reading and hashing them "
        f"(TenantRegistry.refresh without storing or probing) {r.scan_read:.2f} s, a rescan "
        f"of the {n} unchanged folders {r.rescan:.2f} s (the watch loop does this every "
        f"scan_interval, 1 s by default); the real scan of {r.sample} new tenants (read, "
        f"store the version, load it in a fresh sandbox, one after another) took "
        f"{r.sample_scan:.2f} s, {per_tenant * 1000:.0f} ms per tenant, so ~"
        f"{per_tenant * n:.0f} s for {n}: the others were registered directly "
        f"(put_code_version + registry state) in {r.register:.2f} s"
    )
    rounds = sorted(set(r.timer_ended))
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(rounds)] or [0.0]
    timer_note = (
        f"sleep step ended_at - wake_at over {n} timers in a 3 s window: mean "
        f"{statistics.fmean(r.timer_late):.1f} ms, max {max(r.timer_late):.1f} ms; the "
        f"engine's timer loop resolved them in {len(rounds)} rounds (one commit each; "
        f"ended_at is the round's clock reading), {n / len(rounds):.1f} timers per round, "
        f"median {statistics.median(gaps):.1f} ms and max {max(gaps):.0f} ms between "
        f"rounds, while the same event loop started the woken instances"
    )
    e2e_note = (
        f"next step's started_at - wake_at: needs a sandbox per tenant again ({r.cold_starts} "
        f"cold starts in the wake phase, {max_concurrency} instances at once), so it is bounded by "
        f"the cold-start rate: mean {statistics.fmean(r.e2e_late) / 1000:.2f} s, max "
        f"{max(r.e2e_late) / 1000:.2f} s; all {n} complete {r.drain:.1f} s after the window "
        f"opened ({n / max(r.drain, 1e-9):.0f}/s); calibration: {r.cal_rate:.0f} never-seen "
        f"tenants/s reached their first activation"
    )
    rss_note = (
        f"RSS of this process (supervisor, engine, HTTP-less; includes the bench harness) "
        f"with {n} tenants registered and {n} instances waiting; zygote RSS "
        f"{r.zygote_rss:.1f} MiB"
    )
    if r.asleep_count >= n:
        processes = [
            Measurement(
                name,
                r.live_sandboxes,
                "",
                "live sandboxes while asleep",
                0,
                Direction.AT_MOST,
                processes_note,
                params,
            ),
            Measurement(
                name,
                r.zygote_children + r.zygote_alive,
                "",
                "processes while asleep (zygote + children)",
                params=params,
            ),
        ]
    else:
        why = (
            f"the setup overran the calibrated hold: {n - r.asleep_count} of {n} not "
            f"asleep when the first timer was due"
        )
        processes = [
            Measurement.skip(
                name,
                why,
                label="live sandboxes while asleep",
                target=0,
                direction=Direction.AT_MOST,
                params=params,
            ),
            Measurement.skip(
                name, why, label="processes while asleep (zygote + children)", params=params
            ),
        ]
    return [
        *processes,
        Measurement(name, r.rss, "MiB", "supervisor RSS", notes=f"{rss_note}; {scan_note}",
                    params=params),
        Measurement(name, percentile(r.timer_late, 50), "ms", "timer lateness p50",
                    notes=timer_note, params=params),
        Measurement(name, percentile(r.timer_late, 99), "ms", "timer lateness p99", 50,
                    Direction.AT_MOST, params=params),
        Measurement(name, percentile(r.e2e_late, 50), "ms", "wake -> next step p50",
                    notes=e2e_note, params=params),
        Measurement(name, percentile(r.e2e_late, 99), "ms", "wake -> next step p99",
                    params=params),
    ]  # fmt: skip


async def _bounded(fn: Callable[[], Awaitable[_ManyResult]], seconds: float) -> _ManyResult:
    with trio.fail_after(seconds):
        return await fn()


def _is_alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _journals(
    txn: StoreTxn, ids: Sequence[tuple[str, str]]
) -> list[tuple[InstanceRecord, list[StepRecord]]]:
    out = []
    for tenant_id, instance_id in ids:
        record = txn.get_instance(tenant_id, instance_id)
        if record is None:
            raise BenchError(f"instance {tenant_id}/{instance_id} is gone")
        out.append((record, txn.load_steps(record.key)))
    return out


def _write_folders(root: Path, names: Sequence[str], source: str) -> None:
    for name in names:
        write_tenant(root, name, source)


async def _time_scan(root: Path) -> tuple[float, float]:
    """A TenantRegistry's first scan and rescan of ``root``, storing and probing nothing."""

    async def persist(tenant_id: str, version: str, files: bytes) -> None:
        pass

    async def probe(code: TenantCode) -> str | None:
        return None

    registry = TenantRegistry(root, persist, probe)
    started = time.perf_counter()
    await registry.refresh()
    first = time.perf_counter() - started
    started = time.perf_counter()
    await registry.refresh()
    return first, time.perf_counter() - started


def _persist(sv: Supervisor) -> Callable[[str, str, bytes], Awaitable[None]]:
    async def persist(tenant_id: str, version: str, files: bytes) -> None:
        await sv.engine.put_code_version(tenant_id, version, files)

    return persist


async def _register(sv: Supervisor, tenants: Sequence[str], files: dict[str, str]) -> None:
    """Store each tenant's code version and make it current, without probing it."""
    version = code_version(files)
    blob = msgpack.packb(files)
    limiter = trio.CapacityLimiter(256)

    async def one(tenant_id: str) -> None:
        async with limiter:
            await sv.engine.put_code_version(tenant_id, version, blob)
        sv.registry.tenants[tenant_id] = TenantState(tenant_id, version=version)

    async with trio.open_nursery() as nursery:
        for tenant_id in tenants:
            nursery.start_soon(one, tenant_id)


async def _create_all(
    sv: Supervisor, items: Sequence[tuple[str, Any]], *, parallel: int = 256
) -> list[tuple[str, str]]:
    """One instance per (tenant, params) through ``Supervisor.binding(t).create``."""
    ids: list[tuple[str, str]] = [("", "")] * len(items)
    limiter = trio.CapacityLimiter(parallel)

    async def one(index: int, tenant_id: str, params: Any) -> None:
        async with limiter:
            handle = await sv.binding(tenant_id).create(params=params)
        ids[index] = (tenant_id, handle.id)

    async with trio.open_nursery() as nursery:
        for index, (tenant_id, params) in enumerate(items):
            nursery.start_soon(one, index, tenant_id, params)
    return ids


async def _wait_all(sv: Supervisor, ids: Sequence[tuple[str, str]]) -> None:
    """Wait until every instance finished; BenchError unless all completed."""

    async def one(tenant_id: str, instance_id: str) -> None:
        status = await sv.engine.wait_for_status(tenant_id, instance_id, FINISHED_STATUSES)
        if status is not InstanceStatus.COMPLETE:
            view = await sv.engine.get(tenant_id, instance_id)
            raise BenchError(f"{tenant_id}/{instance_id} ended {status.value}: {view.record}")

    async with trio.open_nursery() as nursery:
        for tenant_id, instance_id in ids:
            nursery.start_soon(one, tenant_id, instance_id)


# ---------------------------------------------------------------------- 5. fair queue


@benchmark(
    "scale.fair_queue_drain",
    "tenant B's 5 instances behind tenant A's deep queue (max_concurrency 20), drain rate",
)
def fair_queue_drain(ctx: BenchContext) -> list[Measurement]:
    """Fairness under a deep queue, and the drain rate through a bounded pool.

    Method: a supervisor with ``max_concurrency`` 20; tenants A and B run the same
    2-step workflow; both sandboxes are warmed (one instance each). A creates
    ``n`` instances (``create_batch`` of 100, one after another); as soon as the last
    batch returns, B creates 5 (concurrently). Measured: from B's first create to its
    5th completion, and A's queued count at that moment (it should still be deep: B got
    slots without waiting for A's backlog). Then the drain rate: (n + 5) completions /
    time from A's first create to A's last completion.
    """
    n = ctx.size(1_000, 5_000)
    tenants = {"tenant-a": TWO_STEPS, "tenant-b": TWO_STEPS}

    async def body() -> tuple[float, int, float, float, int]:
        async with running_supervisor(ctx.workdir, tenants, max_concurrency=20) as served:
            sv = served.supervisor
            engine = sv.engine
            await _wait_all(sv, await _create_all(sv, [(t, {}) for t in tenants]))
            a, b = sv.binding("tenant-a"), sv.binding("tenant-b")
            start = time.perf_counter()
            for offset in range(0, n, 100):
                result = await a.create_batch([{} for _ in range(min(100, n - offset))])
                if result.errors:
                    raise BenchError(f"create_batch: {result.errors[0]}")
            created_a = time.perf_counter() - start
            b_start = time.perf_counter()
            b_ids = await _create_all(sv, [("tenant-b", {}) for _ in range(5)])
            del b
            await _wait_all(sv, b_ids)
            b_seconds = time.perf_counter() - b_start
            counts = await engine.count_by_status("tenant-a")
            queued = counts.get("queued", 0)
            done_a = counts.get("complete", 0) - 1
            while True:
                if (await engine.count_by_status("tenant-a")).get("complete", 0) >= n + 1:
                    break
                await trio.sleep(0.05)
            drain = time.perf_counter() - start
            return b_seconds, queued, drain, created_a, done_a

    b_seconds, queued, drain, created_a, done_a = run_engine(body)
    name = "scale.fair_queue_drain"
    params = {"a_instances": n, "b_instances": 5, "max_concurrency": 20, "steps": 2}
    b_notes = (
        f"A created {n} instances of 2 steps in {created_a:.2f} s, then B created 5; B's 5 "
        f"all completed {b_seconds * 1000:.0f} ms later, while {queued} of A's were still "
        f"queued ({done_a} of A's had completed); no target beyond 'B completes while A "
        f"is still queued' (the next row)"
    )
    q_notes = "A's queued instances at the moment B's 5th completed: > 0 means B did not wait"
    d_notes = (
        f"{n + 5} instances (2 steps each, 20 slots, 2 warm sandboxes) from A's first "
        f"create to A's last completion: {drain:.2f} s"
    )
    return [
        Measurement(name, b_seconds * 1000, "ms", "B's 5 complete", notes=b_notes, params=params),
        Measurement(name, queued, "", "A still queued then", 1, Direction.AT_LEAST, q_notes,
                    params),
        Measurement(name, (n + 5) / drain, "instances/s", "drain rate", notes=d_notes,
                    params=params),
    ]  # fmt: skip
