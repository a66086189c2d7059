"""Code that runs inside a sandbox process, and nowhere else.

A sandbox is forked from the zygote, isolates itself (``_oslayers``), then serves one
tenant's code version over its RPC socket::

    host                                   this process
    LoadCode(files) ───────────────────▶   compile_tenant + load_tenant (RestrictedPython)
                    ◀───────────────────   Ready(error?, missing layers)
    Activate ──────────────────────────▶   a thread runs Executor(run(event, step))
                    ◀───────────────────   StepStarted / StepFinished / ... (commands)
    Reply / Abort ─────────────────────▶   routed to the activation's thread
    Fetch ─────────────────────────────▶   a thread runs fetch(request, env)
                    ◀───────────────────   FetchResult

The main thread only reads frames. When the host closes the socket, the process exits.
A limit broken in a way Python cannot report (CPU time) is announced with a
``SandboxFault`` frame just before the process dies.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from . import _executor, sdk
from ._executor import Executor, ReplyMailbox
from ._framing import SyncFrames
from ._restricted import TenantCompileError, compile_tenant, load_tenant
from ._stubs import WorkflowsStub, raise_binding_error
from .protocol import (
    HOST_FRAME_LIMIT,
    Abort,
    Activate,
    BindingCall,
    BindingResult,
    Command,
    ErrorInfo,
    Fetch,
    FetchResult,
    LoadCode,
    LogLine,
    Ready,
    Reply,
    SandboxFault,
    StepStarted,
    decode,
    encode,
)

__all__ = ["SandboxLimits", "serve"]

#: Each activation runs on its own thread; a small stack keeps 100 threads well inside
#: the address-space limit (RLIMIT_AS counts reserved stacks).
_THREAD_STACK_BYTES = 2 * 1024 * 1024
#: How long a one-way frame (a step started, a log line) may wait for company.
_FLUSH_SECONDS = 0.005
_RECURSION_LIMIT = 400


class SandboxLimits:
    """The limits the child reports by name when tenant code breaks them."""

    def __init__(self, memory_mb: int, cpu_seconds: int) -> None:
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds


class _ChildPort(ReplyMailbox):
    """An activation's end inside the sandbox: frames out, replies routed back by ``seq``."""

    def __init__(self, child: _Child) -> None:
        super().__init__()
        self._child = child

    def notify(self, command: Command) -> None:
        self.check_open()
        if isinstance(command, StepStarted):
            # Sent at once, not batched: tenant code in C may hold the GIL from here on,
            # and the host must know a step is running if it has to kill the process.
            self._child.start_cpu_budget()
            self._child.send(command)
        elif isinstance(command, LogLine):
            self._child.send_later(command)
        else:
            self._child.send(command)

    def request(self, command: Command) -> Reply:
        self.notify(command)
        return self.wait_reply(getattr(command, "seq", -1))


class _Request:
    """The ``request`` a tenant's ``fetch`` receives."""

    def __init__(self, message: Fetch) -> None:
        self.method = message.method
        self.path = message.path
        self.query = dict(message.query)
        self.headers = dict(message.headers)
        self.body = message.body

    def json(self) -> Any:
        import json

        return json.loads(self.body or b"null")


class _Env:
    """The ``env`` tenant code sees: ``env.WORKFLOWS`` is a stub of RPC calls."""

    def __init__(self, workflows: WorkflowsStub) -> None:
        self.WORKFLOWS = workflows


