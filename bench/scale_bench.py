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

import collections
import functools
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import httpx
import msgpack
import psutil  # type: ignore[import-untyped]  # no stubs installed
import trio

from loader import TenantCode, TenantRegistry, TenantState, code_version
from runtime import FINISHED_STATUSES, InstanceStatus, StoreTxn
from runtime._http import serve_http
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor
from sandbox._host import SandboxRunner
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
_T = TypeVar("_T")
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

#: scale.many_tenants: a tenant created ``c`` seconds after the first create wakes at
#: ``hold + _STRETCH x c`` after it, so the tenants wake in the order and at 1 / _STRETCH
#: of the rate this machine got them asleep (a wake costs a cold start per tenant too).
_STRETCH: Final = 1.5
#: Sandbox processes alive beyond max_sandboxes at which the benchmark gives up (each
#: holds ~4-6 MiB of its own; leaked ones are never stopped until the supervisor is).
_LEAK_LIMIT: Final = 1_000
#: A tenant's instances wake within this long after the tenant's own wake time.
_TENANT_SPREAD_S: Final = 0.2


@dataclass
class _Setup:
    """How the tenants came to exist, and how fast never-seen tenants start."""

    scan_write: float  #: writing the N folders
    scan_read: float  #: first scan of the N folders, without storing or probing
    rescan: float  #: a rescan of the N unchanged folders
    sample_scan: float  #: the real scan (read, store, probe in a sandbox) of the sample
    register: float  #: storing N - sample code versions and registering them directly
    cal_rate: float  #: calibration: tenants per second that had all their instances run


@dataclass
class _Asleep:
    """The setup of the sleeping instances, and what is alive once they all sleep."""

    reached: bool  #: every instance was asleep before the first timer was due
    waiting: int  #: instances ``waiting`` when counted
    after: float  #: first create -> all waiting (or the setup gave up)
    counted_after: float  #: all waiting -> processes counted
    hold: float  #: first create -> the wake window opens
    width: float  #: the wake window: the first tenant's time -> the last instance's
    cold_starts: int  #: sandboxes spawned during the setup
    evictions: int  #: sandboxes stopped to make room during the setup
    peak_processes: int  #: sandbox processes (existing or being made), sampled
    live_sandboxes: int
    zygote_children: int
    zombies: int
    zygote_alive: bool
    rss: float
    rss_before: float  #: before the first create: nothing waiting, no sandbox
    zygote_rss: float
    tasks: int  #: trio tasks alive with every instance asleep
    tasks_before: int  #: ... before the first create
    task_growth: dict[str, int]  #: tasks by coroutine name: asleep - before, if changed
    runner_processes: int  #: SandboxRunner.processes() when counted


class _Trace(NamedTuple):
    """One sleeper's journal, as the benchmark reads it."""

    asked: float  #: the wake_at it was created with
    wake_at: float  #: the sleep step's wake_at (later if it reached its sleep late)
    ended_at: float  #: the sleep step's ended_at: when a timer round resolved it
    next_started: float  #: the next step's started_at
    completed: float  #: the instance row's updated_at once complete


@dataclass
class _Wake:
    traces: list[_Trace]
    drain: float  #: the wake window opens -> all complete
    cold_starts: int  #: sandboxes spawned during the wake phase
    peak_processes: int
    load: float  #: 1-minute load average when the window opened


@dataclass
class _Restart:
    created: int
    waiting_at_stop: int  #: instances still asleep when the supervisor stopped
    stop: float  #: leaving open_supervisor (s)
    start: float  #: entering open_supervisor again, until it returned (s)
    traces: list[_Trace]  #: the restart population's journals
    opened: float  #: wall clock when open_supervisor was entered again
    samples: int
    peak_running: int  #: Engine.running_count, sampled
    peak_processes: int  #: SandboxRunner.processes(), sampled
    peak_tasks: int
    rss_before: float
    rss_peak: float
    cold_starts: int
    guard: _LeakGuard


