"""The workflow side of an activation: runs ``run(event, step)`` and replays the journal.

This is the code that runs next to tenant code: inside the sandbox child, and inside
the supervisor when the in-process runner is used for tests and debugging. It is
synchronous and thread-based: an activation runs on its own thread, and every step
that needs the engine blocks that thread on ``HostPort.request`` until the host has
made the result durable (persist before proceeding).

Replay is local: the activation carries the journal, so completed steps return
their recorded result without a round trip. A step's identity is ``(name, count)``;
its ``seq`` (the 1-based position of the call in ``run()``) is how divergence from
the journal is noticed.
"""

from __future__ import annotations

import datetime as dt
import inspect
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Protocol

import msgpack

from . import sdk
from ._durations import MAX_SLEEP_SECONDS, DurationError, parse_duration, to_epoch
from ._retry import DEFAULT_TIMEOUT_SECONDS, RetryPolicy, merge_retry_policy, parse_timeout
from .protocol import (
    MAX_ID_LENGTH,
    MAX_LOG_LINE_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_STEP_NAME_LENGTH,
    Activate,
    Command,
    ErrorInfo,
    JournalEntry,
    LogLine,
    Reply,
    ReplyKind,
    SleepRequested,
    StepFinished,
    StepKind,
    StepStarted,
    StepStatus,
    Suspended,
    WaitRequested,
    WorkflowFinished,
    is_valid_id,
)

__all__ = [
    "LIMIT_MESSAGES",
    "ActivationAborted",
    "Executor",
    "HostPort",
    "NondeterminismError",
    "ReplyMailbox",
    "check_payload",
]


class HostPort(Protocol):
    """How an activation talks to its host. Both methods may be called from any thread."""

    def notify(self, command: Command) -> None:
        """Send a one-way command."""

    def request(self, command: Command) -> Reply:
        """Send a command and block until the host's reply (raises ActivationAborted)."""
        ...


class ReplyMailbox:
    """Where replies to an activation's requests wait for the threads that asked.

    Both ports (the sandbox child's and the in-process runner's) build on it: a thread
    sends a command, then blocks in ``wait_reply(seq)`` until the host's reply for that
    ``seq`` is put here, or the activation is aborted.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._replies: dict[int, Reply] = {}
        self.aborted = False

    def check_open(self) -> None:
        if self.aborted:
            raise ActivationAborted()

    def wait_reply(self, seq: int) -> Reply:
        with self._cond:
            while seq not in self._replies:
                self.check_open()
                self._cond.wait()
            return self._replies.pop(seq)

    def put_reply(self, reply: Reply) -> None:
        with self._cond:
            self._replies[reply.seq] = reply
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


class ActivationAborted(BaseException):
    """The host gave up on this activation (terminate, timeout, suspend): unwind now.

    A BaseException so that a tenant's ``except Exception`` does not swallow it; a
    tenant that catches it anyway gets it again at its next step call.
    """


class NondeterminismError(Exception):
    """The replay's step calls no longer match the journal."""

    code = "workflow.nondeterminism"


class InvalidStepError(ValueError):
    """A step call with an invalid name, duration, event type or config."""

    code = "step.invalid"


class TooManyStepsError(Exception):
    """The instance called more steps than its limit allows."""

    code = "workflow.too_many_steps"


