"""Every message that crosses between the engine and tenant workflow code.

This module is the whole boundary, so it stays small and imports nothing from
``runtime`` or ``loader``. The in-process runner passes these objects as they are;
the subprocess runner packs them into length-prefixed msgpack frames.

Naming follows Temporal: the host sends an *activation* (and *replies*); the
workflow side answers with *commands*::

    engine (host)                                  workflow side (executor)
    ─────────────                                  ────────────────────────
    Activate(journal) ───────────────────────────▶ run(event, step) from the top,
                                                   replaying journaled steps locally
                      ◀─────────────────────────── StepStarted        (one-way)
                      ◀─────────────────────────── StepFinished       (awaits Reply)
                      ◀─────────────────────────── SleepRequested     (awaits Reply)
                      ◀─────────────────────────── WaitRequested      (awaits Reply)
    Reply(value|raise|retry|suspend) ────────────▶
                      ◀─────────────────────────── LogLine            (one-way)
                      ◀─────────────────────────── WorkflowFinished | Suspended (last)

A ``suspend`` reply unwinds ``run()``: the instance's state is entirely in the
journal, and the next activation replays it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeGuard

import msgpack

__all__ = [
    "CHILD_FRAME_LIMIT",
    "DEFAULT_MAX_STEPS",
    "EVENT_TYPE_PATTERN",
    "HOST_FRAME_LIMIT",
    "INSTANCE_ID_PATTERN",
    "MAX_ID_LENGTH",
    "MAX_LOG_LINE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_STEP_NAME_LENGTH",
    "TENANT_ID_PATTERN",
    "Abort",
    "Activate",
    "BindingCall",
    "BindingResult",
    "Command",
    "ErrorInfo",
    "Fetch",
    "FetchResult",
    "JournalEntry",
    "LoadCode",
    "LogLine",
    "ProtocolError",
    "Ready",
    "Reply",
    "ReplyKind",
    "SandboxFault",
    "SleepRequested",
    "StepFinished",
    "StepKind",
    "StepStarted",
    "StepStatus",
    "Suspended",
    "WaitRequested",
    "WorkflowFinished",
    "decode",
    "encode",
    "is_valid_id",
]

# Limits of SPEC section 4. They are part of the contract on both sides of the boundary:
# the workflow side checks them for a clear error, the host checks them again because it
# never trusts the other side.
MAX_ID_LENGTH: Final = 100
INSTANCE_ID_PATTERN: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_-]*")
EVENT_TYPE_PATTERN: Final = INSTANCE_ID_PATTERN
TENANT_ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_STEP_NAME_LENGTH: Final = 256
MAX_PAYLOAD_BYTES: Final = 1024 * 1024
DEFAULT_MAX_STEPS: Final = 10_000
MAX_LOG_LINE_BYTES: Final = 8 * 1024


def is_valid_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid instance id or event type (SPEC 4's rule)."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_ID_LENGTH
        and INSTANCE_ID_PATTERN.fullmatch(value) is not None
    )


class StepKind(str, enum.Enum):
    """The three kinds of durable step; the values are the API's ``type`` strings."""

    DO = "do"
    SLEEP = "sleep"
    WAIT_FOR_EVENT = "waitForEvent"


class StepStatus(str, enum.Enum):
    """State of one journal entry."""

    RUNNING = "running"  #: an attempt is executing now (never persisted, shown live)
    COMPLETE = "complete"  #: result recorded; replay returns it
    ERRORED = "errored"  #: final error recorded; replay raises it
    RETRYING = "retrying"  #: an attempt failed; the next one is due at ``wake_at``
    WAITING = "waiting"  #: a sleep or an event wait that has not resolved yet


class ReplyKind(str, enum.Enum):
    """What the host tells a workflow blocked on a command."""

    VALUE = "value"  #: the step is recorded: return ``value``
    RAISE = "raise"  #: the step's final error is recorded: raise ``error``
    RETRY = "retry"  #: run the callback again now, as attempt ``attempt``
    SUSPEND = "suspend"  #: unwind run(); the instance continues in a later activation


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception reduced to data: it crosses the boundary and is stored in the journal."""

    name: str
    message: str
    retryable: bool = True
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "message": self.message}


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One step of an instance as recorded in the journal (what replay consumes)."""

    seq: int
    name: str
    count: int
    kind: StepKind
    status: StepStatus
    attempts: int = 0
    output: Any = None
    error: ErrorInfo | None = None
    wake_at: float | None = None  #: when a retrying step's next attempt is due