class _Child:
    def __init__(self, frames: SyncFrames, limits: SandboxLimits) -> None:
        self._frames = frames
        self._limits = limits
        self._ports: dict[int, _ChildPort] = {}
        self._namespace: Mapping[str, object] = {}
        self._env = _Env(WorkflowsStub(self.call_binding))
        self._calls: dict[int, tuple[threading.Event, list[BindingResult]]] = {}
        self._next_call = 0
        self._calls_lock = threading.Lock()
        self._outbox: list[bytes] = []
        self._fetchers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")
        self._memory_fault = b""
        self._crash_fault = b""
        self._outbox_lock = threading.Lock()
        self._flush_wanted = threading.Event()

    def send(self, message: Any) -> None:
        """Send now, after whatever one-way frames are waiting (order is kept)."""
        body = encode(message)
        with self._outbox_lock:
            pending, self._outbox = self._outbox, []
            pending.append(body)
            self._frames.send_many(pending)

    def send_later(self, message: Any) -> None:
        """Queue a one-way frame: it leaves with the next send, or within a few ms.

        A step's "started" and its "finished" then usually share one write, and the
        supervisor wakes once per step instead of twice.
        """
        body = encode(message)
        with self._outbox_lock:
            self._outbox.append(body)
            if len(self._outbox) == 1:
                self._flush_wanted.set()

    def _flush_outbox(self) -> None:
        while True:
            self._flush_wanted.wait()
            time.sleep(_FLUSH_SECONDS)
            with self._outbox_lock:
                self._flush_wanted.clear()
                pending, self._outbox = self._outbox, []
                if pending:
                    self._frames.send_many(pending)

    def call_binding(self, method: str, args: dict[str, Any]) -> Any:
        """Call ``env.WORKFLOWS`` on the host and wait for its answer (any thread)."""
        done = threading.Event()
        box: list[BindingResult] = []
        with self._calls_lock:
            self._next_call += 1
            call_id = self._next_call
            self._calls[call_id] = (done, box)
        try:
            self.send(BindingCall(call_id, method, args))
            done.wait()
        finally:
            with self._calls_lock:
                self._calls.pop(call_id, None)
        result = box[0]
        if not result.ok:
            error = result.error or ErrorInfo("BindingError", "the call failed")
            raise_binding_error(error.code, error.name, error.message)
        return result.value

    # -- limits ---------------------------------------------------------------------

    def start_cpu_budget(self) -> None:
        """Give the attempt about to start its own ``cpu_seconds`` of CPU time."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = int(usage.ru_utime + usage.ru_stime)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = used + self._limits.cpu_seconds
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except (OSError, ValueError):
            pass  # the process-wide budget still applies

    def _die(self, fault_frame: bytes) -> None:
        try:
            self._frames.send_many([fault_frame])
        finally:
            os._exit(1)

    def _watch_cpu_limit(self) -> None:
        # SIGXCPU goes to whichever thread the kernel picks, and a Python handler only
        # runs on the main thread, which sits in recv(): so the signal is blocked in
        # every thread and this one collects it synchronously.
        signal.sigwait({signal.SIGXCPU})
        fault = SandboxFault("cpu", f"cpu limit {self._limits.cpu_seconds} s exceeded")
        try:
            self.send(fault)
        finally:
            os._exit(1)

    # -- the main loop ---------------------------------------------------------------

    def serve(self, missing: dict[str, str]) -> None:
        memory = f"memory limit {self._limits.memory_mb} MiB exceeded"
        self._memory_fault = encode(SandboxFault("memory", memory))
        self._crash_fault = encode(SandboxFault("crash", "the sandbox's runtime failed"))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGXCPU})
        self._start(self._watch_cpu_limit, name="cpu-limit")
        self._start(self._flush_outbox, name="outbox")
        _executor.LIMIT_MESSAGES[MemoryError] = (
            f"memory limit {self._limits.memory_mb} MiB exceeded"
        )
        _executor.LIMIT_MESSAGES[RecursionError] = "recursion limit exceeded"
        first = decode(self._frames.receive())
        if not isinstance(first, LoadCode):
            return
        error = self._load(first)
        self.send(Ready(error, missing))
        if error is not None:
            return
        while True:
            try:
                message = decode(self._frames.receive())
            except EOFError:
                return
            if isinstance(message, Activate):
                self._activate(message)
            elif isinstance(message, Reply):
                port = self._ports.get(message.activation_id)
                if port is not None:
                    port.put_reply(message)
            elif isinstance(message, Abort):
                port = self._ports.pop(message.activation_id, None)
                if port is not None:
                    port.abort()
            elif isinstance(message, Fetch):
                # Requests reuse a few threads: starting one per request cost more than
                # the whole round trip.
                self._fetchers.submit(self._fetch, message)
            elif isinstance(message, BindingResult):
                with self._calls_lock:
                    waiter = self._calls.get(message.call_id)
                if waiter is not None:
                    waiter[1].append(message)
                    waiter[0].set()

    def _load(self, message: LoadCode) -> ErrorInfo | None:
        try:
            compiled = compile_tenant(message.files)
            sdk_names = {name: getattr(sdk, name) for name in sdk.__all__}
            self._namespace = load_tenant(compiled, sdk=sdk_names, print_sink=sdk.log.info)
        except TenantCompileError as exc:
            return ErrorInfo("TenantLoadError", str(exc), False, code="tenant.load_failed")
        except BaseException as exc:  # module-level tenant code may raise anything
            where = _tenant_location(exc, message.files)
            return ErrorInfo(
                "TenantLoadError",
                f"main.py raised {type(exc).__name__}: {exc}{where}",
                False,
                code="tenant.load_failed",
            )
        return None

    def _start(self, target: Callable[..., None], *args: Any, name: str) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

    def _activate(self, message: Activate) -> None:
        # The print allowance (policy.max_print_bytes) is per activation.
        reset = getattr(self._namespace, "reset_print_budget", None)
        if callable(reset):
            reset()
        port = _ChildPort(self)
        self._ports[message.activation_id] = port
        workflow = self._namespace.get("TenantWorkflow")

        def make_workflow() -> Any:
            if not callable(workflow):
                raise sdk.NonRetryableError(
                    "main.py defines no TenantWorkflow class", name="TenantLoadError"
                )
            return workflow(self._env)

        def run() -> None:
            try:
                Executor(message, port, make_workflow).run()
            except MemoryError:
                # The executor reports every error as data; only running out of memory
                # while reporting one gets here. The process is unsafe: it dies, saying
                # why in a frame encoded before memory ran out.
                self._die(self._memory_fault)
            except BaseException:  # a bug of ours, never swallowed silently
                self._die(self._crash_fault)
            finally:
                self._ports.pop(message.activation_id, None)

        self._start(run, name=f"activation-{message.activation_id}")

    def _fetch(self, message: Fetch) -> None:
        handler = self._namespace.get("fetch")
        try:
            if not callable(handler):
                raise LookupError("main.py defines no fetch(request, env) function")
            result = handler(_Request(message), self._env)
            self.send(_fetch_result(message.request_id, result))
        except BaseException as exc:  # tenant code may raise anything
            error = _executor._error_info(exc)
            self.send(FetchResult(message.request_id, 500, {}, b"", error))


def _fetch_result(request_id: int, result: Any) -> FetchResult:
    import json

    if isinstance(result, sdk.Response):
        body = result.body
        headers = {str(k).lower(): str(v) for k, v in result.headers.items()}
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        return FetchResult(request_id, int(result.status), headers, body)
    if isinstance(result, str):
        return FetchResult(
            request_id, 200, {"content-type": "text/plain; charset=utf-8"}, result.encode()
        )
    return FetchResult(
        request_id, 200, {"content-type": "application/json"}, json.dumps(result).encode()
    )


def serve(sock_fd: int, limits: SandboxLimits, missing: dict[str, str]) -> NoReturn:
    """Run the sandbox on the RPC socket ``sock_fd`` until the host closes it; never returns."""
    code = 0
    try:
        threading.stack_size(_THREAD_STACK_BYTES)
        sys.setrecursionlimit(_RECURSION_LIMIT)
        sock = socket.socket(fileno=sock_fd)
        _Child(SyncFrames(sock, HOST_FRAME_LIMIT), limits).serve(missing)
    except BaseException:  # nothing may escape a forked child: it must exit here
        code = 1
    os._exit(code)


def _tenant_location(exc: BaseException, files: Mapping[str, str]) -> str:
    """`` (at main.py:4)`` for the innermost tenant frame of ``exc``'s traceback, or "".

    Tenant modules are compiled with their file name, so a frame whose file is one of
    the tenant's is tenant code; the innermost one is the line the developer must fix.
    """
    location = ""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in files:
            location = f" (at {filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return location
