"""The supervisor's side of sandboxes: the zygote client, sandbox handles, the runner.

::

    SandboxRunner.open_activation(target)          one per running instance
      └─ pool: (tenant, code version) -> Sandbox    LRU, at most max_sandboxes, idle eviction
           └─ Sandbox: pid + pidfd + RPC socket     a reader task routes frames by activation
                └─ spawned by ZygoteClient          fork server started once, before any tenant

Supervision follows trio's ``run_process``: every process is started through a handle
the caller holds, stopped by closing its channel, then SIGKILL after a grace period,
and always reaped (by the zygote, its parent; we wait on a pidfd). A frame that is
oversized, malformed or of an unknown type kills the sandbox; its activations fail
with ``RunnerError`` and the engine retries their steps per policy.
"""

from __future__ import annotations

import array
import collections
import enum
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from runtime._runner import ActivationChannel, Runner, RunnerError, RunTarget

from ._framing import TrioFrames
from .protocol import (
    CHILD_FRAME_LIMIT,
    Abort,
    Activate,
    BindingCall,
    BindingResult,
    Command,
    ErrorInfo,
    Fetch,
    FetchResult,
    LoadCode,
    ProtocolError,
    Ready,
    Reply,
    SandboxFault,
    StepFinished,
    StepStarted,
    Suspended,
    WorkflowFinished,
    decode,
    encode,
)

__all__ = ["SandboxRunner", "SandboxSettings", "ZygoteClient", "open_sandbox_runner"]

log = logging.getLogger("tenantflow.sandbox")
_REPORTED_LAYERS: set[str] = set()
_STOP_GRACE_SECONDS = 2.0
_CPU_CHECK_SECONDS = 0.25
_LOAD_TIMEOUT_SECONDS = 30.0

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)

CodeSource = Callable[[str, str], Awaitable[Mapping[str, str]]]
#: Serves ``env.WORKFLOWS`` calls: (tenant id, code version, method, args) -> result.
BindingHandler = Callable[[str, str, str, dict[str, Any]], Awaitable[Any]]
_MAX_BINDING_CALLS = 64
_NO_BINDING = ErrorInfo("BindingError", "env.WORKFLOWS is not available here", False)


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """Per-tenant limits of a sandbox (SPEC 7 defaults)."""

    memory_mb: int = 512
    cpu_seconds: int = 30
    open_files: int = 64
    layers: tuple[str, ...] | None = None  #: None = every layer


class SandboxState(enum.Enum):
    STARTING = "starting"  #: forked, loading the tenant's code
    READY = "ready"  #: serving activations and requests
    DEAD = "dead"  #: stopped, crashed or killed; never reused


def _cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# the zygote


@dataclass
class _Spawned:
    pid: int
    pidfd: int