# ---------------------------------------------------------------------------
# host -> workflow


@dataclass(frozen=True, slots=True)
class Activate:
    """Run ``run(event, step)`` from the top, replaying ``journal``."""

    activation_id: int
    instance_id: str
    workflow_name: str
    payload: Any
    timestamp: float
    journal: tuple[JournalEntry, ...]
    max_steps: int = DEFAULT_MAX_STEPS
    now: float = 0.0  #: the engine's time at activation: retries due later wait for it


@dataclass(frozen=True, slots=True)
class Reply:
    """The host's answer to a command that waits (step result, sleep, event wait)."""

    activation_id: int
    seq: int
    kind: ReplyKind
    value: Any = None
    error: ErrorInfo | None = None
    attempt: int = 0


# ---------------------------------------------------------------------------
# workflow -> host


@dataclass(frozen=True, slots=True)
class StepStarted:
    """An attempt of a ``do`` step begins (one-way: the host arms its timeout)."""

    activation_id: int
    seq: int
    name: str
    count: int
    attempt: int
    retries: dict[str, Any] | None
    timeout: float | None


@dataclass(frozen=True, slots=True)
class StepFinished:
    """An attempt of a ``do`` step ended; the host records it and replies."""

    activation_id: int
    seq: int
    name: str
    count: int
    attempt: int
    ok: bool
    output: Any = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class SleepRequested:
    """A new durable sleep: ``duration`` seconds from now, or until epoch ``until``."""

    activation_id: int
    seq: int
    name: str
    count: int
    duration: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class WaitRequested:
    """A new (or still pending) wait for an event of ``event_type``."""

    activation_id: int
    seq: int
    name: str
    count: int
    event_type: str
    timeout: float


@dataclass(frozen=True, slots=True)
class LogLine:
    """A line printed or logged by tenant code (one-way)."""

    activation_id: int
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class WorkflowFinished:
    """``run()`` returned (``ok``) or raised; the last message of an activation."""

    activation_id: int
    ok: bool
    output: Any = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class Suspended:
    """``run()`` unwound after a ``suspend`` reply; the last message of an activation."""

    activation_id: int


Command = (
    StepStarted
    | StepFinished
    | SleepRequested
    | WaitRequested
    | LogLine
    | WorkflowFinished
    | Suspended
)


# ---------------------------------------------------------------------------
# sandbox lifecycle (only across the process boundary)


@dataclass(frozen=True, slots=True)
class LoadCode:
    """Host -> child, first frame: the tenant's files, compiled and loaded in the child."""

    tenant_id: str
    code_version: str
    files: dict[str, str]


@dataclass(frozen=True, slots=True)
class Ready:
    """Child -> host: the code loaded (``error`` is None) or did not.

    ``missing`` names each isolation layer the host refused, with the reason.
    """

    error: ErrorInfo | None = None
    missing: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Abort:
    """Host -> child: stop this activation at its next step call."""

    activation_id: int


@dataclass(frozen=True, slots=True)
class SandboxFault:
    """Child -> host, just before it dies: a limit it broke (``memory``, ``cpu``, ...)."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class Fetch:
    """Host -> child: run the tenant's ``fetch(request, env)``."""

    request_id: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Child -> host: what ``fetch`` returned, or its error."""

    request_id: int
    status: int
    headers: dict[str, str]
    body: bytes
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class BindingCall:
    """Child -> host: tenant code called ``env.WORKFLOWS.<method>(**args)``."""

    call_id: int
    method: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BindingResult:
    """Host -> child: the result of a binding call, or its error."""

    call_id: int
    ok: bool
    value: Any = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------------------
# the wire: length-prefixed msgpack frames, decoded strictly

#: The child never sends more than a step result's limit plus room for its envelope.
CHILD_FRAME_LIMIT: Final = MAX_PAYLOAD_BYTES + 64 * 1024
#: The host is trusted; its frames (an Activate carrying a journal) may be large.
HOST_FRAME_LIMIT: Final = 512 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that is too large, not msgpack, of an unknown type or of the wrong shape."""


