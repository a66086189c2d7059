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
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEFAULT_MAX_STEPS",
    "EVENT_TYPE_PATTERN",
    "INSTANCE_ID_PATTERN",
    "MAX_ID_LENGTH",
    "MAX_LOG_LINE_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_STEP_NAME_LENGTH",
    "TENANT_ID_PATTERN",
    "Activate",
    "Command",
    "ErrorInfo",
    "JournalEntry",
    "LogLine",
    "Reply",
    "ReplyKind",
    "SleepRequested",
    "StepFinished",
    "StepKind",
    "StepStarted",
    "StepStatus",
    "Suspended",
    "WaitRequested",
    "WorkflowFinished",
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