class ZygoteClient:
    """The supervisor's handle on the zygote process (the sandboxes' fork server)."""

    def __init__(self, process: trio.Process, sock: trio.socket.SocketType) -> None:
        self._process = process
        self._sock = sock
        self._next_request = 0
        self._pending: dict[int, tuple[trio.Event, list[_Spawned]]] = {}
        # One writer at a time: two tasks waiting to write a full socket is a trio error.
        self._send_lock = trio.Lock()
        self.exit_status: dict[int, int] = {}
        self.pid = process.pid

    @classmethod
    async def start(cls, nursery: trio.Nursery) -> ZygoteClient:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = _PROJECT_ROOT
        env = {"MALLOC_ARENA_MAX": "2", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": root}
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-m", "sandbox._zygote", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=env,
                cwd=root,
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        sock = trio.socket.from_stdlib_socket(parent)
        client = cls(process, sock)
        with trio.fail_after(60):
            data = await sock.recv(65536)
        if not data:
            await process.wait()
            raise RuntimeError(
                f"the sandbox zygote exited with status {process.returncode} while starting "
                "(its error is on the supervisor's stderr)"
            )
        hello = msgpack.unpackb(data, raw=False)
        if hello.get("op") != "ready":
            raise RuntimeError(f"the zygote did not start: {hello!r}")
        nursery.start_soon(client._read_loop)
        return client

    async def _read_loop(self) -> None:
        while True:
            data, ancdata, _, _ = await self._sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            if not data:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            message = msgpack.unpackb(data, raw=False)
            if message.get("op") == "spawned" and len(fds) == 1:
                waiter = self._pending.pop(message["req"], None)
                if waiter is None:
                    os.close(fds[0])
                    continue
                waiter[1].append(_Spawned(message["pid"], fds[0]))
                waiter[0].set()
            elif message.get("op") == "exited":
                self.exit_status[message["pid"]] = message["status"]
                if len(self.exit_status) > 10_000:  # keep the newest only
                    for pid in list(self.exit_status)[:5_000]:
                        del self.exit_status[pid]
            else:
                for fd in fds:
                    os.close(fd)

    async def spawn(
        self, tenant_id: str, settings: SandboxSettings
    ) -> tuple[_Spawned, socket.socket]:
        """Fork a sandbox for ``tenant_id``; returns its pid/pidfd and our end of its channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._next_request += 1
        request = self._next_request
        done = trio.Event()
        result: list[_Spawned] = []
        self._pending[request] = (done, result)
        message: dict[str, Any] = {
            "op": "spawn",
            "req": request,
            "tenant_id": tenant_id,
            "memory_mb": settings.memory_mb,
            "cpu_seconds": settings.cpu_seconds,
            "open_files": settings.open_files,
        }
        if settings.layers is not None:
            message["layers"] = list(settings.layers)
        try:
            async with self._send_lock:
                await self._sock.sendmsg(
                    [msgpack.packb(message)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
                )
        finally:
            theirs.close()
        try:
            with trio.fail_after(30):
                await done.wait()
        except BaseException:
            self._pending.pop(request, None)
            ours.close()
            raise
        return result[0], ours

    async def aclose(self) -> None:
        """Stop the zygote (its children die with it) and reap it."""
        with trio.CancelScope(shield=True):
            self._sock.close()
            if self._process.returncode is None:
                self._process.terminate()
                with trio.move_on_after(_STOP_GRACE_SECONDS):
                    await self._process.wait()
                if self._process.returncode is None:
                    self._process.kill()
                await self._process.wait()


# ---------------------------------------------------------------------------
# one sandbox process


class _SandboxChannel(ActivationChannel):
    """The engine's end of one activation running in a sandbox."""

    def __init__(self, sandbox: Sandbox, activation_id: int) -> None:
        self._sandbox = sandbox
        self._aid = activation_id
        self._send, self._receive = trio.open_memory_channel[Command](math.inf)
        self._failure: RunnerError | None = None
        self._running_steps: set[int] = set()
        self.finished = False

    def deliver(self, command: Command) -> None:
        if isinstance(command, StepStarted):
            self._running_steps.add(command.seq)
        elif isinstance(command, StepFinished):
            self._running_steps.discard(command.seq)
        elif isinstance(command, WorkflowFinished | Suspended):
            self.finished = True
        try:
            self._send.send_nowait(command)
        except trio.ClosedResourceError:
            pass

    def fail(self, failure: RunnerError) -> None:
        self._failure = failure
        self._send.close()

    async def receive(self) -> Command:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._failure or RunnerError("the sandbox ended the activation") from None

    async def reply(self, reply: Reply) -> None:
        await self._sandbox.send(reply)

    async def abort(self, reason: str, *, force: bool = False) -> None:
        # A step running tenant code can only be stopped by killing its process; an
        # activation between steps is told to unwind at its next call.
        if force or self._running_steps:
            self._sandbox.kill(f"aborted: {reason}")
            return
        try:
            await self._sandbox.send(Abort(self._aid))
        except RunnerError:
            pass  # the sandbox is gone already: nothing left to stop (abort never raises)


class Sandbox:
    """One sandbox process serving one (tenant, code version)."""

    def __init__(
        self, key: tuple[str, str], spawned: _Spawned, sock: socket.socket, zygote: ZygoteClient
    ) -> None:
        self.key = key
        self.pid = spawned.pid
        self._pidfd = spawned.pidfd
        self._zygote = zygote
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._frames = TrioFrames(stream, CHILD_FRAME_LIMIT)
        self.state = SandboxState.STARTING
        self.activations: dict[int, _SandboxChannel] = {}
        self._fetches: dict[int, tuple[trio.Event, list[FetchResult]]] = {}
        self._next_fetch = 0
        self.last_used = trio.current_time()
        self.fault: SandboxFault | None = None
        self.death_reason = ""
        self.exited = trio.Event()
        self.binding_handler: BindingHandler | None = None
        self._nursery: trio.Nursery | None = None
        self._binding_calls = 0
        self.cpu_limit = 30.0  #: seconds of CPU it may use without sending a frame
        self.frames_seen = 0  #: frames received (the CPU watchdog's sign of progress)
        self._cpu_mark: float | None = None  #: its CPU time when progress was last seen
        self._frames_at_mark = 0

    def _start_binding_call(self, call: BindingCall) -> None:
        if self.binding_handler is None or self._nursery is None:
            self._nursery_send(BindingResult(call.call_id, False, None, _NO_BINDING))
            return
        if self._binding_calls >= _MAX_BINDING_CALLS:
            error = ErrorInfo(
                "RateLimitedError",
                f"more than {_MAX_BINDING_CALLS} env.WORKFLOWS calls in flight",
                code="rate_limited",
            )
            self._nursery_send(BindingResult(call.call_id, False, None, error))
            return
        self._binding_calls += 1
        self._nursery.start_soon(self._run_binding_call, call)

    def _nursery_send(self, message: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_quietly, message)

    async def _send_quietly(self, message: Any) -> None:
        try:
            await self.send(message)
        except RunnerError:
            pass

    async def _run_binding_call(self, call: BindingCall) -> None:
        assert self.binding_handler is not None
        try:
            value = await self.binding_handler(self.key[0], self.key[1], call.method, call.args)
            result = BindingResult(call.call_id, True, value)
        except Exception as exc:  # every failure goes back to tenant code as data
            code = getattr(exc, "code", None)
            error = ErrorInfo(
                type(exc).__name__,
                str(getattr(exc, "message", exc)),
                False,
                code=code if isinstance(code, str) else None,
            )
            result = BindingResult(call.call_id, False, None, error)
        finally:
            self._binding_calls -= 1
        await self._send_quietly(result)

    @property
    def busy(self) -> bool:
        return self.state is SandboxState.STARTING or bool(self.activations or self._fetches)

    async def load(self, tenant_id: str, code_version: str, files: Mapping[str, str]) -> None:
        """Send the tenant's code and wait for it to load; RunnerError if it cannot."""
        await self.send(LoadCode(tenant_id, code_version, dict(files)))
        try:
            with trio.fail_after(_LOAD_TIMEOUT_SECONDS):
                ready = decode(await self._frames.receive())
        except (EOFError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.kill(f"did not load: {exc}")
            if self.fault is not None:
                # module-level code broke a limit: loading this version will always fail
                error = ErrorInfo("SandboxLimitError", self.fault.message, False, "sandbox.limit")
                raise RunnerError(error.message, error=error, permanent=True) from None
            raise RunnerError(f"the sandbox for {tenant_id!r} failed to start: {exc}") from exc
        if not isinstance(ready, Ready):
            self.kill("protocol violation at start")
            raise RunnerError("the sandbox sent something else than Ready")
        for layer, reason in ready.missing.items():
            if layer not in _REPORTED_LAYERS:
                _REPORTED_LAYERS.add(layer)
                log.warning("sandbox isolation layer %r is not available here: %s", layer, reason)
        if ready.error is not None:
            self.kill("tenant code failed to load")
            raise RunnerError(ready.error.message, error=ready.error, permanent=True)
        self.state = SandboxState.READY

    async def send(self, message: Any) -> None:
        if self.state is SandboxState.DEAD:
            raise RunnerError(f"the sandbox is gone ({self.death_reason})")
        try:
            await self._frames.send(encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.kill(f"channel broken: {exc}")
            raise RunnerError(f"the sandbox is gone ({self.death_reason})") from None

    async def read_loop(self) -> None:
        """Route the child's frames until it dies or breaks the protocol."""
        reason = "exited"
        try:
            while True:
                message = decode(await self._frames.receive())
                self.frames_seen += 1
                if isinstance(message, SandboxFault):
                    self.fault = message
                elif isinstance(message, FetchResult):
                    waiter = self._fetches.pop(message.request_id, None)
                    if waiter is not None:
                        waiter[1].append(message)
                        waiter[0].set()
                elif isinstance(message, BindingCall):
                    self._start_binding_call(message)
                elif isinstance(
                    message, Ready | LoadCode | Activate | Reply | Abort | Fetch | BindingResult
                ):
                    raise ProtocolError(f"the child may not send {type(message).__name__}")
                else:
                    channel = self.activations.get(message.activation_id)
                    if channel is not None:
                        channel.deliver(message)
        except EOFError:
            reason = "exited"
        except ProtocolError as exc:
            reason = f"protocol violation: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"channel broken: {exc}"
        finally:
            self.kill(reason)

    def check_cpu(self) -> None:
        """Kill the sandbox if it burnt more than its CPU limit without a word.

        RLIMIT_CPU's SIGXCPU is only reported by a thread that needs the GIL, which C
        code (a huge ``pow``, a catastrophic regex) can hold for its whole run, and it
        only arms per step. This check, from outside, bounds every such case: CPU spent
        while no frame arrives, in a step, between steps or while loading.
        """
        if self._pidfd < 0 or self.state is SandboxState.DEAD:
            return
        used = _cpu_seconds(self.pid)
        if used is None:
            return
        if self._cpu_mark is None or self.frames_seen != self._frames_at_mark or not self.busy:
            self._cpu_mark, self._frames_at_mark = used, self.frames_seen
            return
        if used - self._cpu_mark > self.cpu_limit + 0.5:
            self.fault = SandboxFault("cpu", f"cpu limit {self.cpu_limit:g} s exceeded")
            self.kill("exceeded its CPU limit")

    def kill(self, reason: str) -> None:
        """SIGKILL the process and fail everything still waiting on it (idempotent)."""
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._mark_dead(reason)

    def _mark_dead(self, reason: str) -> None:
        if self.state is SandboxState.DEAD:
            return
        self.state = SandboxState.DEAD
        self.death_reason = reason
        if self.fault is not None and self.fault.kind != "crash":
            error = ErrorInfo("SandboxLimitError", self.fault.message, code="sandbox.limit")
        elif self.fault is not None:
            error = ErrorInfo("SandboxCrashedError", self.fault.message)
        else:
            error = ErrorInfo("SandboxCrashedError", f"the sandbox {reason}")
        failure = RunnerError(error.message, error=error)
        for channel in self.activations.values():
            channel.fail(failure)
        for done, _ in self._fetches.values():
            done.set()

    async def stop(self) -> None:
        """Stop as trio's ``run_process`` does: ask, then SIGTERM, then SIGKILL; always wait.

        Closing the channel is the request (the child exits at EOF); a child that has
        not gone after half the grace period gets SIGTERM, and SIGKILL after the rest.
        """
        with trio.CancelScope(shield=True):
            if self.state is not SandboxState.DEAD:
                self._mark_dead("stopped")
                await self._frames.aclose()
                with trio.move_on_after(_STOP_GRACE_SECONDS / 2):
                    await self.exited.wait()
                if not self.exited.is_set() and self._pidfd >= 0:
                    try:
                        signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    with trio.move_on_after(_STOP_GRACE_SECONDS / 2):
                        await self.exited.wait()
            self.kill("stopped")  # SIGKILL if it is still there after the grace period
            await self.exited.wait()

    async def watch(self) -> None:
        """Wait for the process to exit (the only waiter on its pidfd), then clean up."""
        try:
            await trio.lowlevel.wait_readable(self._pidfd)
        finally:
            self.kill("exited")
            os.close(self._pidfd)
            self._pidfd = -1
            with trio.CancelScope(shield=True):
                await self._frames.aclose()
            self.exited.set()

    def open_channel(self, activation_id: int) -> _SandboxChannel:
        channel = _SandboxChannel(self, activation_id)
        self.activations[activation_id] = channel
        return channel

    async def fetch(self, request: Fetch) -> FetchResult:
        """Run the tenant's ``fetch`` for one HTTP request."""
        done = trio.Event()
        result: list[FetchResult] = []
        self._next_fetch += 1
        request_id = self._next_fetch
        self._fetches[request_id] = (done, result)
        try:
            await self.send(
                Fetch(
                    request_id,
                    request.method,
                    request.path,
                    request.query,
                    request.headers,
                    request.body,
                )
            )
            await done.wait()
        finally:
            self._fetches.pop(request_id, None)
            self.last_used = trio.current_time()
        if not result:
            raise RunnerError(f"the sandbox {self.death_reason}")
        return result[0]


# ---------------------------------------------------------------------------
# the runner: a pool of sandboxes


@dataclass
class SandboxStats:
    """Counters for /metrics and the benchmarks."""

    cold_starts: int = 0
    evictions: int = 0
    crashes: int = 0
    spawn_seconds: list[float] = field(default_factory=list)


class SandboxRunner(Runner):
    """Runs activations in sandbox processes: one per (tenant, code version), LRU-bounded."""

    def __init__(
        self,
        zygote: ZygoteClient,
        nursery: trio.Nursery,
        code_source: CodeSource,
        *,
        idle_timeout: float = 60.0,
        max_sandboxes: int = 64,
        settings: Callable[[str], SandboxSettings] | None = None,
    ) -> None:
        if max_sandboxes < 1:
            raise ValueError("max_sandboxes must be at least 1")
        self.zygote = zygote
        self._nursery = nursery
        self._code_source = code_source
        self.idle_timeout = idle_timeout
        self.max_sandboxes = max_sandboxes
        self._settings = settings or (lambda tenant_id: SandboxSettings())
        self._sandboxes: collections.OrderedDict[tuple[str, str], Sandbox] = (
            collections.OrderedDict()
        )
        self._starting: dict[tuple[str, str], trio.Event] = {}
        # Processes that count against max_sandboxes without being in the pool: spawns
        # that made room and have not registered yet, and evicted ones still stopping.
        # Without them, many spawns at once all see room and overshoot the bound.
        self._reserved = 0
        self._stopping = 0
        self._became_idle = trio.Event()
        self.stats = SandboxStats()
        self.binding_handler: BindingHandler | None = None

    def live(self) -> list[Sandbox]:
        """Sandboxes alive now, least recently used first."""
        return [s for s in self._sandboxes.values() if s.state is not SandboxState.DEAD]

    def is_warm(self, tenant_id: str) -> bool:
        return any(key[0] == tenant_id for key in self._sandboxes)

    def warm_tenants(self) -> set[str]:
        """Tenants with a sandbox ready to run an activation now."""
        return {key[0] for key, s in self._sandboxes.items() if s.state is SandboxState.READY}

    async def get_sandbox(self, tenant_id: str, code_version: str) -> Sandbox:
        """The live sandbox of this code version, spawning it if needed."""
        key = (tenant_id, code_version)
        while True:
            sandbox = self._sandboxes.get(key)
            if sandbox is not None and sandbox.state is SandboxState.READY:
                self._sandboxes.move_to_end(key)
                sandbox.last_used = trio.current_time()
                return sandbox
            starting = self._starting.get(key)
            if starting is not None:
                # Being spawned by another caller: share it. (Forgetting a sandbox that
                # is still loading once leaked it: out of the pool, never evicted.)
                await starting.wait()
                continue
            if sandbox is not None:
                self._forget(sandbox)  # dead (a loading one always has its event above)
            done = trio.Event()
            self._starting[key] = done
            try:
                return await self._spawn(key)
            finally:
                del self._starting[key]
                done.set()

    def processes(self) -> int:
        """Sandbox processes that exist or are being made: never above max_sandboxes."""
        return len(self.live()) + self._reserved + self._stopping

    async def _spawn(self, key: tuple[str, str]) -> Sandbox:
        await self._make_room()  # reserves a place
        try:
            tenant_id, code_version = key
            files = await self._code_source(tenant_id, code_version)
            started = trio.current_time()
            spawned, sock = await self.zygote.spawn(tenant_id, self._settings(tenant_id))
        finally:
            self._reserved -= 1
            self._signal_idle()
        settings = self._settings(tenant_id)
        sandbox = Sandbox(key, spawned, sock, self.zygote)
        sandbox.cpu_limit = float(settings.cpu_seconds)
        sandbox.binding_handler = self.binding_handler
        sandbox._nursery = self._nursery
        self._sandboxes[key] = sandbox
        try:
            await sandbox.load(tenant_id, code_version, files)
        except BaseException:
            # Reaped here, not by a watcher started earlier: a child that fails to load
            # replies and exits at once, and a watcher would close the channel before
            # its reply (the compile error) was read.
            self._forget(sandbox)
            sandbox.kill("did not load")
            with trio.CancelScope(shield=True):
                await sandbox.watch()
            raise
        self._nursery.start_soon(self._watch, sandbox)
        self.stats.cold_starts += 1
        self.stats.spawn_seconds.append(trio.current_time() - started)
        del self.stats.spawn_seconds[:-1000]
        self._nursery.start_soon(sandbox.read_loop)
        return sandbox

    async def _watch(self, sandbox: Sandbox) -> None:
        """Reap-watch the process; drop it from the pool whenever it exits."""
        await sandbox.watch()
        if sandbox.death_reason != "stopped":
            self.stats.crashes += 1
        self._forget(sandbox)

    def _forget(self, sandbox: Sandbox) -> None:
        if self._sandboxes.get(sandbox.key) is sandbox:
            del self._sandboxes[sandbox.key]
        self._signal_idle()

    def _signal_idle(self) -> None:
        became_idle, self._became_idle = self._became_idle, trio.Event()
        became_idle.set()

    async def _make_room(self) -> None:
        """Wait for (or evict to make) a free place, and reserve it for the caller."""
        while self.processes() >= self.max_sandboxes:
            idle = [s for s in self.live() if not s.busy]
            if idle:
                self.stats.evictions += 1
                await self._stop(idle[0])
                continue
            await self._became_idle.wait()
        self._reserved += 1

    async def _stop(self, sandbox: Sandbox) -> None:
        """Take a sandbox out of the pool and stop it; its place frees once it is gone."""
        self._forget(sandbox)
        self._stopping += 1
        try:
            await sandbox.stop()
        finally:
            self._stopping -= 1
            self._signal_idle()

    @asynccontextmanager
    async def open_activation(
        self, target: RunTarget, activation: Activate
    ) -> AsyncIterator[ActivationChannel]:
        sandbox = await self.get_sandbox(target.tenant_id, target.code_version)
        channel = sandbox.open_channel(activation.activation_id)
        try:
            await sandbox.send(activation)
            yield channel
        finally:
            sandbox.activations.pop(activation.activation_id, None)
            sandbox.last_used = trio.current_time()
            if not channel.finished and sandbox.state is SandboxState.READY:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await sandbox.send(Abort(activation.activation_id))
                    except RunnerError:
                        pass
            self._signal_idle()

    async def evict_idle(self) -> int:
        """Stop every sandbox idle for ``idle_timeout`` seconds; returns how many."""
        now = trio.current_time()
        victims = [s for s in self.live() if not s.busy and now - s.last_used >= self.idle_timeout]
        for sandbox in victims:
            self.stats.evictions += 1
            await self._stop(sandbox)
        return len(victims)

    async def _evict_loop(self) -> None:
        while True:
            await trio.sleep(max(0.01, min(self.idle_timeout / 4, 1.0)))
            await self.evict_idle()

    async def _cpu_watch_loop(self) -> None:
        while True:
            await trio.sleep(_CPU_CHECK_SECONDS)
            for sandbox in list(self._sandboxes.values()):
                sandbox.check_cpu()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for sandbox in list(self._sandboxes.values()):
                await sandbox.stop()
            self._sandboxes.clear()


@asynccontextmanager
async def open_sandbox_runner(
    code_source: CodeSource,
    *,
    idle_timeout: float = 60.0,
    max_sandboxes: int = 64,
    settings: Callable[[str], SandboxSettings] | None = None,
) -> AsyncIterator[SandboxRunner]:
    """Start the zygote and a sandbox runner; stop every sandbox and the zygote on exit."""
    zygote: ZygoteClient | None = None
    try:
        async with trio.open_nursery() as nursery:
            zygote = await ZygoteClient.start(nursery)
            runner = SandboxRunner(
                zygote,
                nursery,
                code_source,
                idle_timeout=idle_timeout,
                max_sandboxes=max_sandboxes,
                settings=settings,
            )
            nursery.start_soon(runner._evict_loop)
            nursery.start_soon(runner._cpu_watch_loop)
            try:
                yield runner
            finally:
                await runner.aclose()
                nursery.cancel_scope.cancel()
    finally:
        if zygote is not None:
            await zygote.aclose()