def _any(value: Any) -> Any:
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"expected a string, got {type(value).__name__}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"expected a boolean, got {type(value).__name__}")
    return value


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"expected bytes, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _str_dict(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ProtocolError("expected a dict of strings")
    return value


def _any_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError("expected a dict with string keys")
    return value


def _error_info(value: Any) -> ErrorInfo:
    if not isinstance(value, list) or len(value) != 4:
        raise ProtocolError("malformed error")
    return ErrorInfo(_str(value[0]), _str(value[1]), _bool(value[2]), _optional(_str)(value[3]))


def _enum(kind: type[enum.Enum]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise ProtocolError(f"invalid {kind.__name__} {value!r:.40}") from None

    return check


def _journal(value: Any) -> tuple[JournalEntry, ...]:
    if not isinstance(value, list):
        raise ProtocolError("malformed journal")
    return tuple(_decode_fields(JournalEntry, item) for item in value)


_FIELD_CHECKS: Final[dict[type, tuple[Callable[[Any], Any], ...]]] = {
    JournalEntry: (
        _int,
        _str,
        _int,
        _enum(StepKind),
        _enum(StepStatus),
        _int,
        _any,
        _optional(_error_info),
        _optional(_number),
    ),
    Activate: (_int, _str, _str, _any, _number, _journal, _int, _number),
    Reply: (_int, _int, _enum(ReplyKind), _any, _optional(_error_info), _int),
    StepStarted: (_int, _int, _str, _int, _int, _optional(_any_dict), _optional(_number)),
    StepFinished: (_int, _int, _str, _int, _int, _bool, _any, _optional(_error_info)),
    SleepRequested: (_int, _int, _str, _int, _optional(_number), _optional(_number)),
    WaitRequested: (_int, _int, _str, _int, _str, _number),
    LogLine: (_int, _str, _str),
    WorkflowFinished: (_int, _bool, _any, _optional(_error_info)),
    Suspended: (_int,),
    LoadCode: (_str, _str, _str_dict),
    Ready: (_optional(_error_info), _str_dict),
    Abort: (_int,),
    SandboxFault: (_str, _str),
    Fetch: (_int, _str, _str, _str_dict, _str_dict, _bytes),
    FetchResult: (_int, _int, _str_dict, _bytes, _optional(_error_info)),
    BindingCall: (_int, _str, _any_dict),
    BindingResult: (_int, _bool, _any, _optional(_error_info)),
}
_TAGS: Final[dict[type, int]] = {kind: tag for tag, kind in enumerate(_FIELD_CHECKS)}
_KINDS: Final[dict[int, type]] = {tag: kind for kind, tag in _TAGS.items()}


def _decode_fields(kind: type, items: Any) -> Any:
    checks = _FIELD_CHECKS[kind]
    if not isinstance(items, list) or len(items) != len(checks):
        raise ProtocolError(f"malformed {kind.__name__}")
    return kind(*(check(item) for check, item in zip(checks, items, strict=True)))


def _to_wire(value: Any) -> Any:
    if isinstance(value, ErrorInfo):
        return [value.name, value.message, value.retryable, value.code]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, JournalEntry):
        return [_to_wire(getattr(value, f.name)) for f in fields(value)]
    if isinstance(value, tuple) and value and isinstance(value[0], JournalEntry):
        return [_to_wire(v) for v in value]
    return value


def encode(message: Any) -> bytes:
    """One message as a msgpack body (the framing adds the length)."""
    tag = _TAGS[type(message)]
    body = [tag, *(_to_wire(getattr(message, f.name)) for f in fields(message))]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode(body: bytes) -> Any:
    """Parse and check one message; anything unexpected raises ProtocolError."""
    try:
        items = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    if not isinstance(items, list) or not items or not isinstance(items[0], int):
        raise ProtocolError("a frame must be a list starting with a message tag")
    kind = _KINDS.get(items[0])
    if kind is None:
        raise ProtocolError(f"unknown message type {items[0]!r:.20}")
    try:
        return _decode_fields(kind, items[1:])
    except ProtocolError:
        raise
    except Exception as exc:  # a checked field that the dataclass still refuses
        raise ProtocolError(f"malformed {kind.__name__}: {type(exc).__name__}") from None
