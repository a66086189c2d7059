"""Benchmarks through real sandbox processes: zygote, fork, isolation, code load, RPC.

Every sandbox here is the real one: ``open_sandbox_runner`` starts the zygote (a fresh
interpreter that pre-imports everything), each (tenant, code version) is a process forked
from it with every isolation layer this machine offers (uid drop, netns, rlimits,
Landlock, seccomp), and the tenant's code arrives as source strings compiled with
RestrictedPython inside the sandbox. The engine benchmarks run the real engine on it:
``open_store`` of a file in the fresh directory (WAL, ``synchronous=FULL``, group
commit), ``WallClock``.

How the engine is observed: the benchmark wraps the ``SandboxRunner`` in an
``_ObservedRunner`` whose channels note (``perf_counter``) when the engine receives a
``StepStarted`` or the final command of an activation: the moment the engine "sees" a
step start or ``run()`` return, with no store access and no polling. The engine's own
change events fire when an instance is claimed and when a step is recorded, not when a
step starts, and polling ``engine.get`` would add a database read per poll.
"""

from __future__ import annotations

import itertools
import math
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil  # type: ignore[import-untyped]  # no stubs installed
import trio

from runtime import (
    FINISHED_STATUSES,
    ActivationChannel,
    Engine,
    InstanceStatus,
    Runner,
    RunTarget,
    WallClock,
    open_engine,
    open_store,
)
from sandbox._host import SandboxRunner, open_sandbox_runner
from sandbox.protocol import (
    Activate,
    Command,
    Fetch,
    Reply,
    StepFinished,
    StepStarted,
    Suspended,
    WorkflowFinished,
)

from ._core import BenchContext, Direction, Measurement, benchmark, percentile
from .engine_bench import BenchError, run_engine, sqlite_commit_floor

__all__ = [
    "cold_start",
    "concurrent_steps_per_second",
    "memory_per_warm_sandbox",
    "processes_after_idle",
    "rpc_round_trip",
    "sequential_step_overhead",
]

VERSION: Final = "v1"
TENANT: Final = "bench"  #: the tenant of the step benchmarks (engine_bench's name)
ROUNDS: Final = 3
#: Most concurrent activations one sandbox is given (see concurrent_steps_per_second).
PER_SANDBOX: Final = 200
MIB: Final = 1024 * 1024

#: The tenant code of every benchmark: source text, compiled in the sandbox. ``stamp``
#: reads the wall clock (``time`` is not importable by tenant code; ``datetime`` is), so
#: the callbacks' stamps can be compared with each other, not with the host's clock.
TENANT_CODE: Final = """\
import datetime
from tenantflow import WorkflowEntrypoint


def fetch(request, env):
    return {}


def stamp():
    return datetime.datetime.now().timestamp()


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        payload = event.payload or {}
        if payload.get("stamps"):
            for i in range(payload["stamps"]):
                step.do("tick", stamp)
            return payload["stamps"]
        total = 0
        for i in range(payload.get("steps", 1)):
            total = step.do("add", lambda: total + 1)
        return total
"""


async def _same_code(tenant_id: str, version: str) -> Mapping[str, str]:
    """The code source of every tenant: ``TENANT_CODE`` as ``main.py``."""
    return {"main.py": TENANT_CODE}


# ---------------------------------------------------------------------- observing the engine


