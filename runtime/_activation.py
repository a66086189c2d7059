"""The engine's side of one activation: turn the workflow's commands into durable records.

The invariant every handler keeps is *persist before proceeding*: a reply that lets
``run()`` continue is sent only after the unit recording the step has committed.
Handlers never trust the workflow side: names, sizes and sequence numbers are checked
again here, and a violation is handled like a crash of the sandbox.

         workflow side                 this module                     writer
    StepFinished(seq, ok) ──▶ build StepRecord ──▶ submit(put_step) ──▶ COMMIT (grouped)
                          ◀── Reply(value|raise|retry|suspend) ◀──────────┘
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgpack
import trio

from sandbox._durations import MAX_SLEEP_SECONDS
from sandbox._retry import RetryPolicy, RetryPolicyError, merge_retry_policy
from sandbox.protocol import (
    MAX_PAYLOAD_BYTES,
    MAX_STEP_NAME_LENGTH,
    Command,
    ErrorInfo,
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

from ._faults import crash_point
from ._models import InstanceStatus, StepRecord
from ._runner import ActivationChannel, RunnerError
from ._storage import Notice, StoreTxn
from .errors import LeaseLost, StorageError

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["SILENCE_SECONDS", "ActivationDriver", "ProtocolViolation", "Session"]

_MAX_LOG_LINES_PER_ACTIVATION: Final = 10_000
#: How long code between steps may run without a word before its process is killed.
SILENCE_SECONDS: Final = 60.0


class ProtocolViolation(RunnerError):
    """The workflow side sent something no honest executor sends."""


@dataclass
class _Attempt:
    seq: int
    name: str
    count: int
    attempt: int
    policy: RetryPolicy
    started_at: float
    deadline: float


@dataclass
class Session:
    """What the engine knows, in memory, about an instance that is running now."""

    key: int
    tenant_id: str
    instance_id: str
    token: int
    activation_id: int
    inflight: dict[int, _Attempt] = field(default_factory=dict)
    stopped: bool = False  #: terminated or restarted: nothing it sends counts any more
    channel: ActivationChannel | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    log_lines: int = 0
    #: The status its own last commit set, when that ended the activation (finished or
    #: parked); None if it ended otherwise (stopped, lease lost, crashed).
    final_status: InstanceStatus | None = None


def _check_name(name: object) -> str:
    if isinstance(name, str) and name in _VALID_NAMES:
        return name
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_STEP_NAME_LENGTH
        or any(unicodedata.category(ch) == "Cc" for ch in name)
    ):
        raise ProtocolViolation(f"invalid step name {name!r:.80}")
    if len(_VALID_NAMES) < 4096:  # names repeat in loops: check each once
        _VALID_NAMES.add(name)
    return name


_VALID_NAMES: set[str] = set()


def _payload_error(value: Any, what: str) -> ErrorInfo | None:
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        return ErrorInfo("SerializationError", f"{what} is not serializable: {exc}", False)
    if size > MAX_PAYLOAD_BYTES:
        return ErrorInfo(
            "PayloadTooLargeError",
            f"{what} is {size} bytes, more than the limit of {MAX_PAYLOAD_BYTES}",
            False,
            code="payload.too_large",
        )
    return None


class ActivationDriver:
    """Converses with one activation until it finishes, suspends, crashes or is stopped."""

    def __init__(self, engine: Engine, session: Session, max_steps: int) -> None:
        self._engine = engine
        self._session = session
        self._max_steps = max_steps
        self._clock = engine.clock
        self._writer = engine.writer
        self._expired: set[int] = set()
        self.aborted = False
        self.progress = 0  #: steps recorded by this activation
        self.silent = False  #: stopped answering outside any step (set by the watchdog)
        self._last_heard = self._clock.now()
        self._watch_until = float("inf")  #: when the watchdog wakes next
        self._watch_scope: trio.CancelScope | None = None

    async def converse(self, channel: ActivationChannel) -> Command | None:
        """Handle commands until the final one; None if the session was stopped.

        Raises RunnerError if the workflow side dies or breaks the protocol, LeaseLost if
        the instance was terminated or restarted meanwhile.
        """
        session = self._session
        session.channel = channel
        final: Command | None = None
        failure: RunnerError | StorageError | None = None
        async with trio.open_nursery() as timers:
            timers.start_soon(self._watchdog)
            try:
                with session.scope:
                    final = await self._converse(channel)
            except (RunnerError, StorageError) as exc:  # LeaseLost is a StorageError
                failure = exc  # re-raised outside the nursery, not as an ExceptionGroup
            finally:
                timers.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return final

    async def _converse(self, channel: ActivationChannel) -> Command | None:
        while True:
            command = await channel.receive()
            self._last_heard = self._clock.now()
            if self._session.stopped:
                return None
            if isinstance(command, WorkflowFinished | Suspended):
                return command
            await self._handle(command, channel)

    async def _handle(self, command: Command, channel: ActivationChannel) -> None:
        if getattr(command, "activation_id", None) != self._session.activation_id:
            raise ProtocolViolation("a command for another activation")
        if isinstance(command, LogLine):
            self._log(command)
            return
        seq = getattr(command, "seq", 0)
        if not isinstance(seq, int) or not 1 <= seq <= self._max_steps:
            raise ProtocolViolation(f"step position {seq!r:.20} is out of range")
        _check_name(getattr(command, "name", None))
        if isinstance(command, StepStarted):
            self._start_attempt(command)
            return
        if isinstance(command, StepFinished):
            reply = await self._finish_attempt(command)
        elif isinstance(command, SleepRequested):
            reply = await self._sleep(command)
        elif isinstance(command, WaitRequested):
            reply = await self._wait(command)
        else:
            raise ProtocolViolation(f"unexpected command {type(command).__name__}")
        await channel.reply(reply)

    # -- step.do ----------------------------------------------------------------------

    def _start_attempt(self, command: StepStarted) -> None:
        try:
            policy = merge_retry_policy(command.retries)
        except RetryPolicyError:
            policy = RetryPolicy()
        timeout = command.timeout
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_SLEEP_SECONDS:
            raise ProtocolViolation("invalid step timeout")
        now = self._clock.now()
        attempt = _Attempt(
            command.seq, command.name, command.count, command.attempt, policy, now, now + timeout
        )
        self._session.inflight[command.seq] = attempt
        self._rearm_watchdog(attempt.deadline)

    def _rearm_watchdog(self, deadline: float) -> None:
        # Only a deadline earlier than the watchdog's wake-up needs it re-armed (a cancel
        # costs a trip through trio's cancellation machinery): one that is later is
        # found when it wakes, since it always looks at what is in flight then.
        if self._watch_scope is not None and deadline < self._watch_until:
            self._watch_scope.cancel()

    async def _watchdog(self) -> None:
        """One task per activation enforces every attempt's timeout (no task per step),
        and a deadline between steps: code outside a step must reach its next step, or
        its end, within ``SILENCE_SECONDS`` of its last command.

        While a step runs it looks up at least every ``SILENCE_SECONDS``, so it needs
        re-arming (a cancel) only for an attempt due sooner than that: a step that ends
        and is followed by silence is caught within two silences at most.
        """
        while True:
            inflight = self._session.inflight
            attempt = min(inflight.values(), key=lambda a: a.deadline) if inflight else None
            if attempt is not None:
                target = min(attempt.deadline, self._clock.now() + SILENCE_SECONDS)
            else:
                target = self._last_heard + SILENCE_SECONDS
            self._watch_until = target
            with trio.CancelScope() as scope:
                self._watch_scope = scope
                await self._clock.sleep_until(target)
            self._watch_scope = None
            if scope.cancelled_caught:
                continue  # re-armed: an attempt due sooner started
            now = self._clock.now()
            if attempt is not None and inflight.get(attempt.seq) is attempt:
                if attempt.deadline <= now:
                    await self._expire(attempt)
                    return
                continue  # still running in time
            if self._session.inflight or self._last_heard + SILENCE_SECONDS > now:
                continue
            await self._silence()
            return

    async def _silence(self) -> None:
        # Nothing in flight and nothing said for SILENCE_SECONDS: the process is stuck
        # (or hostile). It is killed; the engine counts it as a crash outside a step.
        self.silent = True
        if self._session.channel is not None:
            with trio.CancelScope(shield=True):
                await self._session.channel.abort("stopped answering", force=True)
        self._session.scope.cancel()

    async def _expire(self, attempt: _Attempt) -> None:
        # The attempt overran its timeout: it fails, and whatever runs it is stopped (a
        # thread cannot be interrupted, so it is abandoned; a sandbox is killed). Every
        # other attempt in flight shares its fate, as if its process had crashed.
        self._session.inflight.pop(attempt.seq)
        self._expired.add(attempt.seq)
        self.aborted = True  # the runner may now report a crash: it is the kill we asked for
        # Shielded: the conversation may end meanwhile, but the failure must be recorded.
        with trio.CancelScope(shield=True):
            try:
                await self._fail_timed_out(attempt)
            except LeaseLost:
                self._session.stopped = True
        self._session.scope.cancel()

    async def _fail_timed_out(self, attempt: _Attempt) -> None:
        await self._record_failure(
            attempt, ErrorInfo("StepTimeoutError", "step attempt timed out", code="step.timeout")
        )
        await self.fail_inflight(
            ErrorInfo("SandboxCrashedError", "stopped together with a timed-out step")
        )
        if self._session.channel is not None:
            await self._session.channel.abort("step timeout")

    async def _finish_attempt(self, command: StepFinished) -> Reply:
        if command.seq in self._expired:
            return Reply(self._session.activation_id, command.seq, ReplyKind.SUSPEND)
        attempt = self._session.inflight.pop(command.seq, None)
        if attempt is None or attempt.attempt != command.attempt:
            raise ProtocolViolation(f"step {command.name!r} finished without starting")
        if command.ok:
            error = _payload_error(command.output, "step result")
            if error is None:
                step = self._step(attempt, StepStatus.COMPLETE, output=command.output)
                crash_point("step.before_record", command.name)
                # A pause takes effect here, at the step boundary, once the result is safe.
                kind = ReplyKind.SUSPEND if await self._record(step) else ReplyKind.VALUE
                crash_point("step.after_record", command.name)
                return Reply(self._session.activation_id, command.seq, kind)
        else:
            error = command.error or ErrorInfo("Error", "")
        return await self._record_failure(attempt, error)

    async def _record_failure(self, attempt: _Attempt, error: ErrorInfo) -> Reply:
        aid, seq = self._session.activation_id, attempt.seq
        next_attempt = attempt.attempt + 1
        if error.retryable and attempt.policy.allows(next_attempt):
            delay = attempt.policy.delay_before(next_attempt)
            wake = self._clock.now() + delay
            pause = await self._record(
                self._step(attempt, StepStatus.RETRYING, error=error, wake_at=wake)
            )
            if delay <= 0 and not pause:
                return Reply(aid, seq, ReplyKind.RETRY, attempt=next_attempt)
            return Reply(aid, seq, ReplyKind.SUSPEND)
        if await self._record(self._step(attempt, StepStatus.ERRORED, error=error)):
            return Reply(aid, seq, ReplyKind.SUSPEND)
        return Reply(aid, seq, ReplyKind.RAISE, error=error)

    async def fail_inflight(self, error: ErrorInfo) -> None:
        """Record every attempt in flight as failed (the process running it died)."""
        for seq in sorted(self._session.inflight):
            attempt = self._session.inflight.pop(seq)
            await self._record_failure(attempt, error)

    def _step(
        self,
        attempt: _Attempt,
        status: StepStatus,
        *,
        output: Any = None,
        error: ErrorInfo | None = None,
        wake_at: float | None = None,
    ) -> StepRecord:
        ended = None if status is StepStatus.RETRYING else self._clock.now()
        return StepRecord(
            seq=attempt.seq,
            name=attempt.name,
            count=attempt.count,
            kind=StepKind.DO,
            status=status,
            attempts=attempt.attempt,
            started_at=attempt.started_at,
            ended_at=ended,
            output=output,
            error=error,
            wake_at=wake_at,
        )

    async def _record(self, step: StepRecord) -> bool:
        """Make ``step`` durable; True if a pause now waits for this instance."""
        key, token = self._session.key, self._session.token
        if step.started_at is not None:
            self._engine.stats.observe_step(
                self._clock.now() - step.started_at, step.status is StepStatus.COMPLETE
            )

        def unit(txn: StoreTxn) -> InstanceStatus | None:
            return txn.record_step(key, token, step)

        status = await self._writer.submit(unit)
        pause = status is InstanceStatus.WAITING_FOR_PAUSE
        self.progress += 1
        self._engine.notify_change(key, status)  # the journal changed; the status did not
        # A draining supervisor stops its activations at this boundary too: the instance
        # goes back to the queue and a restart (or another supervisor) carries it on.
        return pause or self._engine.draining

    # -- step.sleep -------------------------------------------------------------------

    async def _sleep(self, command: SleepRequested) -> Reply:
        aid, key, token = self._session.activation_id, self._session.key, self._session.token
        now = self._clock.now()
        if command.until is not None:
            wake = float(command.until)
            in_past = wake < now
        else:
            duration = command.duration
            if not isinstance(duration, int | float) or not 0 <= duration <= MAX_SLEEP_SECONDS:
                raise ProtocolViolation("invalid sleep duration")
            wake, in_past = now + duration, False
        too_far = wake > now + MAX_SLEEP_SECONDS

        def unit(txn: StoreTxn) -> Reply:
            existing = txn.get_step(key, command.seq)
            if existing is not None and existing.status is StepStatus.COMPLETE:
                return Reply(aid, command.seq, ReplyKind.VALUE)  # a timer fired meanwhile
            base = StepRecord(
                command.seq,
                command.name,
                command.count,
                StepKind.SLEEP,
                StepStatus.WAITING,
                started_at=now,
            )
            if existing is not None and existing.status is StepStatus.WAITING:
                if existing.wake_at is not None and existing.wake_at > now:
                    return Reply(aid, command.seq, ReplyKind.SUSPEND)
                txn.put_step(key, token, _with(existing, StepStatus.COMPLETE, ended_at=now))
                return Reply(aid, command.seq, ReplyKind.VALUE)
            if in_past or too_far:
                message = (
                    "sleep_until target is in the past"
                    if in_past
                    else "a sleep lasts at most 365 days"
                )
                error = ErrorInfo("InvalidStepError", message, False)
                txn.put_step(key, token, _with(base, StepStatus.ERRORED, ended_at=now, error=error))
                return Reply(aid, command.seq, ReplyKind.RAISE, error=error)
            if wake <= now:
                txn.put_step(key, token, _with(base, StepStatus.COMPLETE, ended_at=now))
                return Reply(aid, command.seq, ReplyKind.VALUE)
            txn.put_step(key, token, _with(base, StepStatus.WAITING, wake_at=wake))
            return Reply(aid, command.seq, ReplyKind.SUSPEND)

        reply = await self._writer.submit(unit)
        crash_point("sleep.after_record", command.name)
        self._engine.notify_change(key)
        return reply

    # -- step.wait_for_event ----------------------------------------------------------

    async def _wait(self, command: WaitRequested) -> Reply:
        aid, key, token = self._session.activation_id, self._session.key, self._session.token
        if not is_valid_id(command.event_type):
            raise ProtocolViolation("invalid event type")
        timeout = command.timeout
        if not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_SLEEP_SECONDS:
            raise ProtocolViolation("invalid event timeout")
        now = self._clock.now()

        def unit(txn: StoreTxn) -> Reply:
            existing = txn.get_step(key, command.seq)
            # The journal this activation replays may be older than the database: an
            # event (or the timeout) may have resolved the wait since. That stays.
            if existing is not None and existing.status is StepStatus.COMPLETE:
                return Reply(aid, command.seq, ReplyKind.VALUE, value=existing.output)
            if existing is not None and existing.status is StepStatus.ERRORED:
                return Reply(aid, command.seq, ReplyKind.RAISE, error=existing.error)
            step = existing or StepRecord(
                command.seq,
                command.name,
                command.count,
                StepKind.WAIT_FOR_EVENT,
                StepStatus.WAITING,
                started_at=now,
                wake_at=now + timeout,
                event_type=command.event_type,
            )
            event = txn.pop_event(key, command.event_type)
            if event is not None:
                value = {"type": command.event_type, "payload": event[0], "timestamp": event[1]}
                txn.put_step(
                    key, token, _with(step, StepStatus.COMPLETE, ended_at=now, output=value)
                )
                return Reply(aid, command.seq, ReplyKind.VALUE, value=value)
            if step.wake_at is not None and step.wake_at <= now:
                error = ErrorInfo("WorkflowTimeoutError", "timed out waiting for event", True)
                txn.put_step(key, token, _with(step, StepStatus.ERRORED, ended_at=now, error=error))
                return Reply(aid, command.seq, ReplyKind.RAISE, error=error)
            if existing is None:
                txn.put_step(key, token, step)
            return Reply(aid, command.seq, ReplyKind.SUSPEND)

        reply = await self._writer.submit(unit)
        self._engine.notify_change(key)
        return reply

    # -- logs ---------------------------------------------------------------------------

    def _log(self, command: LogLine) -> None:
        session = self._session
        session.log_lines += 1
        if session.log_lines > _MAX_LOG_LINES_PER_ACTIVATION:
            return
        message = str(command.message)[:8192]
        level = command.level if command.level in ("info", "warning", "error") else "info"
        if session.log_lines == _MAX_LOG_LINES_PER_ACTIVATION:
            level, message = "warning", "log limit reached: later lines are dropped"
        line = (self._clock.now(), level, message)
        key = session.key
        # Followers are told only once the line is durable, so what they read is there.
        self._writer.submit_nowait(
            lambda txn: txn.append_logs(key, [line]), lambda: self._engine.notify_log(key)
        )

    # -- the end of an activation ---------------------------------------------------------

    async def finish(self, final: WorkflowFinished) -> None:
        """Record the instance's output or error."""
        key, token, now = self._session.key, self._session.token, self._clock.now()
        crash_point("instance.before_finish", self._session.instance_id)
        if final.ok:
            error = _payload_error(final.output, "the workflow's return value")
        else:
            error = final.error or ErrorInfo("Error", "")
        status = InstanceStatus.COMPLETE if error is None else InstanceStatus.ERRORED
        output = final.output if error is None else None

        def unit(txn: StoreTxn) -> None:
            txn.update_instance(
                key, now, token=token, status=status, output=output, error=error, wake_at=None
            )
            txn.announce(Notice.CHANGED, key)

        await self._submit_fenced(unit, lambda _: status)

    async def suspend(self) -> None:
        """Park the instance: paused, waiting for its earliest timer, or queued again."""
        key, token, now = self._session.key, self._session.token, self._clock.now()

        tenant_id = self._session.tenant_id

        def unit(txn: StoreTxn) -> tuple[InstanceStatus, float | None]:
            txn.announce(Notice.CHANGED, key)
            current = txn.get_instance_by_key(key)
            if current is not None and current.status is InstanceStatus.WAITING_FOR_PAUSE:
                txn.update_instance(
                    key, now, token=token, status=InstanceStatus.PAUSED, paused_at=now
                )
                return InstanceStatus.PAUSED, None
            pending, wake = txn.pending_wake(key)
            if pending == 0:
                txn.update_instance(
                    key, now, token=token, status=InstanceStatus.QUEUED, wake_at=None, priority=0
                )
                txn.announce(Notice.QUEUED, tenant_id)
                return InstanceStatus.QUEUED, None
            txn.update_instance(key, now, token=token, status=InstanceStatus.WAITING, wake_at=wake)
            return InstanceStatus.WAITING, wake

        result = await self._submit_fenced(unit, lambda value: value[0])
        if result is not None:
            status, wake = result
            if status is InstanceStatus.QUEUED:
                self._engine.kick_dispatch(self._session.tenant_id)
            elif wake is not None:
                self._engine.kick_timers(wake)

    async def _submit_fenced(self, unit: Any, status_of: Callable[[Any], InstanceStatus]) -> Any:
        """Commit a unit that sets the instance's status (``status_of`` its value) and
        tell its watchers."""
        try:
            value = await self._writer.submit(unit)
        except LeaseLost:
            return None  # terminated or restarted meanwhile: the new owner decides
        known = status_of(value)
        self._session.final_status = known
        self._engine.notify_change(self._session.key, known)
        return value


def _with(step: StepRecord, status: StepStatus, **changes: Any) -> StepRecord:
    values = {f: getattr(step, f) for f in StepRecord.__dataclass_fields__}
    values.update(status=status, **changes)
    return StepRecord(**values)
