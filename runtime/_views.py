"""JSON shapes of SPEC 8, built from the engine's records (one place for every view)."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from ._engine import InstanceView
from ._models import InstanceSummary, LogRecord, StepRecord

__all__ = ["instance_json", "iso", "jsonable", "log_json", "step_json", "summary_json"]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """A stored value made JSON-safe: bytes become text (or hex), datetimes ISO strings."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def step_json(step: StepRecord, *, with_output: bool = True) -> dict[str, Any]:
    """One step as ``GET .../instances/{id}`` lists it."""
    return {
        "name": step.name,
        "count": step.count,
        "type": step.kind.value,
        "status": step.status.value,
        "attempts": step.attempts,
        "started_at": iso(step.started_at),
        "ended_at": iso(step.ended_at),
        "output": jsonable(step.output) if with_output else None,
        "error": step.error.to_dict() if step.error else None,
    }


def instance_json(view: InstanceView, *, step_output: bool = True) -> dict[str, Any]:
    """``GET /v1/tenants/{tenant}/instances/{id}``."""
    record = view.record
    return {
        "id": record.instance_id,
        "status": record.status.value,
        "params": jsonable(unwrap_params(record.params)),
        "output": jsonable(record.output),
        "error": record.error.to_dict() if record.error else None,
        "code_version": record.code_version,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
        "steps": [step_json(s, with_output=step_output) for s in view.steps],
    }


def summary_json(summary: InstanceSummary) -> dict[str, Any]:
    """One row of ``GET /v1/tenants/{tenant}/instances``."""
    return {
        "id": summary.instance_id,
        "status": summary.status.value,
        "created_at": iso(summary.created_at),
        "updated_at": iso(summary.updated_at),
    }


def log_json(line: LogRecord) -> dict[str, Any]:
    """One log line as the SSE ``log`` event carries it."""
    return {"id": line.id, "ts": iso(line.ts), "level": line.level, "message": line.message}


def unwrap_params(stored: Any) -> Any:
    """The tenant's params: the stored envelope without its dispatcher metadata."""
    if isinstance(stored, dict) and "__dispatcherMetadata" in stored:
        return stored.get("params")
    return stored