@dataclass
class _Observer:
    """When the engine received what, per instance id (``perf_counter`` seconds)."""

    opened: dict[str, float] = field(default_factory=dict)  #: open_activation entered
    channel: dict[str, float] = field(default_factory=dict)  #: sandbox ready, Activate sent
    first_step: dict[str, float] = field(default_factory=dict)  #: first StepStarted received
    step_starts: list[float] = field(default_factory=list)  #: every StepStarted, in order
    step_finishes: list[float] = field(default_factory=list)  #: every StepFinished, in order
    replies: list[float] = field(default_factory=list)  #: the engine calls reply()
    replies_sent: list[float] = field(default_factory=list)  #: reply() returns (frame written)
    finished: int = 0  #: activations whose final command the engine received
    _changed: trio.Event = field(default_factory=trio.Event)

    def _bump(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def saw(self, instance_id: str, command: Command) -> None:
        if isinstance(command, StepStarted):
            now = time.perf_counter()
            self.step_starts.append(now)
            if instance_id not in self.first_step:
                self.first_step[instance_id] = now
                self._bump()
        elif isinstance(command, StepFinished):
            self.step_finishes.append(time.perf_counter())
        elif isinstance(command, WorkflowFinished | Suspended):
            self.finished += 1
            self._bump()

    async def wait_first_step(self, instance_id: str) -> float:
        while instance_id not in self.first_step:
            await self._changed.wait()
        return self.first_step[instance_id]

    async def wait_finished(self, count: int) -> None:
        """Return once the engine has received ``count`` final commands in all."""
        while self.finished < count:
            await self._changed.wait()


class _ObservedChannel(ActivationChannel):
    def __init__(self, inner: ActivationChannel, instance_id: str, observer: _Observer) -> None:
        self._inner = inner
        self._iid = instance_id
        self._observer = observer

    async def receive(self) -> Command:
        command = await self._inner.receive()
        self._observer.saw(self._iid, command)
        return command

    async def reply(self, reply: Reply) -> None:
        self._observer.replies.append(time.perf_counter())
        await self._inner.reply(reply)
        self._observer.replies_sent.append(time.perf_counter())

    async def abort(self, reason: str, *, force: bool = False) -> None:
        await self._inner.abort(reason, force=force)


class _ObservedRunner(Runner):
    """The sandbox runner, with the engine's view of each activation noted."""

    def __init__(self, inner: SandboxRunner, observer: _Observer) -> None:
        self.inner = inner
        self._observer = observer

    @asynccontextmanager
    async def open_activation(
        self, target: RunTarget, activation: Activate
    ) -> AsyncIterator[ActivationChannel]:
        iid = activation.instance_id
        self._observer.opened.setdefault(iid, time.perf_counter())
        async with self.inner.open_activation(target, activation) as channel:
            self._observer.channel.setdefault(iid, time.perf_counter())
            yield _ObservedChannel(channel, iid, self._observer)


@dataclass
class _SandboxEngine:
    engine: Engine
    runner: SandboxRunner
    observer: _Observer


@asynccontextmanager
async def sandbox_runner(
    *, idle_timeout: float = 60.0, max_sandboxes: int = 64
) -> AsyncIterator[SandboxRunner]:
    """``open_sandbox_runner`` serving ``TENANT_CODE`` to every tenant.

    If the zygote died meanwhile (every sandbox dies with it), the benchmark fails with
    that rather than with the error of whatever used a sandbox next.
    """
    dead_zygote: int | None = None
    try:
        async with open_sandbox_runner(
            _same_code, idle_timeout=idle_timeout, max_sandboxes=max_sandboxes
        ) as runner:
            try:
                yield runner
            except Exception:
                if not _alive(runner.zygote.pid):
                    dead_zygote = runner.zygote.pid
                raise
    except Exception as exc:
        if dead_zygote is not None:
            raise BenchError(
                f"the sandbox zygote (pid {dead_zygote}) died during the benchmark"
            ) from exc
        raise


@asynccontextmanager
async def sandbox_engine(
    workdir: Path, *, idle_timeout: float = 60.0, max_sandboxes: int = 64
) -> AsyncIterator[_SandboxEngine]:
    """A real engine on ``workdir/tenantflow.db`` over real sandboxes running ``TENANT_CODE``."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    store = open_store(str(workdir / "tenantflow.db"))
    try:
        async with sandbox_runner(idle_timeout=idle_timeout, max_sandboxes=max_sandboxes) as runner:
            observer = _Observer()
            observed = _ObservedRunner(runner, observer)
            async with open_engine(store, observed, clock=WallClock()) as engine:
                yield _SandboxEngine(engine, runner, observer)
    finally:
        store.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not gone, not a zombie)."""
    try:
        return _is_alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


async def _stop_idle(runner: SandboxRunner) -> None:
    """Stop every sandbox not in use (and wait for it to exit)."""
    for sandbox in runner.live():
        if not sandbox.busy:
            await sandbox.stop()


async def _run_one(env: _SandboxEngine, tenant_id: str, params: Any = None) -> str:
    """Create an instance, wait for ``run()`` to return, then for its final commit."""
    expected = env.observer.finished + 1
    iid, _ = await env.engine.create(tenant_id, params=params, code_version=VERSION)
    await env.observer.wait_finished(expected)
    await _wait_complete(env.engine, tenant_id, iid)
    return iid


async def _wait_complete(engine: Engine, tenant_id: str, iid: str) -> None:
    """Wait until the instance finishes; raise BenchError unless it completed."""
    status = await engine.wait_for_status(tenant_id, iid, FINISHED_STATUSES)
    if status is not InstanceStatus.COMPLETE:
        view = await engine.get(tenant_id, iid)
        raise BenchError(f"instance {iid} ended {status.value}: {view.record.error}")


# ---------------------------------------------------------------------- 1. cold start


@benchmark(
    "sandbox.cold_start",
    "request to first step running in a never-seen tenant's fresh sandbox, p50/p99",
)
def cold_start(ctx: BenchContext) -> list[Measurement]:
    """Cold start of a sandbox, measured two ways, over ``n`` distinct tenants each.

    (a) ``get_sandbox``: ``SandboxRunner.get_sandbox(tenant, version)`` of a never-seen
    tenant, from the call to its return: the zygote forks, the child isolates itself,
    receives the tenant's source, compiles it with RestrictedPython and loads it, and
    answers ``Ready``. The pure cold start, no engine.

    (b) through the engine: ``engine.create`` of an instance of a never-seen tenant, from
    the call to the moment the engine receives the instance's first ``StepStarted``: the
    creation's commit, the dispatcher's read, the claim's commit, the cold start (a),
    the ``Activate``, the child's activation thread starting ``run()`` up to its first
    ``step.do``. Each instance runs to completion before the next is created. (A sandbox
    may hold a one-way ``StepStarted`` for a few ms to send it with its next frame; for
    this trivial step the two then arrive together, and (b) ends when the engine learns
    that the first step ran.)

    Between two measurements (untimed), every idle sandbox is stopped, so each cold start
    runs next to no other sandbox and never pays for an eviction. Three untimed cold
    starts of each kind come first. The notes break (b) down by medians.
    """
    n = ctx.size(50, 300)
    warmup = 3

    @dataclass
    class _Result:
        direct: list[float]
        engine: list[float]
        parts: dict[str, list[float]]
        spawn_stats: list[float]

    async def body() -> _Result:
        direct: list[float] = []
        engine_ms: list[float] = []
        parts: dict[str, list[float]] = {"commit": [], "claim": [], "sandbox": [], "first": []}
        async with sandbox_engine(ctx.workdir, max_sandboxes=n + warmup + 4) as env:
            for i in range(warmup + n):
                start = time.perf_counter()
                await env.runner.get_sandbox(f"cold-a-{i}", VERSION)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    direct.append(elapsed * 1000)
                await _stop_idle(env.runner)
            spawn_stats = [s * 1000 for s in env.runner.stats.spawn_seconds[warmup:]]
            obs = env.observer
            for i in range(warmup + n):
                tenant = f"cold-b-{i}"
                expected = obs.finished + 1
                start = time.perf_counter()
                iid, _ = await env.engine.create(tenant, params={"steps": 1}, code_version=VERSION)
                created = time.perf_counter()
                first = await obs.wait_first_step(iid)
                if i >= warmup:
                    engine_ms.append((first - start) * 1000)
                    parts["commit"].append((created - start) * 1000)
                    parts["claim"].append((obs.opened[iid] - created) * 1000)
                    parts["sandbox"].append((obs.channel[iid] - obs.opened[iid]) * 1000)
                    parts["first"].append((first - obs.channel[iid]) * 1000)
                await obs.wait_finished(expected)
                await _wait_complete(env.engine, tenant, iid)
                await _stop_idle(env.runner)
        return _Result(direct, engine_ms, parts, spawn_stats)

    result: _Result = run_engine(body)
    med = {k: statistics.median(v) for k, v in result.parts.items()}
    params = {"cold_starts": n, "warmup": warmup, "tenant_code_lines": TENANT_CODE.count("\n")}
    name = "sandbox.cold_start"
    direct_note = (
        f"get_sandbox of {n} never-seen tenants (fork from the zygote, isolation, "
        f"RestrictedPython compile + load of a {params['tenant_code_lines']}-line main.py, "
        f"Ready): mean {statistics.fmean(result.direct):.2f} ms, max "
        f"{max(result.direct):.2f} ms; the runner's own spawn_seconds p50 "
        f"{percentile(result.spawn_stats, 50):.2f} ms"
    )
    engine_note = (
        f"engine.create of a never-seen tenant's instance -> the engine receives its first "
        f"StepStarted, over {n}: mean {statistics.fmean(result.engine):.2f} ms, max "
        f"{max(result.engine):.2f} ms; medians of the parts: create commit "
        f"{med['commit']:.2f} ms, dispatch + claim commit {med['claim']:.2f} ms, cold start + "
        f"Activate {med['sandbox']:.2f} ms, Activate -> first StepStarted {med['first']:.2f} ms"
    )
    return [
        Measurement(
            name,
            percentile(result.direct, 50),
            "ms",
            "get_sandbox p50",
            5,
            Direction.AT_MOST,
            direct_note,
            params,
        ),
        Measurement(
            name,
            percentile(result.direct, 99),
            "ms",
            "get_sandbox p99",
            20,
            Direction.AT_MOST,
            params=params,
        ),
        Measurement(
            name,
            percentile(result.engine, 50),
            "ms",
            "create->step p50",
            5,
            Direction.AT_MOST,
            engine_note,
            params,
        ),
        Measurement(
            name,
            percentile(result.engine, 99),
            "ms",
            "create->step p99",
            20,
            Direction.AT_MOST,
            params=params,
        ),
    ]


# ---------------------------------------------------------------------- 2. memory


@dataclass(frozen=True, slots=True)
class _Memory:
    rss: float
    pss: float
    uss: float


def _memory_of(pid: int) -> _Memory:
    """RSS, PSS and USS (MiB) of a process (reads its smaps: root for another uid)."""
    info = psutil.Process(pid).memory_full_info()
    return _Memory(info.rss / MIB, info.pss / MIB, info.uss / MIB)


@benchmark(
    "sandbox.memory_per_warm_sandbox",
    "RSS, PSS and USS of a warm idle sandbox after running a workflow, and of the zygote",
)
def memory_per_warm_sandbox(ctx: BenchContext) -> list[Measurement]:
    """Memory of warm idle sandboxes, averaged over ``n``.

    Method: ``n`` tenants each run one instance of 10 trivial steps to completion
    through the engine, so ``n`` sandboxes are warm (code loaded, one activation run,
    its thread gone) and idle. Then psutil's ``memory_full_info()`` (smaps_rollup) of
    each sandbox and of the zygote. PSS counts each shared page divided among the
    processes sharing it: the ``n`` sandboxes share the zygote's pages copy-on-write,
    so PSS depends on ``n`` (more sandboxes, smaller shares); USS is what each sandbox
    alone costs (freed if it exits); RSS counts shared pages in full.
    """
    n = ctx.size(20, 50)

    async def body() -> tuple[list[_Memory], _Memory]:
        async with sandbox_engine(ctx.workdir, max_sandboxes=n + 4) as env:
            for i in range(n):
                await _run_one(env, f"mem-{i}", {"steps": 10})
            live = env.runner.live()
            if len(live) != n:
                raise BenchError(f"{len(live)} sandboxes alive after running {n} tenants")
            await trio.sleep(0.05)  # let the activation threads' exits settle
            sandboxes = [_memory_of(s.pid) for s in live]
            return sandboxes, _memory_of(env.runner.zygote.pid)

    sandboxes, zygote = run_engine(body)
    rss = statistics.fmean(m.rss for m in sandboxes)
    pss = statistics.fmean(m.pss for m in sandboxes)
    uss = statistics.fmean(m.uss for m in sandboxes)
    params = {"sandboxes": n, "steps_per_instance": 10}
    name = "sandbox.memory_per_warm_sandbox"
    notes = (
        f"mean over {n} warm idle sandboxes (each ran one 10-step instance), which share the "
        f"zygote's pages with it and with each other; PSS range "
        f"{min(m.pss for m in sandboxes):.2f}-{max(m.pss for m in sandboxes):.2f} MiB, "
        f"USS range {min(m.uss for m in sandboxes):.2f}-{max(m.uss for m in sandboxes):.2f} "
        f"MiB; zygote RSS {zygote.rss:.1f} MiB, PSS {zygote.pss:.2f} MiB, USS "
        f"{zygote.uss:.2f} MiB; all {n} sandboxes + zygote: PSS "
        f"{sum(m.pss for m in sandboxes) + zygote.pss:.1f} MiB"
    )
    return [
        Measurement(name, pss, "MiB", "PSS", 10, Direction.AT_MOST, notes, params),
        Measurement(name, uss, "MiB", "USS", params=params),
        Measurement(name, rss, "MiB", "RSS", params=params),
        Measurement(name, zygote.pss, "MiB", "zygote PSS", params=params),
    ]


# ---------------------------------------------------------------------- 3. RPC round trip


@benchmark(
    "sandbox.rpc_round_trip",
    "one request/response round trip host <-> sandbox (Sandbox.fetch of a trivial fetch)",
)
def rpc_round_trip(ctx: BenchContext) -> list[Measurement]:
    """Round trip of one request through a warm sandbox, no engine.

    Method: ``Sandbox.fetch`` of a ``fetch(request, env)`` that returns ``{}``, ``n``
    times one after another (after ``n / 10`` untimed ones), timed with
    ``perf_counter`` around each call. One round trip is: the host encodes a ``Fetch``
    frame and writes it to the AF_UNIX socket; the sandbox's main thread reads and
    decodes it and starts a thread for it; that thread builds the request object, calls
    the tenant's (RestrictedPython) ``fetch``, JSON-encodes its ``{}``, encodes and
    writes a ``FetchResult``; the host's reader task decodes it and wakes the caller.
    So it includes a thread start and the tenant's call, not only the transport.
    """
    n = ctx.size(2_000, 10_000)
    warmup = max(100, n // 10)
    request = Fetch(0, "GET", "/", {}, {}, b"")

    async def body() -> tuple[list[float], list[float]]:
        async with sandbox_runner() as runner:
            sandbox = await runner.get_sandbox("rpc", VERSION)
            for _ in range(warmup):
                await sandbox.fetch(request)
            times: list[float] = []
            for _ in range(n):
                start = time.perf_counter()
                result = await sandbox.fetch(request)
                times.append((time.perf_counter() - start) * 1e6)
            if result.status != 200 or result.body != b"{}":
                raise BenchError(f"fetch answered {result!r}")
        return times, await _transport_floor(n)

    times, floor = run_engine(body)
    params = {"round_trips": n, "warmup": warmup}
    name = "sandbox.rpc_round_trip"
    notes = (
        f"{n} sequential Sandbox.fetch calls of a tenant fetch returning {{}}: mean "
        f"{statistics.fmean(times):.0f} µs, max {max(times):.0f} µs; each includes a thread "
        f"start in the sandbox, the RestrictedPython fetch call and json.dumps of its result, "
        f"plus msgpack encode/decode and the host's reader task; floor: 8 bytes from trio to a "
        f"bare echo process and back over the same kind of socket take p50 "
        f"{percentile(floor, 50):.0f} µs, p99 {percentile(floor, 99):.0f} µs"
    )
    return [
        Measurement(name, percentile(times, 50), "µs", "p50", 50, Direction.AT_MOST, notes, params),
        Measurement(name, percentile(times, 99), "µs", "p99", params=params),
    ]


_ECHO = """\
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while data := sock.recv(64):
    sock.sendall(data)
"""


async def _transport_floor(n: int) -> list[float]:
    """``n`` round trips (µs) of 8 bytes: trio here, a plain echo process over AF_UNIX.

    The transport floor under ``Sandbox.fetch``: the same socket type and the same trio
    stream on this side, a bare ``recv``/``sendall`` loop in another process (``python
    -I -S``) on the other, no framing, no msgpack, no thread.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-S", "-c", _ECHO, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    times: list[float] = []
    try:
        for _ in range(n // 10):  # warm up
            await stream.send_all(b"12345678")
            await stream.receive_some(64)
        for _ in range(n):
            start = time.perf_counter()
            await stream.send_all(b"12345678")
            await stream.receive_some(64)
            times.append((time.perf_counter() - start) * 1e6)
    finally:
        await stream.aclose()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    return times


# ---------------------------------------------------------------------- 4. processes after idle


@benchmark(
    "sandbox.processes_after_idle",
    "sandbox processes left after every tenant went idle past idle_timeout",
)
def processes_after_idle(ctx: BenchContext) -> list[Measurement]:
    """Processes left once every tenant is idle.

    Method: a runner with ``idle_timeout=0.2`` s; ``n`` tenants each run one instance
    to completion through the engine (``n`` sandboxes). From the moment the last one
    completes, wait ``idle_timeout`` + 0.5 s (the eviction loop looks every
    ``idle_timeout / 4``), then count the runner's live sandboxes and the zygote's
    child processes (psutil, zombies counted separately). The note gives how long after
    the last completion the zygote had no child left.
    """
    n = ctx.size(20, 100)
    idle_timeout = 0.2
    margin = 0.5

    async def body() -> tuple[int, int, int, int, float | None]:
        async with sandbox_engine(
            ctx.workdir, idle_timeout=idle_timeout, max_sandboxes=n + 4
        ) as env:
            for i in range(n):
                await _run_one(env, f"idle-{i}", {"steps": 3})
            peak = env.runner.stats.cold_starts
            last = time.perf_counter()
            zygote = psutil.Process(env.runner.zygote.pid)
            empty_after: float | None = None
            while (elapsed := time.perf_counter() - last) < idle_timeout + margin:
                if empty_after is None and not _live_children(zygote):
                    empty_after = elapsed
                await trio.sleep(0.01)
            children = zygote.children(recursive=True)
            alive = [c for c in children if _is_alive(c)]
            return (
                len(env.runner.live()),
                len(alive),
                len(children) - len(alive),
                peak,
                (empty_after),
            )

    live, alive, zombies, peak, empty_after = run_engine(body)
    params = {"tenants": n, "idle_timeout_s": idle_timeout, "waited_s": idle_timeout + margin}
    name = "sandbox.processes_after_idle"
    gone = (
        f"the zygote had no child left {empty_after * 1000:.0f} ms after the last completion"
        if empty_after is not None
        else "the zygote still had children at the end"
    )
    notes = (
        f"{n} tenants ran one instance each ({peak} sandboxes spawned); "
        f"{idle_timeout + margin:.1f} s after the last completed (idle_timeout "
        f"{idle_timeout} s): {live} live sandboxes, {alive} children of the zygote "
        f"(+{zombies} zombies); {gone}; the zygote itself stays"
    )
    return [
        Measurement(name, live, "", "live sandboxes", 0, Direction.AT_MOST, notes, params),
        Measurement(name, alive, "", "zygote children", 0, Direction.AT_MOST, params=params),
    ]


def _is_alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _live_children(process: psutil.Process) -> list[psutil.Process]:
    return [c for c in process.children(recursive=True) if _is_alive(c)]


# ---------------------------------------------------------------------- 5. step overhead


@benchmark(
    "sandbox.sequential_step_overhead",
    "per-step durable overhead of one instance running trivial steps in a real sandbox",
)
def sequential_step_overhead(ctx: BenchContext) -> list[Measurement]:
    """``engine.sequential_step_overhead`` through a real sandbox.

    Method: one instance runs ``steps`` trivial ``step.do`` calls in its tenant's
    sandbox; each callback returns the sandbox's wall clock
    (``datetime.now().timestamp()``, µs resolution; tenant code cannot import ``time``),
    recorded as the step's output. The gap between consecutive stamps is one whole
    durable step cycle across the process boundary: ``StepFinished`` to the engine over
    the socket, one commit (nothing to group with), the ``Reply`` back, the next
    ``step.do`` starts. The sandbox is warmed first (one untimed instance).

    The note splits the cycle as the engine sees it (``perf_counter`` in the observed
    channel; medians of each part, so they add up only roughly): ``StepStarted`` ->
    ``StepFinished`` received (the callback, its result encoded and sent, read and
    decoded here), ``StepFinished`` -> ``reply()`` (the engine records the step: one
    group commit, one fsync), the ``Reply`` frame written, and the frame written -> next
    ``StepStarted`` received (the sandbox reads and routes the reply to the activation
    thread, ``step.do`` returns, the next one sends ``StepStarted``). Then the wall time
    per step and the floor: a bare SQLite commit on the same disk.
    """
    steps = ctx.size(1_000, 5_000)

    @dataclass
    class _Result:
        stamps: list[float]
        started: list[float]
        finished: list[float]
        replied: list[float]
        sent: list[float]
        wall: float
        per_commit: float

    async def body() -> _Result:
        async with sandbox_engine(ctx.workdir) as env:
            await _run_one(env, TENANT, {"steps": 1})
            obs = env.observer
            marks = (
                len(obs.step_starts),
                len(obs.step_finishes),
                len(obs.replies),
                len(obs.replies_sent),
            )
            units = (env.engine.writer.commits, env.engine.writer.units)
            start = time.perf_counter()
            iid = await _run_one(env, TENANT, {"stamps": steps})
            wall = time.perf_counter() - start
            commits = env.engine.writer.commits - units[0]
            written = env.engine.writer.units - units[1]
            view = await env.engine.get(TENANT, iid)
            return _Result(
                [float(s.output) for s in view.steps],
                obs.step_starts[marks[0] :],
                obs.step_finishes[marks[1] :],
                obs.replies[marks[2] :],
                obs.replies_sent[marks[3] :],
                wall,
                written / commits if commits else 0.0,
            )

    r: _Result = run_engine(body)
    counts = {len(r.stamps), len(r.started), len(r.finished), len(r.replied), len(r.sent)}
    if counts != {steps}:
        raise BenchError(f"expected {steps} stamps, starts, finishes and replies: {counts}")
    floor_p50, floor_p99 = sqlite_commit_floor(ctx.workdir)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(r.stamps)]

    def med(ends: list[float], begins: list[float]) -> float:
        return statistics.median((e - b) * 1000 for e, b in zip(ends, begins, strict=False))

    host_gaps = [(b - a) * 1000 for a, b in itertools.pairwise(r.started)]
    params = {"steps": steps, "runner": "sandbox", "clock": "wall"}
    notes = (
        f"mean {statistics.fmean(gaps):.3f} ms, max {max(gaps):.2f} ms over {len(gaps)} gaps "
        f"between the sandbox's callback stamps; as the engine sees it (StepStarted every p50 "
        f"{percentile(host_gaps, 50):.3f} ms), medians: StepStarted -> StepFinished received "
        f"{med(r.finished, r.started):.3f} ms, StepFinished -> reply (record + commit) "
        f"{med(r.replied, r.finished):.3f} ms, Reply written {med(r.sent, r.replied):.3f} ms, "
        f"Reply written -> next StepStarted received {med(r.started[1:], r.sent):.3f} ms; wall "
        f"{r.wall * 1000 / steps:.3f} ms/step incl. create, start and finish; "
        f"{r.per_commit:.2f} units per commit; floor: a bare SQLite commit here takes p50 "
        f"{floor_p50:.3f} ms, p99 {floor_p99:.3f} ms"
    )
    name = "sandbox.sequential_step_overhead"
    return [
        Measurement(name, percentile(gaps, 50), "ms", "p50", 0.5, Direction.AT_MOST, notes, params),
        Measurement(name, percentile(gaps, 99), "ms", "p99", params=params),
    ]


@benchmark(
    "sandbox.concurrent_steps_per_second",
    "durable steps per second, many instances running at once in a real sandbox",
)
def concurrent_steps_per_second(ctx: BenchContext) -> list[Measurement]:
    """``engine.concurrent_steps_per_second`` through real sandboxes.

    Method: ``instances`` instances of ``steps`` trivial steps each, created concurrently
    (one trio task each). Quick mode: one tenant, so one sandbox process with every
    activation a thread in it. A sandbox holds at most ``PER_SANDBOX`` (200) of them:
    each activation thread reserves a 2 MiB stack against the sandbox's 512 MiB address
    space limit, and a sandbox running ~400 at once crashes when a thread cannot start.
    So larger sizes spread the instances round-robin over ``instances / PER_SANDBOX``
    tenants (full: 5 sandboxes). The sandboxes are spawned before the clock starts
    (steady state, not cold starts). The clock runs from just before the first create to
    the moment the last instance is seen complete; steps/s = instances x steps / that
    time. ``ROUNDS`` rounds, each on a fresh engine, database and zygote; the row is the
    median round; the note gives units per commit over the rounds.
    """
    instances = ctx.size(200, 1_000)
    steps = 10
    tenants = [f"{TENANT}-{k}" for k in range(math.ceil(instances / PER_SANDBOX))]

    def one_round(workdir: Path) -> tuple[float, int, int]:
        async def body() -> tuple[float, int, int]:
            async with sandbox_engine(workdir) as env:
                engine = env.engine
                for tenant in tenants:
                    await env.runner.get_sandbox(tenant, VERSION)
                ids: list[tuple[str, str]] = []

                async def create(tenant: str) -> None:
                    iid, _ = await engine.create(
                        tenant, params={"steps": steps}, code_version=VERSION
                    )
                    ids.append((tenant, iid))

                before = (engine.writer.commits, engine.writer.units)
                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for i in range(instances):
                        nursery.start_soon(create, tenants[i % len(tenants)])
                await env.observer.wait_finished(instances)
                for tenant, iid in ids:
                    await _wait_complete(engine, tenant, iid)
                wall = time.perf_counter() - start
                view = await engine.get(*ids[-1])
                if view.record.output != steps:
                    raise BenchError(f"expected output {steps}, got {view.record.output!r}")
                if env.runner.stats.cold_starts != len(tenants):
                    raise BenchError(
                        f"{env.runner.stats.cold_starts} sandboxes for {len(tenants)} tenants"
                    )
                return (
                    wall,
                    engine.writer.units - before[1],
                    engine.writer.commits - before[0],
                )

        result: tuple[float, int, int] = run_engine(body)
        return result

    rounds = [one_round(ctx.workdir / f"round{i}") for i in range(ROUNDS)]
    total = instances * steps
    rates = sorted(total / wall for wall, _, _ in rounds)
    units = sum(r[1] for r in rounds)
    commits = sum(r[2] for r in rounds)
    where = "one warm sandbox" if len(tenants) == 1 else f"{len(tenants)} warm sandboxes"
    return [
        Measurement(
            "sandbox.concurrent_steps_per_second",
            statistics.median(rates),
            "steps/s",
            target=5_000,
            direction=Direction.AT_LEAST,
            notes=(
                f"median of {ROUNDS} rounds of {instances} instances x {steps} steps in {where} "
                f"(rounds: {', '.join(f'{r:,.0f}' for r in rates)} steps/s); "
                f"{units / commits:.1f} units per commit ({units} units / {commits} commits)"
            ),
            params={
                "instances": instances,
                "steps_per_instance": steps,
                "rounds": ROUNDS,
                "rounds_steps_per_second": rates,
                "units_per_commit": units / commits,
                "runner": "sandbox",
                "tenants": len(tenants),
            },
        )
    ]