class _LeakGuard:
    """Watches the zygote's live children against what the sandbox runner counts.

    ``SandboxRunner.processes()`` is what ``max_sandboxes`` bounds; a sandbox process
    that fell out of the runner's pool is still a child of the zygote. ``check`` (at
    most every 2 s; a psutil scan of the process table) records both peaks and raises
    BenchError once the children exceed max_sandboxes by ``_LEAK_LIMIT``, before
    leaked processes exhaust the machine's memory or pids.
    """

    def __init__(self, runner: SandboxRunner) -> None:
        self._runner = runner
        self._zygote = psutil.Process(runner.zygote.pid)
        self._last = -math.inf
        self.peak_children = 0
        self.peak_counted = 0  #: SandboxRunner.processes() at the same checks

    def check(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if now - self._last < 2.0 and not force:
            return
        self._last = now
        children = sum(_is_alive(c) for c in self._zygote.children())
        counted = self._runner.processes()
        self.peak_children = max(self.peak_children, children)
        self.peak_counted = max(self.peak_counted, counted)
        if children > self._runner.max_sandboxes + _LEAK_LIMIT:
            raise BenchError(
                f"{children} sandbox processes alive (children of the zygote) while the "
                f"runner counts {counted} (max_sandboxes {self._runner.max_sandboxes}): "
                f"sandboxes leak out of the pool; stopped before they exhaust the machine"
            )

    def __str__(self) -> str:
        return (
            f"zygote children alive peak {self.peak_children} while the runner counted at "
            f"most {self.peak_counted} (sampled every 2 s and at the end)"
        )


@benchmark(
    "scale.many_tenants",
    "N tenants x k sleeping instances: processes, tasks, memory, timer lateness, restart",
)
def many_tenants(ctx: BenchContext) -> list[Measurement]:
    """Many tenants with several instances asleep each: what stays alive, how late timers fire.

    Method: a supervisor (no tenant folder of its own) with ``max_sandboxes`` 64,
    ``idle_timeout`` 0.5 s and ``max_concurrency`` 64. That 64 is deliberate, equal to
    ``max_sandboxes``: every activation here needs its tenant's sandbox (a cold start),
    so a slot beyond the 64 sandbox places would hold an activation that only waits in
    ``get_sandbox`` for a place (spawns reserve their place, so the bound holds,
    1013914); the wake -> next step rows would measure that wait instead of the
    dispatcher's queue, and the restart row holds the catch-up to this bound. (The
    default 1000 used to crash the supervisor here: concurrent spawns both waited to
    write the zygote's socket, trio ``BusyResourceError``; fixed in c46b1e4.)

    Tenants: all N are written as folders with the same main.py (so the same version
    hash, stored once per tenant). ``sample`` of them go through the real scan: a
    ``TenantRegistry`` wired like the supervisor's (read, store the version, load it in
    a fresh sandbox, one tenant after another), then join the supervisor's registry.
    That scan costs a cold start per tenant, minutes at 10,000 (the note extrapolates
    it), so the other N - sample are registered directly: their version stored with
    ``put_code_version``, their state put in the registry. The note also times reading
    all N folders (a scan that stores and probes nothing) and a rescan of them unchanged.

    Each tenant gets ``k`` instances, created together in one
    ``Supervisor.binding(t).create_batch`` (in the envelope, one commit), so one cold
    start of the tenant's sandbox serves its k activations; each sleeps until its
    ``wake_at`` and then runs one step. The creates are paced: a tenant's batch goes in
    once at most 2 x max_concurrency instances are created and not yet asleep (queued or
    running, counted per tenant in flight). Reaching the sleep takes a sandbox per
    tenant, so the wake times cannot be relative to the create alone: a calibration
    round (50 tenants x k, paced the same way, run to completion) measures how many
    never-seen tenants per second get all k activations here, and ``hold`` is 1.6x the
    setup time that rate predicts plus idle_timeout + 1.5 s (time to count once the
    sandboxes are gone; 50 tenants predicted up to 1.4x too fast here). A tenant whose
    batch is created ``c`` seconds after the first create wakes ``hold + 1.5 c`` seconds
    after it: the first wake comes once all should be asleep, and the tenants wake in
    the order they were created at two thirds of the rate this machine got them asleep,
    over a window 1.5x the setup's length (the notes give it and the wake rate in
    instances/s). That aims to keep the wakes within what the machine can serve: every
    wake needs the tenant's sandbox again, and once the queue holds more than
    max_sandboxes tenants, the fair dispatcher serves each tenant one instance per turn
    and its sandbox is evicted between turns: a cold start per instance instead of per
    tenant, which slows the drain and so feeds the backlog (woken 5x faster than the
    setup, 300 tenants x 10 took 2,955 cold starts and drained at 67 instances/s; the
    wake is not paced like the setup, so a long enough disturbance can tip it over too,
    and the notes count the cold starts of the wake). A tenant's k instances wake within
    0.2 s after its time, for the same reason. If the setup overruns the hold, the rows
    counted while asleep are skipped: there was no moment when all slept.

    Once every instance is ``waiting`` and the runner has no sandbox left (at most
    idle_timeout + 1 s later, and never later than just before the first wake), this
    reads: the instances waiting, the live sandboxes, the zygote's children, the RSS of
    this process and of the zygote, and the trio tasks alive (walked from
    ``trio.lowlevel.current_root_task()`` through ``child_nurseries`` ->
    ``child_tasks``); the RSS and the task count are also read just before the first
    create (nothing waiting, no sandbox), so the difference is what N x k sleeping
    instances cost. Then all wake, each tenant needing a sandbox again, and the journal
    gives per instance: timer lateness = the sleep step's ``ended_at`` (stamped by the
    engine's timer round when it resolved the timer) - its ``wake_at``; wake -> next
    step = the next step's ``started_at`` (the engine received its StepStarted) -
    ``wake_at``.

    Restart (a smaller population: 200 tenants x k quick, 1,000 x k full): after the
    wake, the same supervisor gives the first tenants k more sleepers each, all due at
    2x the time the main setup's measured rate predicts for them, plus 5 s; once they
    all sleep (creating stops 0.3 s before they are due, in any case) the supervisor is
    stopped (the ``open_supervisor`` context left: engine, sandboxes, zygote), and once
    every one of their timers is overdue a new supervisor opens on the same database. From the
    moment it returns, a trio task samples ``Engine.running_count`` and
    ``SandboxRunner.processes()`` every 2 ms (the trio tasks and the RSS every 20 ms)
    until all have completed: the peak is held to ``max_concurrency``; the journal gives
    the timer rounds that resolved the overdue timers and the time to drain.

    Throughout, the zygote's live children are compared every 2 s with what the runner
    counts (``_LeakGuard``): a sandbox process that fell out of the pool is neither
    bounded by max_sandboxes nor ever stopped when idle, and the benchmark fails (a
    BenchError) once more than 1,000 of them exist rather than exhaust the machine.
    """
    tenants = ctx.size(1_000, 10_000)
    k = ctx.size(3, 10)
    n = tenants * k
    sample = ctx.size(20, 50)
    cal_tenants = 50
    restart_tenants = ctx.size(200, 1_000)
    idle_timeout = 0.5
    max_sandboxes = 64
    max_concurrency = 64  # equal to max_sandboxes on purpose: see the docstring
    budget = 2 * max_concurrency
    rng = random.Random(1234)
    names = [f"t{i:05d}" for i in range(tenants)]
    config = SupervisorConfig(
        tenants_dir=None,  # the tenants are added below, not by the watch loop
        db_url=f"sqlite:///{ctx.workdir / 'tenantflow.db'}",
        max_concurrency=max_concurrency,
        max_sandboxes=max_sandboxes,
        idle_timeout=idle_timeout,
    )

    async def prepare(sv: Supervisor, root: Path) -> tuple[float, float, list[str]]:
        """The sample's real scan, the rest registered directly: (scan s, register s)."""
        scan = TenantRegistry(root / "sample", _persist(sv), sv.probe)
        started = time.perf_counter()
        await scan.refresh()
        sample_scan = time.perf_counter() - started
        sv.registry.tenants.update(scan.tenants)
        for name in names[:sample]:
            sv.require_tenant(name)
        cal_names = [f"cal{i:03d}" for i in range(cal_tenants)]
        started = time.perf_counter()
        await _register(sv, [*names[sample:], *cal_names], {"main.py": SLEEPER})
        return sample_scan, time.perf_counter() - started, cal_names

    async def fall_asleep(
        sv: Supervisor, guard: _LeakGuard, cal_rate: float
    ) -> tuple[_Asleep, float]:
        """Create every sleeper, paced; count what is alive once all sleep."""
        engine, runner = sv.engine, sv.sandboxes
        rss_before, tasks_before = _rss_mib(), _trio_tasks()
        hold = 1.6 * tenants / cal_rate + idle_timeout + 1.5
        first_create = engine.clock.now()
        t0 = time.perf_counter()
        window = first_create + hold
        last = [window]

        def sleepers(tenant_id: str) -> list[Any]:
            """Called as the tenant's batch is created: its wake times follow the setup."""
            base = window + _STRETCH * (engine.clock.now() - first_create)
            wakes = [base + rng.uniform(0.0, _TENANT_SPREAD_S) for _ in range(k)]
            last[0] = max(last[0], *wakes)
            return [{"phase": "main", "wake_at": w} for w in wakes]

        seen: list[int] = []

        async def first_wake() -> None:  # the setup overran the hold: count what sleeps
            seen.append((await _counts(sv)).get("waiting", 0))

        cold, evicted = runner.stats.cold_starts, runner.stats.evictions
        patience = 60 + 10 * tenants / cal_rate  # a bound on a wait, never an expectation
        with trio.move_on_after(patience) as scope:
            reached, peak = await _paced_create(
                sv, names, k, sleepers, budget=budget, guard=guard, deadline=window - 0.3,
                at_deadline=first_wake,
            )  # fmt: skip
        if scope.cancelled_caught:
            raise BenchError(f"setup not done after {patience:.0f} s: {await _counts(sv)}")
        asleep = time.perf_counter()
        waiting = seen[0] if seen else (await _counts(sv)).get("waiting", 0)
        cold, evicted = runner.stats.cold_starts - cold, runner.stats.evictions - evicted
        # Count once idle sandboxes are gone, or just before the first timer fires.
        with (
            trio.move_on_at(trio.current_time() + idle_timeout + 1.0),
            trio.move_on_after(window - engine.clock.now() - 0.2),
        ):
            while True:
                if not runner.processes():
                    break
                await trio.sleep(0.02)
        counted_after = time.perf_counter() - asleep
        tasks = _trio_tasks()
        grown = tasks - tasks_before
        zygote = psutil.Process(runner.zygote.pid)
        children = zygote.children(recursive=True)
        alive = [c for c in children if _is_alive(c)]
        result = _Asleep(
            reached and waiting >= n, waiting, asleep - t0, counted_after, hold,
            last[0] - window, cold,
            evicted, peak, len(runner.live()), len(alive), len(children) - len(alive),
            _is_alive(zygote), _rss_mib(), rss_before, _rss_mib(runner.zygote.pid),
            tasks.total(), tasks_before.total(), {t: c for t, c in grown.items() if c},
            runner.processes(),
        )  # fmt: skip
        return result, window

    async def wake(sv: Supervisor, guard: _LeakGuard, opens_at: float, width: float) -> _Wake:
        """Wait for every sleeper to wake and complete; read their journals."""
        engine, runner = sv.engine, sv.sandboxes
        cold = runner.stats.cold_starts
        load = -1.0
        peak = 0
        closes_at = opens_at + width
        bound = closes_at - engine.clock.now() + 120 + 0.05 * n
        with trio.move_on_after(bound) as scope:
            while True:
                now = engine.clock.now()
                if load < 0 and now >= opens_at:
                    load = os.getloadavg()[0]
                # A count over all rows is O(N): only once nothing runs after the window.
                if (
                    now >= closes_at
                    and engine.running_count == 0
                    and (await _counts(sv)).get("complete", 0) >= n + cal_tenants * k
                ):
                    break
                peak = max(peak, runner.processes())
                guard.check()
                await trio.sleep(0.05)
        if scope.cancelled_caught:
            raise BenchError(f"not all complete after the wake: {await _counts(sv)}")
        guard.check(force=True)
        traces = await engine.read(functools.partial(_sleep_journal, tenants=names, phase="main"))
        if len(traces) != n:
            raise BenchError(f"{len(traces)} journals read for {n} instances")
        drain = max(t.completed for t in traces) - opens_at
        return _Wake(traces, drain, runner.stats.cold_starts - cold, peak, load)

    async def restart_sleepers(sv: Supervisor, guard: _LeakGuard, rate: float) -> tuple[int, float]:
        """k more sleepers for each restart tenant: (waiting at the stop, their wake_at).

        Due 2x the time the main setup's rate (tenants/s) predicts, plus 5 s; creating
        stops just before that, so the supervisor stops before any of them is due.
        """
        engine = sv.engine
        due = engine.clock.now() + 2.0 * restart_tenants / rate + 5.0
        r_names = names[:restart_tenants]
        with trio.move_on_after(due - 0.3 - engine.clock.now()):
            await _paced_create(
                sv,
                r_names,
                k,
                lambda t: [{"phase": "restart", "wake_at": due}] * k,
                budget=budget,
                guard=guard,
            )
        counts = await engine.read(functools.partial(_counts_of, tenants=r_names))
        return sum(c.get("waiting", 0) for c in counts.values()), due

    async def body() -> tuple[_Setup, _Asleep, _Wake, _Restart, str]:
        root = ctx.workdir / "tenants"
        started = time.perf_counter()
        await trio.to_thread.run_sync(_write_folders, root / "all", names, SLEEPER)
        scan_write = time.perf_counter() - started
        scan_read, rescan = await _time_scan(root / "all")
        await trio.to_thread.run_sync(_write_folders, root / "sample", names[:sample], SLEEPER)
        async with open_supervisor(config) as sv:
            runner = sv.sandboxes
            guard = _LeakGuard(runner)
            sample_scan, register, cal_names = await prepare(sv, root)
            # Calibration: how fast do never-seen tenants get all k activations?
            started = time.perf_counter()
            calibrate = [{"calibrate": True}] * k
            await _paced_create(sv, cal_names, k, lambda t: calibrate, budget=budget, guard=guard)
            cal_rate = cal_tenants / (time.perf_counter() - started)
            with trio.move_on_after(30):  # let the calibration sandboxes go idle and away
                while True:
                    if not runner.processes():
                        break
                    await trio.sleep(0.05)
            setup = _Setup(scan_write, scan_read, rescan, sample_scan, register, cal_rate)
            asleep, opens_at = await fall_asleep(sv, guard, cal_rate)
            woke = await wake(sv, guard, opens_at, asleep.width)
            rate = tenants / asleep.after  # measured at this size, unlike the calibration
            waiting_at_stop, due = await restart_sleepers(sv, guard, rate)
            stopping = time.perf_counter()
        stop = time.perf_counter() - stopping
        # Every restart timer overdue: a late sleeper slept 1 s from before the stop.
        await trio.sleep(max(0.0, max(due, time.time() - stop + 1.0) + 0.5 - time.time()))
        restart = await _catch_up(config, names[:restart_tenants], k, waiting_at_stop, stop)
        return setup, asleep, woke, restart, str(guard)

    # A bound on the whole run, never an expectation (the full size takes 15-30 minutes).
    r_setup, r_asleep, r_wake, r_restart, guard_note = trio.run(
        _bounded, body, max(900.0, 0.03 * n)
    )
    return _many_rows(
        r_setup, r_asleep, r_wake, r_restart,
        tenants=tenants, k=k, sample=sample, cal_tenants=cal_tenants,
        max_sandboxes=max_sandboxes, max_concurrency=max_concurrency, idle_timeout=idle_timeout,
        budget=budget, guard=guard_note,
    )  # fmt: skip


async def _catch_up(
    config: SupervisorConfig, tenants: Sequence[str], k: int, waiting_at_stop: int, stop: float
) -> _Restart:
    """Open a supervisor on a database whose sleepers are all overdue; sample the catch-up."""
    opened = time.time()
    started = time.perf_counter()
    async with open_supervisor(config) as sv:
        start = time.perf_counter() - started
        engine, runner = sv.engine, sv.sandboxes
        guard = _LeakGuard(runner)
        rss_before = _rss_mib()
        peaks = {"running": 0, "processes": 0, "tasks": 0, "samples": 0}
        rss_peak = rss_before
        cold = runner.stats.cold_starts

        async def sample() -> None:
            nonlocal rss_peak
            while True:
                peaks["running"] = max(peaks["running"], engine.running_count)
                peaks["processes"] = max(peaks["processes"], runner.processes())
                if peaks["samples"] % 10 == 0:
                    peaks["tasks"] = max(peaks["tasks"], _trio_tasks().total())
                    rss_peak = max(rss_peak, _rss_mib())
                peaks["samples"] += 1
                await trio.sleep(0.002)

        remaining = list(tenants)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            with trio.move_on_after(120 + 0.1 * len(tenants) * k) as scope:
                while True:
                    # The store is read only when nothing runs (at the start, at the end):
                    # a count per tenant left, too costly to repeat during the catch-up.
                    guard.check()
                    if engine.running_count:
                        await trio.sleep(0.01)
                        continue
                    counts = await engine.read(functools.partial(_counts_of, tenants=remaining))
                    for tenant_id, c in counts.items():
                        if c.get("errored") or c.get("terminated"):
                            raise BenchError(f"{tenant_id}'s instances failed: {c}")
                    busy = ("queued", "running", "waiting")
                    remaining = [t for t, c in counts.items() if any(c.get(s) for s in busy)]
                    if not remaining:
                        break
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            raise BenchError(f"the restart did not catch up: {len(remaining)} tenants left")
        guard.check(force=True)
        traces = await engine.read(
            functools.partial(_sleep_journal, tenants=tenants, phase="restart")
        )
        return _Restart(
            len(tenants) * k, waiting_at_stop, stop, start, traces, opened, peaks["samples"],
            peaks["running"], peaks["processes"], peaks["tasks"], rss_before, rss_peak,
            runner.stats.cold_starts - cold, guard,
        )  # fmt: skip


def _many_rows(
    setup: _Setup,
    asleep: _Asleep,
    woke: _Wake,
    restart: _Restart,
    *,
    tenants: int,
    k: int,
    sample: int,
    cal_tenants: int,
    max_sandboxes: int,
    max_concurrency: int,
    idle_timeout: float,
    budget: int,
    guard: str,
) -> list[Measurement]:
    """The rows and notes of ``scale.many_tenants``."""
    n = tenants * k
    width = asleep.width
    name = "scale.many_tenants"
    params = {"tenants": tenants, "instances_per_tenant": k, "instances": n,
              "max_sandboxes": max_sandboxes, "max_concurrency": max_concurrency,
              "idle_timeout_s": idle_timeout,
              "sleep": f"tenant created c s after the first: until hold + {_STRETCH:g} c s;"
                       f" its instances + U(0, {_TENANT_SPREAD_S:g}) s",
              "window_s": round(width, 1), "wake_rate_per_s": round(n / width),
              "restart_instances": restart.created, "clock": "wall"}  # fmt: skip
    late_sleepers = sum(abs(t.wake_at - t.asked) > 1e-6 for t in woke.traces)
    if asleep.reached:
        state = (
            f"{n} instances ({tenants} tenants x {k}) waiting; counted "
            f"{asleep.counted_after:.2f} s after the last went to sleep"
        )
    else:
        state = (
            f"{tenants} tenants x {k}, but only {asleep.waiting} of {n} instances waiting when "
            f"the first timer was due (the setup took longer than the calibration predicted); "
            f"counted {asleep.counted_after:.2f} s later"
        )
    processes = asleep.zygote_children + asleep.zygote_alive
    processes_note = (
        f"{state}: {asleep.live_sandboxes} live sandboxes, {asleep.zygote_children} "
        f"children of the zygote (+{asleep.zombies} zombies) while the runner counted "
        f"{asleep.runner_processes} sandbox processes, zygote "
        f"{'alive' if asleep.zygote_alive else 'GONE'} (so {processes} processes besides "
        f"the supervisor); setup: first create -> all {n} waiting {asleep.after:.1f} s "
        f"({tenants / asleep.after:.0f} tenants/s, {n / asleep.after:.0f} instances/s), "
        f"{asleep.cold_starts} cold starts for {tenants} tenants (each tenant's {k} created "
        f"in one create_batch), {asleep.evictions} sandboxes evicted to make room; "
        f"max_sandboxes {max_sandboxes}, peak {asleep.peak_processes} sandbox processes "
        f"(SandboxRunner.processes(), sampled); {guard} from the calibration to the end of "
        f"the wake; the creates paced to keep at most {budget} instances not yet asleep; "
        f"{late_sleepers} reached their sleep after their wake time (slept 1 s instead)"
    )
    growth = ", ".join(f"{name} {count:+d}" for name, count in asleep.task_growth.items())
    tasks_note = (
        f"trio tasks in this process (walked from trio.lowlevel.current_root_task() "
        f"through child_nurseries -> child_tasks: the supervisor, the engine, the sandbox "
        f"runner, the benchmark's own): {asleep.tasks_before} just before the first create "
        f"(nothing waiting, no sandbox), {asleep.tasks} with {n} instances asleep "
        f"({asleep.tasks - asleep.tasks_before:+d}"
        + (f": by coroutine, {growth})" if growth else ")")
        + f"; while the {restart.created} overdue instances caught up after the restart "
        f"(at most {max_concurrency} running), the peak was {restart.peak_tasks}"
    )
    per_scan = setup.sample_scan / sample
    scan_note = (
        f"tenant folders: writing {tenants} took {setup.scan_write:.1f} s; reading and "
        f"hashing them (TenantRegistry.refresh without storing or probing) "
        f"{setup.scan_read:.2f} s, a rescan of the {tenants} unchanged folders "
        f"{setup.rescan:.2f} s (the watch loop does this every scan_interval, 1 s by "
        f"default); the real scan of {sample} new tenants (read, store the version, load it "
        f"in a fresh sandbox, one after another) took {setup.sample_scan:.2f} s, "
        f"{per_scan * 1000:.0f} ms per tenant, so ~{per_scan * tenants:.0f} s for {tenants}: "
        f"the others were registered directly (put_code_version + registry state) in "
        f"{setup.register:.2f} s"
    )
    rss_note = (
        f"RSS of this process (supervisor, engine, HTTP-less; includes the bench harness) "
        f"with {tenants} tenants registered and {n} instances waiting; zygote RSS "
        f"{asleep.zygote_rss:.1f} MiB; {scan_note}"
    )
    per_instance = (asleep.rss - asleep.rss_before) * 1024 / n
    per_instance_note = (
        f"(RSS with {n} instances asleep {asleep.rss:.1f} MiB - RSS just before the first "
        f"create {asleep.rss_before:.1f} MiB) / {n}; the growth also holds what the setup "
        f"left behind (SQLite's page caches as the database grew, at most 2 MiB per "
        f"connection; memory Python's allocator keeps after {asleep.cold_starts} sandboxes "
        f"and {n} activations)"
    )
    timer_late = [(t.ended_at - t.wake_at) * 1000 for t in woke.traces]
    e2e_late = [(t.next_started - t.wake_at) * 1000 for t in woke.traces]
    rounds = sorted({t.ended_at for t in woke.traces})
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(rounds)] or [0.0]
    load = f"{woke.load:.2f}" if woke.load >= 0 else "?"
    timer_note = (
        f"sleep step ended_at - wake_at over {n} timers; each tenant's time in a "
        f"{width:.1f} s window ({n / width:.0f} instances/s, {tenants / width:.0f} tenants/s: "
        f"the tenants wake in the order they were created, {_STRETCH:g}x as spread out as "
        f"the setup got them asleep), its {k} instances within {_TENANT_SPREAD_S:g} s after "
        f"it: mean "
        f"{statistics.fmean(timer_late):.1f} ms, max {max(timer_late):.1f} ms; the "
        f"engine's timer rounds (the writer's commit thread, on its alarm) resolved them in "
        f"{len(rounds)} rounds (one commit each; ended_at is the round's clock reading), "
        f"{n / len(rounds):.1f} timers per round, median {statistics.median(gaps):.1f} ms "
        f"and max {max(gaps):.0f} ms between rounds, while the event loop started the woken "
        f"instances; load average {load} when the window opened (2 CPUs)"
    )
    e2e_note = (
        f"next step's started_at - wake_at: needs each tenant's sandbox again "
        f"({woke.cold_starts} cold starts in the wake phase for {tenants} tenants, "
        f"{max_concurrency} instances at once, peak {woke.peak_processes} sandbox "
        f"processes), so it is bounded by the cold-start rate: mean "
        f"{statistics.fmean(e2e_late) / 1000:.2f} s, max {max(e2e_late) / 1000:.2f} s; all "
        f"{n} complete {woke.drain:.1f} s after the window opened "
        f"({n / max(woke.drain, 1e-9):.0f} instances/s); calibration: {cal_tenants} "
        f"never-seen tenants x {k} instances, {setup.cal_rate:.0f} tenants/s had all theirs run"
    )
    # Overdue: due before the supervisor reopened, resolved by the reopened one.
    resolved = [
        t for t in restart.traces if t.wake_at < restart.opened and t.ended_at >= restart.opened
    ]
    r_rounds = sorted({t.ended_at for t in resolved})
    if resolved:
        overdue_by = statistics.median(restart.opened - t.wake_at for t in resolved)
        timers_done = (r_rounds[-1] - restart.opened) * 1000
        first_step = min(t.next_started for t in resolved) - restart.opened
        drain = max(t.completed for t in resolved) - restart.opened
    else:
        overdue_by = timers_done = first_step = drain = math.nan
    restart_note = (
        f"{len(restart.traces)} more sleepers ({restart.created // k} tenants x {k}), "
        f"{restart.waiting_at_stop} asleep when the supervisor stopped (leaving "
        f"open_supervisor took {restart.stop:.2f} s); reopened on the same database "
        f"({n + restart.created + cal_tenants * k} instances) once all were overdue "
        f"(median {overdue_by:.1f} s): open_supervisor took {restart.start:.2f} s, then "
        f"{len(resolved)} overdue timers resolved in {len(r_rounds)} rounds (WAKE_BATCH "
        f"500) within {timers_done:.0f} ms of the open; sampled every 2 ms from its return "
        f"({restart.samples} samples): running_count peak {restart.peak_running} "
        f"(max_concurrency {max_concurrency}), sandbox processes peak "
        f"{restart.peak_processes} (max_sandboxes {max_sandboxes}), trio tasks peak "
        f"{restart.peak_tasks}, RSS {restart.rss_before:.1f} -> peak {restart.rss_peak:.1f} "
        f"MiB; {restart.guard}"
    )
    drain_note = (
        f"open_supervisor entered -> all {len(resolved)} overdue instances complete: "
        f"{drain:.1f} s ({len(resolved) / drain:.0f} instances/s through {max_concurrency} "
        f"slots, {restart.cold_starts} cold starts); the first next step started "
        f"{first_step:.2f} s after the open"
    )
    restart_params = {**params, "restart_tenants": restart.created // k}
    if asleep.reached:
        alive = [
            Measurement(name, asleep.live_sandboxes, "", "live sandboxes while asleep", 0,
                        Direction.AT_MOST, processes_note, params),
            Measurement(name, processes, "", "processes while asleep (zygote + children)",
                        params=params),
            Measurement(name, asleep.tasks, "", "trio tasks alive while asleep",
                        notes=tasks_note, params=params),
            Measurement(name, per_instance, "KiB", "RSS per sleeping instance",
                        notes=per_instance_note, params=params),
        ]  # fmt: skip
    else:
        why = (
            f"the setup overran the calibrated hold: {n - asleep.waiting} of {n} not "
            f"asleep when the first timer was due"
        )
        alive = [
            Measurement.skip(name, why, label="live sandboxes while asleep", target=0,
                             direction=Direction.AT_MOST, params=params),
            Measurement.skip(name, why, label="processes while asleep (zygote + children)",
                             params=params),
            Measurement.skip(name, why, label="trio tasks alive while asleep", params=params),
            Measurement.skip(name, why, unit="KiB", label="RSS per sleeping instance",
                             params=params),
        ]  # fmt: skip
    return [
        Measurement(name, asleep.waiting, "", "instances waiting", n, Direction.AT_LEAST,
                    params=params),
        *alive,
        Measurement(name, asleep.rss, "MiB", "supervisor RSS", notes=rss_note, params=params),
        Measurement(name, percentile(timer_late, 50), "ms", "timer lateness p50",
                    notes=timer_note, params=params),
        Measurement(name, percentile(timer_late, 99), "ms", "timer lateness p99", 50,
                    Direction.AT_MOST, params=params),
        Measurement(name, percentile(e2e_late, 50), "ms", "wake -> next step p50",
                    notes=e2e_note, params=params),
        Measurement(name, percentile(e2e_late, 99), "ms", "wake -> next step p99",
                    params=params),
        Measurement(name, restart.peak_running, "", "restart: peak running (overdue timers)",
                    max_concurrency, Direction.AT_MOST, restart_note, restart_params),
        Measurement(name, drain, "s", "restart: catch-up", notes=drain_note,
                    params=restart_params),
    ]  # fmt: skip


async def _bounded(fn: Callable[[], Awaitable[_T]], seconds: float) -> _T:
    """``fn()`` within ``seconds``; an error raised through nurseries comes out unwrapped.

    The harness reports an exception's first line: a BenchError (or the only error)
    says more than "Exceptions from Trio nursery".
    """
    with trio.fail_after(seconds):
        try:
            return await fn()
        except BaseExceptionGroup as group:
            leaves = list(_leaves(group))
            errors = [e for e in leaves if isinstance(e, BenchError)] or leaves
            if len(errors) > 1 and not isinstance(errors[0], BenchError):
                raise
            raise errors[0] from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _trio_tasks() -> collections.Counter[str]:
    """Trio tasks alive in this run by name: the task tree walked from the root task."""
    stack = [trio.lowlevel.current_root_task()]
    names: collections.Counter[str] = collections.Counter()
    while stack:
        task = stack.pop()
        if task is None:
            continue
        names[task.name.rsplit(".", 1)[-1]] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def _is_alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def _paced_create(
    sv: Supervisor,
    tenants: Sequence[str],
    per_tenant: int,
    params: Callable[[str], list[Any]],
    *,
    budget: int,
    guard: _LeakGuard,
    deadline: float = math.inf,
    at_deadline: Callable[[], Awaitable[None]] | None = None,
) -> tuple[bool, int]:
    """Each tenant's instances in one ``create_batch``, at most ``budget`` not yet settled.

    An instance is settled once it is neither queued nor running (asleep, or complete):
    only the tenants in flight are counted (one indexed count each), never all rows. A
    tenant's ``per_tenant`` instances go in once they fit (or when nothing is in
    flight); ``params(tenant)`` is called just before its batch is created. Returns once
    every instance has settled: (settled before ``deadline`` on the engine's clock, peak
    sandbox processes); ``at_deadline`` is awaited once if the deadline passes first.
    BenchError if an instance failed.
    """
    engine, runner = sv.engine, sv.sandboxes
    inflight: dict[str, int] = {}  #: tenant -> its instances not yet settled
    pending = iter(tenants)
    done = False
    missed = False
    peak = 0
    while True:
        if inflight:
            counts = await engine.read(functools.partial(_counts_of, tenants=list(inflight)))
            for tenant_id, c in counts.items():
                if c.get("errored") or c.get("terminated"):
                    raise BenchError(f"{tenant_id}'s instances failed: {c}")
                left = c.get("queued", 0) + c.get("running", 0)
                if left:
                    inflight[tenant_id] = left
                else:
                    del inflight[tenant_id]
        if done and not inflight:
            return not missed, peak
        if not missed and engine.clock.now() >= deadline:
            missed = True
            if at_deadline is not None:
                await at_deadline()
        room = budget - sum(inflight.values())
        batch: list[str] = []
        while not done and (per_tenant <= room or not (inflight or batch)):
            upcoming = next(pending, None)
            if upcoming is None:
                done = True
                break
            batch.append(upcoming)
            room -= per_tenant
        if batch:
            await _create_batches(sv, [(tenant_id, params(tenant_id)) for tenant_id in batch])
            inflight.update((tenant_id, per_tenant) for tenant_id in batch)
        else:
            peak = max(peak, runner.processes())
            guard.check()
            await trio.sleep(0.02)


async def _create_batches(sv: Supervisor, batch: Sequence[tuple[str, list[Any]]]) -> None:
    """``Supervisor.binding(t).create_batch`` of each tenant's params, concurrently."""

    async def one(tenant_id: str, params: list[Any]) -> None:
        result = await sv.binding(tenant_id).create_batch([{"params": p} for p in params])
        if result.errors or len(result.created) != len(params):
            raise BenchError(f"create_batch of {tenant_id}: {result.errors[:1]}")

    async with trio.open_nursery() as nursery:
        for tenant_id, params in batch:
            nursery.start_soon(one, tenant_id, params)


def _counts_of(txn: StoreTxn, tenants: Sequence[str]) -> dict[str, dict[str, int]]:
    return {tenant_id: txn.count_by_status(tenant_id) for tenant_id in tenants}


def _sleep_journal(txn: StoreTxn, tenants: Sequence[str], phase: str) -> list[_Trace]:
    """The traces of the tenants' completed sleepers created with ``{"phase": phase}``."""
    out: list[_Trace] = []
    for tenant_id in tenants:
        for key, _ in txn.list_instances(tenant_id, None, 10_000, None):
            record = txn.get_instance_by_key(key)
            if record is None:
                raise BenchError(f"instance {tenant_id}/{key} is gone")
            params = (record.params or {}).get("params") or {}
            if params.get("phase") != phase:
                continue
            if record.status is not InstanceStatus.COMPLETE:
                raise BenchError(f"instance {record} did not complete")
            steps = txn.load_steps(key)
            nap = next(s for s in steps if s.kind is StepKind.SLEEP)
            after = next(s for s in steps if s.kind is StepKind.DO)
            if nap.status is not StepStatus.COMPLETE:
                raise BenchError(f"sleep step ended {nap.status}")
            assert nap.wake_at is not None
            assert nap.ended_at is not None
            assert after.started_at is not None
            out.append(
                _Trace(
                    params["wake_at"],
                    nap.wake_at,
                    nap.ended_at,
                    after.started_at,
                    record.updated_at,
                )
            )
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