def check_payload(value: Any, what: str) -> bytes:
    """msgpack-encode ``value``; refuse what cannot cross the boundary or exceeds 1 MiB."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise sdk.NonRetryableError(
            f"{what} is not serializable (None, bool, int, float, str, bytes, list, dict "
            f"with str keys): {exc}",
            name="SerializationError",
        ) from None
    if len(packed) > MAX_PAYLOAD_BYTES:
        raise sdk.NonRetryableError(
            f"{what} is {len(packed)} bytes, more than the limit of {MAX_PAYLOAD_BYTES}",
            name="PayloadTooLargeError",
        )
    return packed


def _normalize(value: Any, what: str) -> Any:
    """What replay would return: the value after a msgpack round trip (tuples become lists)."""
    packed = check_payload(value, what)
    try:
        return msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except ValueError as exc:  # e.g. a dict with int or tuple keys
        raise sdk.NonRetryableError(
            f"{what} is not serializable: dict keys must be str ({exc})",
            name="SerializationError",
        ) from None


#: Exceptions that mean a sandbox limit was hit, and how to name it; the sandbox child
#: fills this in with its configured limits ("memory limit 512 MiB exceeded").
LIMIT_MESSAGES: dict[type[BaseException], str] = {}


#: Branches one ``step.parallel`` may run at once.
MAX_PARALLEL: Final = 100
#: An error's message is cut to this many characters (it is stored and sent to clients).
MAX_ERROR_MESSAGE: Final = 4096


def _clip(text: object, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + " …[truncated]"


def _error_info(exc: BaseException) -> ErrorInfo:
    for kind, message in LIMIT_MESSAGES.items():
        if isinstance(exc, kind):
            return ErrorInfo("SandboxLimitError", message, code="sandbox.limit")
    if isinstance(exc, sdk.NonRetryableError):
        name, message, retryable, code = exc.name, exc.message, False, None
    elif isinstance(exc, sdk.StepError):
        name, message, retryable, code = exc.name, exc.message, True, None
    else:
        kind_code = getattr(type(exc), "code", None)
        name, message, retryable = type(exc).__name__, str(exc), True
        code = kind_code if isinstance(kind_code, str) else None
    return ErrorInfo(_clip(name, 200), _clip(message, MAX_ERROR_MESSAGE), retryable, code)


def _check_step_name(name: object) -> str:
    if isinstance(name, str) and name in _VALID_NAMES:
        return name
    if not isinstance(name, str) or not name:
        raise InvalidStepError("a step name must be a non-empty string")
    if len(name) > MAX_STEP_NAME_LENGTH:
        raise InvalidStepError(
            f"step name is {len(name)} characters, more than {MAX_STEP_NAME_LENGTH}"
        )
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidStepError(f"step name {name!r} contains control characters")
    if len(_VALID_NAMES) < 4096:  # names repeat in loops: check each once
        _VALID_NAMES.add(name)
    return name


_VALID_NAMES: set[str] = set()


#: The config of a step called without retries or timeout (the common case), shared
#: and read-only: ``ctx.config`` is visible to tenant code.
_DEFAULT_CONFIG: Final[Mapping[str, Any]] = MappingProxyType(
    {"retries": MappingProxyType(RetryPolicy().as_config()), "timeout": DEFAULT_TIMEOUT_SECONDS}
)


class _Suspend(BaseException):
    """Raised into run() to unwind it after a ``suspend`` reply."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """``ctx.step``: which occurrence of which step is running."""

    name: str
    count: int


@dataclass(frozen=True, slots=True)
class StepContext:
    """The ``ctx`` a step callback may take: ``attempt`` is 1-based."""

    attempt: int
    step: StepInfo
    config: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class WorkflowEvent:
    """The ``event`` passed to ``run()``."""

    payload: Any
    timestamp: dt.datetime
    instance_id: str
    workflow_name: str


def _wants_context(callback: Callable[..., Any]) -> bool:
    """Whether the callback takes ``ctx``: one required positional parameter, or *args."""
    code = getattr(callback, "__code__", None)
    if code is not None and not inspect.ismethod(callback):
        # The fast path for plain functions and lambdas (every step call asks).
        defaults = getattr(callback, "__defaults__", None) or ()
        required = code.co_argcount - len(defaults)
        return required >= 1 or bool(code.co_flags & inspect.CO_VARARGS)
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) >= 1 or any(p.kind == p.VAR_POSITIONAL for p in params)


class Step:
    """The ``step`` object passed to ``run()``; its public methods are the whole API."""

    def __init__(self, executor: Executor) -> None:
        self._x = executor

    def do(
        self,
        name: str,
        callback: Callable[..., Any],
        *,
        retries: Mapping[str, Any] | None = None,
        timeout: Any = None,
    ) -> Any:
        """Run ``callback`` as a durable step and return its (recorded) result."""
        return self._x.do(name, callback, retries, timeout)

    def sleep(self, name: str, duration: Any) -> None:
        """Sleep durably for ``duration`` (at most 365 days)."""
        self._x.sleep(name, duration=duration)

    def sleep_until(self, name: str, when: Any) -> None:
        """Sleep durably until ``when`` (an aware datetime or epoch seconds)."""
        self._x.sleep(name, until=when)

    def wait_for_event(self, name: str, *, type: str, timeout: Any = "24 hours") -> Any:
        """Wait for an event of ``type``; raise WorkflowTimeoutError after ``timeout``."""
        return self._x.wait_for_event(name, type, timeout)

    def parallel(
        self,
        callbacks: Mapping[str, Callable[..., Any]],
        *,
        retries: Mapping[str, Any] | None = None,
        timeout: Any = None,
    ) -> dict[str, Any]:
        """Run independent durable steps concurrently; return ``{name: result}``."""
        return self._x.parallel(callbacks, retries, timeout)


class Executor:
    """Runs one activation on the calling thread and sends exactly one final command."""

    def __init__(
        self,
        activation: Activate,
        port: HostPort,
        make_workflow: Callable[[], Any],
    ) -> None:
        self._activation = activation
        self._port = port
        self._make_workflow = make_workflow
        self._by_seq = {e.seq: e for e in activation.journal}
        self._by_key = {(e.name, e.count): e for e in activation.journal}
        self._counts: dict[str, int] = {}
        self._next_seq = 1
        self._lock = threading.Lock()
        self._suspended = False
        self._fatal: BaseException | None = None
        self._in_step = threading.local()
        self._in_branch = threading.local()

    # -- the activation ----------------------------------------------------

    def run(self) -> None:
        act = self._activation
        sdk.set_log_sink(self._log)
        final: Command
        try:
            event = WorkflowEvent(
                payload=act.payload,
                timestamp=dt.datetime.fromtimestamp(act.timestamp, dt.UTC),
                instance_id=act.instance_id,
                workflow_name=act.workflow_name,
            )
            workflow = self._make_workflow()
            output = workflow.run(event, Step(self))
            final = self._finish_ok(output)
        except (_Suspend, ActivationAborted):
            final = self._finish_failed(None)
        except BaseException as exc:  # tenant code may raise anything; report it as data
            final = self._finish_failed(exc)
        finally:
            sdk.set_log_sink(None)
        try:
            self._port.notify(final)
        except ActivationAborted:
            pass

    def _finish_ok(self, output: Any) -> Command:
        aid = self._activation.activation_id
        if self._fatal is not None or self._suspended:
            return self._finish_failed(None)
        unreached = sorted(s for s in self._by_seq if s >= self._next_seq)
        if unreached:
            entry = self._by_seq[unreached[0]]
            self._fatal = NondeterminismError(
                f"run() returned but the journal has step {entry.name!r} (#{entry.count}) "
                f"at position {entry.seq} that the replay did not reach"
            )
            return self._finish_failed(None)
        try:
            value = _normalize(output, "the workflow's return value")
        except sdk.NonRetryableError as exc:
            return WorkflowFinished(aid, ok=False, error=ErrorInfo(exc.name, exc.message, False))
        return WorkflowFinished(aid, ok=True, output=value)

    def _finish_failed(self, exc: BaseException | None) -> Command:
        aid = self._activation.activation_id
        if self._fatal is not None:
            return WorkflowFinished(aid, ok=False, error=_error_info(self._fatal))
        if self._suspended or exc is None:
            return Suspended(aid)
        return WorkflowFinished(aid, ok=False, error=_error_info(exc))

    def _log(self, level: str, message: str) -> None:
        data = message.encode("utf-8", "replace")
        if len(data) > MAX_LOG_LINE_BYTES:
            message = data[:MAX_LOG_LINE_BYTES].decode("utf-8", "ignore") + " …[truncated]"
        self._port.notify(LogLine(self._activation.activation_id, level, message))

    # -- bookkeeping shared by every kind of step ---------------------------

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._suspended:
            raise _Suspend()
        if getattr(self._in_step, "active", False):
            raise InvalidStepError("steps cannot be called from inside a step's callback")

    def _next_call(self, name: object, kind: StepKind) -> tuple[int, str, int, JournalEntry | None]:
        self._check_usable()
        name = _check_step_name(name)
        with self._lock:
            seq = self._next_seq
            if seq > self._activation.max_steps:
                raise TooManyStepsError(
                    f"the instance called more than {self._activation.max_steps} steps"
                )
            self._next_seq += 1
            count = self._counts.get(name, 0) + 1
            self._counts[name] = count
        entry = self._by_seq.get(seq)
        if entry is not None and (entry.name, entry.count, entry.kind) != (name, count, kind):
            self._fatal = NondeterminismError(
                f"step {name!r} (#{count}, {kind.value}) was called at position {seq}, where "
                f"the journal has step {entry.name!r} (#{entry.count}, {entry.kind.value})"
            )
            raise self._fatal
        if entry is None and (name, count) in self._by_key:
            recorded = self._by_key[(name, count)]
            self._fatal = NondeterminismError(
                f"step {name!r} (#{count}) was called at position {seq}, but the journal "
                f"recorded it at position {recorded.seq}"
            )
            raise self._fatal
        return seq, name, count, entry

    def _request(self, command: Command) -> Reply:
        reply = self._port.request(command)
        if reply.kind is ReplyKind.SUSPEND:
            # A parallel branch suspends only itself: branches whose threads have not
            # reached their first attempt yet must still run it in this activation.
            # parallel() suspends the activation once every branch is done.
            if not getattr(self._in_branch, "active", False):
                self._suspended = True
            raise _Suspend()
        return reply

    # -- step.do / step.parallel --------------------------------------------

    def do(self, name: object, callback: Any, retries: object, timeout: object) -> Any:
        seq, name, count, entry = self._next_call(name, StepKind.DO)
        config = self._step_config(callback, retries, timeout)
        try:
            return self._run_do(seq, name, count, entry, callback, config)
        except _Suspend:
            self._suspended = True
            raise

    def parallel(self, callbacks: object, retries: object, timeout: object) -> dict[str, Any]:
        if not isinstance(callbacks, dict) or not callbacks:
            raise InvalidStepError("step.parallel takes a non-empty dict {name: callback}")
        if len(callbacks) > MAX_PARALLEL:
            # each branch is a thread of the sandbox, within its address-space limit
            raise InvalidStepError(f"step.parallel takes at most {MAX_PARALLEL} steps")
        calls = []
        for name, callback in callbacks.items():
            seq, checked, count, entry = self._next_call(name, StepKind.DO)
            calls.append((seq, checked, count, entry, callback))
        config = self._step_config(None, retries, timeout)
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}

        def branch(seq: int, name: str, count: int, entry: JournalEntry | None, cb: Any) -> None:
            sdk.set_log_sink(self._log)
            self._in_branch.active = True
            try:
                self._step_config(cb, None, None)
                results[name] = self._run_do(seq, name, count, entry, cb, config)
            except BaseException as exc:  # collected and re-raised on run()'s thread
                failures[name] = exc

        threads = [
            threading.Thread(target=branch, args=call, name=f"step:{call[1]}", daemon=True)
            for call in calls
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for _, name, *_ in calls:
            exc = failures.get(name)
            if isinstance(exc, _Suspend | ActivationAborted):
                self._suspended = True
                raise exc
        for _, name, *_ in calls:
            if name in failures:
                raise failures[name]
        return {name: results[name] for _, name, *_ in calls}

    def _step_config(self, callback: object, retries: object, timeout: object) -> Mapping[str, Any]:
        if callback is not None and not callable(callback):
            raise InvalidStepError("a step's callback must be callable")
        if retries is None and timeout is None:
            return _DEFAULT_CONFIG
        try:
            policy = merge_retry_policy(retries)
            seconds = parse_timeout(timeout)
            if seconds > MAX_SLEEP_SECONDS:
                raise ValueError("a step timeout is at most 365 days")
        except ValueError as exc:
            raise InvalidStepError(str(exc)) from None
        return {"retries": policy.as_config(), "timeout": seconds}

    def _run_do(
        self,
        seq: int,
        name: str,
        count: int,
        entry: JournalEntry | None,
        callback: Callable[..., Any],
        config: Mapping[str, Any],
    ) -> Any:
        if entry is not None and entry.status is StepStatus.COMPLETE:
            return entry.output
        if entry is not None and entry.status is StepStatus.ERRORED:
            error = entry.error or ErrorInfo("StepError", "")
            raise sdk.StepError(error.name, error.message)
        if (
            entry is not None
            and entry.status is StepStatus.RETRYING
            and entry.wake_at is not None
            and entry.wake_at > self._activation.now
        ):
            # Woken for another step's timer: this one's backoff has not elapsed yet. The
            # activation suspends once its other branches are done, until the earliest due.
            raise _Suspend()
        attempt = entry.attempts + 1 if entry is not None else 1
        aid = self._activation.activation_id
        with_ctx = _wants_context(callback)
        # The host merges None over its own defaults; only a tenant's own config is sent.
        retries_sent = None if config is _DEFAULT_CONFIG else dict(config["retries"])
        while True:
            self._check_usable()
            self._port.notify(
                StepStarted(aid, seq, name, count, attempt, retries_sent, config["timeout"])
            )
            ctx = (
                StepContext(
                    attempt,
                    StepInfo(name, count),
                    {"retries": dict(config["retries"]), "timeout": config["timeout"]},
                )
                if with_ctx
                else None
            )
            self._in_step.active = True
            try:
                value = callback(ctx) if with_ctx else callback()
                finished = StepFinished(
                    aid, seq, name, count, attempt, ok=True, output=_normalize(value, "step result")
                )
            except (_Suspend, ActivationAborted):
                raise
            except BaseException as exc:  # a failed attempt, whatever the tenant raised
                finished = StepFinished(
                    aid, seq, name, count, attempt, ok=False, error=_error_info(exc)
                )
            finally:
                self._in_step.active = False
            reply = self._request(finished)
            if reply.kind is ReplyKind.VALUE:
                return finished.output if finished.ok else reply.value
            if reply.kind is ReplyKind.RAISE:
                error = reply.error or ErrorInfo("StepError", "")
                raise sdk.StepError(error.name, error.message)
            attempt = reply.attempt

    # -- step.sleep / step.sleep_until ----------------------------------------

    def sleep(self, name: object, *, duration: object = None, until: object = None) -> None:
        seq, name, count, entry = self._next_call(name, StepKind.SLEEP)
        try:
            if until is None:
                seconds: float | None = parse_duration(duration, what="sleep duration")
                if seconds is not None and seconds > MAX_SLEEP_SECONDS:
                    raise DurationError("a sleep lasts at most 365 days")
                target = None
            else:
                seconds, target = None, to_epoch(until)
        except DurationError as exc:
            raise InvalidStepError(str(exc)) from None
        if entry is not None and entry.status is StepStatus.COMPLETE:
            return
        if entry is not None and entry.status is StepStatus.ERRORED:
            # the same error the first run raised (a sleep only fails on invalid input)
            raise InvalidStepError(entry.error.message if entry.error else "invalid sleep")
        aid = self._activation.activation_id
        reply = self._request(SleepRequested(aid, seq, name, count, seconds, target))
        if reply.kind is ReplyKind.RAISE:
            error = reply.error or ErrorInfo("StepError", "")
            raise InvalidStepError(error.message)

    # -- step.wait_for_event ----------------------------------------------------

    def wait_for_event(self, name: object, event_type: object, timeout: object) -> Any:
        seq, name, count, entry = self._next_call(name, StepKind.WAIT_FOR_EVENT)
        if not is_valid_id(event_type):
            raise InvalidStepError(
                f"invalid event type {event_type!r}: at most {MAX_ID_LENGTH} characters of "
                "letters, digits, '_' and '-', not starting with '-'"
            )
        try:
            seconds = parse_duration(timeout, what="event timeout")
            if seconds > MAX_SLEEP_SECONDS:
                raise DurationError("an event wait lasts at most 365 days")
        except DurationError as exc:
            raise InvalidStepError(str(exc)) from None
        if entry is not None and entry.status is StepStatus.COMPLETE:
            return self._event_value(entry.output)
        if entry is not None and entry.status is StepStatus.ERRORED:
            raise sdk.WorkflowTimeoutError(entry.error.message if entry.error else "timed out")
        aid = self._activation.activation_id
        reply = self._request(WaitRequested(aid, seq, name, count, event_type, seconds))
        if reply.kind is ReplyKind.RAISE:
            raise sdk.WorkflowTimeoutError(reply.error.message if reply.error else "timed out")
        return self._event_value(reply.value)

    @staticmethod
    def _event_value(recorded: Any) -> Any:
        if isinstance(recorded, dict) and isinstance(recorded.get("timestamp"), int | float):
            stamp = dt.datetime.fromtimestamp(recorded["timestamp"], dt.UTC)
            return {**recorded, "timestamp": stamp}
        return recorded
