"""Statuses and the row shapes the engine and its storage exchange."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from sandbox.protocol import ErrorInfo, StepKind, StepStatus

__all__ = [
    "FINISHED_STATUSES",
    "InstanceRecord",
    "InstanceStatus",
    "InstanceSummary",
    "LogRecord",
    "StepRecord",
]


class InstanceStatus(str, enum.Enum):
    """The nine status strings of SPEC 4, exactly."""

    QUEUED = "queued"  #: waiting for a concurrency slot (new, woken, or recovered)
    RUNNING = "running"  #: an activation is executing it
    PAUSED = "paused"  #: stopped at a step boundary until resumed
    ERRORED = "errored"  #: finished with an error
    TERMINATED = "terminated"  #: stopped by terminate()
    COMPLETE = "complete"  #: run() returned
    WAITING = "waiting"  #: sleeping, waiting for an event, or between retries
    WAITING_FOR_PAUSE = "waitingForPause"  #: pause requested; takes effect at the next step
    UNKNOWN = "unknown"  #: never stored; reported for states the engine cannot read


FINISHED_STATUSES: Final = frozenset(
    {InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED}
)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One instance row. ``key`` is the storage's own integer id; ``run_token`` fences writes."""

    key: int
    tenant_id: str
    instance_id: str
    workflow_name: str
    code_version: str
    status: InstanceStatus
    params: Any
    output: Any
    error: ErrorInfo | None
    created_at: float
    updated_at: float
    wake_at: float | None
    paused_at: float | None
    run_token: int


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """An instance as listed: no params, output or steps."""

    instance_id: str
    status: InstanceStatus
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One journal row."""

    seq: int
    name: str
    count: int
    kind: StepKind
    status: StepStatus
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    output: Any = None
    error: ErrorInfo | None = None
    wake_at: float | None = None
    event_type: str | None = None


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line of an instance's log."""

    id: int
    ts: float
    level: str
    message: str
