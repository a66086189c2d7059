"""What the two SQL backends share: row shapes and the queries that are the same in both.

Both backends implement ``StoreTxn`` on a DB-API-like connection whose ``execute``
returns a cursor. Queries are written with ``?`` placeholders; the PostgreSQL backend
translates them to ``%s`` in its ``_run``. Statements whose SQL differs between the
engines (upserts, locking clauses, fencing) stay in each backend.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from sandbox.protocol import ErrorInfo, StepKind, StepStatus

from ._models import InstanceRecord, InstanceStatus, InstanceSummary, StepRecord
from ._storage import StoreTxn

__all__ = ["SqlTxn"]


_INSTANCE_COLUMNS = (
    "key, tenant_id, instance_id, workflow_name, code_version, status, params, output,"
    " error_name, error_message, created_at, updated_at, wake_at, paused_at, run_token"
)


_STEP_COLUMNS = (
    "seq, name, count, kind, status, attempts, started_at, ended_at, output, error_name,"
    " error_message, wake_at, event_type"
)


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


def _error(name: str | None, message: str | None) -> ErrorInfo | None:
    return None if name is None else ErrorInfo(name, message or "")


def _instance(row: tuple[Any, ...]) -> InstanceRecord:
    return InstanceRecord(
        key=row[0],
        tenant_id=row[1],
        instance_id=row[2],
        workflow_name=row[3],
        code_version=row[4],
        status=InstanceStatus(row[5]),
        params=_unpack(row[6]),
        output=_unpack(row[7]),
        error=_error(row[8], row[9]),
        created_at=row[10],
        updated_at=row[11],
        wake_at=row[12],
        paused_at=row[13],
        run_token=row[14],
    )


def _step_values(step: StepRecord, text: Callable[[str], str] = str) -> tuple[Any, ...]:
    """A journal row's columns after ``key``, in the order of the steps table (``text``
    cleans free text a backend cannot store as it is)."""
    return (
        step.seq,
        step.name,
        step.count,
        step.kind.value,
        step.status.value,
        step.attempts,
        step.started_at,
        step.ended_at,
        None if step.output is None else _pack(step.output),
        text(step.error.name) if step.error else None,
        text(step.error.message) if step.error else None,
        step.wake_at,
        step.event_type,
    )


def _step(row: tuple[Any, ...]) -> StepRecord:
    return StepRecord(
        seq=row[0],
        name=row[1],
        count=row[2],
        kind=StepKind(row[3]),
        status=StepStatus(row[4]),
        attempts=row[5],
        started_at=row[6],
        ended_at=row[7],
        output=_unpack(row[8]),
        error=_error(row[9], row[10]),
        wake_at=row[11],
        event_type=row[12],
    )


class SqlTxn(StoreTxn):
    """The queries both SQL backends run as they are (``?`` placeholders)."""

    @abstractmethod
    def _run(self, query: str, args: Sequence[Any] = ()) -> Any:
        """Execute one statement and return its cursor."""

    def get_instance(self, tenant_id: str, instance_id: str) -> InstanceRecord | None:
        row = self._run(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE tenant_id = ? AND instance_id = ?",
            (tenant_id, instance_id),
        ).fetchone()
        return None if row is None else _instance(row)

    def get_status(self, key: int) -> InstanceStatus | None:
        row = self._run("SELECT status FROM instances WHERE key = ?", (key,)).fetchone()
        return None if row is None else InstanceStatus(row[0])

    def get_instance_by_key(self, key: int) -> InstanceRecord | None:
        row = self._run(
            f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else _instance(row)

    def queued_keys(self, limit: int) -> list[int]:
        rows = self._run(
            "SELECT key FROM instances WHERE status = 'queued'"
            " ORDER BY priority, ready_at, key LIMIT ?",
            (limit,),
        ).fetchall()
        return [r[0] for r in rows]

    def queued_for_tenant(self, tenant_id: str, limit: int) -> list[tuple[int, int]]:
        rows = self._run(
            "SELECT key, priority FROM instances WHERE tenant_id = ? AND status = 'queued'"
            " ORDER BY priority, ready_at, key LIMIT ?",
            (tenant_id, limit),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def queued_tenants(self, limit: int) -> list[str]:
        rows = self._run(
            "SELECT DISTINCT tenant_id FROM instances WHERE status = 'queued' LIMIT ?", (limit,)
        ).fetchall()
        return [r[0] for r in rows]

    def next_wake_at(self) -> float | None:
        row = self._run(
            "SELECT min(wake_at) FROM instances WHERE status = 'waiting' AND wake_at IS NOT NULL"
        ).fetchone()
        return None if row is None else row[0]

    def list_instances(
        self, tenant_id: str, status: str | None, limit: int, after_key: int | None
    ) -> list[tuple[int, InstanceSummary]]:
        query = "SELECT key, instance_id, status, created_at, updated_at FROM instances"
        query += " WHERE tenant_id = ?"
        args: list[Any] = [tenant_id]
        if status is not None:
            query += " AND status = ?"
            args.append(status)
        if after_key is not None:
            query += " AND key < ?"
            args.append(after_key)
        query += " ORDER BY key DESC LIMIT ?"
        args.append(limit)
        return [
            (r[0], InstanceSummary(r[1], InstanceStatus(r[2]), r[3], r[4]))
            for r in self._run(query, args).fetchall()
        ]

    def load_steps(self, key: int) -> list[StepRecord]:
        rows = self._run(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE key = ? ORDER BY seq", (key,)
        ).fetchall()
        return [_step(r) for r in rows]

    def get_step(self, key: int, seq: int) -> StepRecord | None:
        row = self._run(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE key = ? AND seq = ?", (key, seq)
        ).fetchone()
        return None if row is None else _step(row)

    def delete_steps(self, key: int) -> None:
        self._run("DELETE FROM steps WHERE key = ?", (key,))
        self._run("DELETE FROM logs WHERE key = ?", (key,))

    def find_waiting_event_step(self, key: int, event_type: str) -> StepRecord | None:
        row = self._run(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE key = ? AND status = 'waiting'"
            " AND kind = 'waitForEvent' AND event_type = ? ORDER BY seq LIMIT 1",
            (key, event_type),
        ).fetchone()
        return None if row is None else _step(row)

    def pending_wake(self, key: int) -> tuple[int, float | None]:
        row = self._run(
            "SELECT count(*), min(wake_at) FROM steps WHERE key = ?"
            " AND status IN ('waiting', 'retrying')",
            (key,),
        ).fetchone()
        return (row[0], row[1]) if row is not None else (0, None)

    def push_event(self, key: int, event_type: str, payload: Any, ts: float) -> None:
        self._run(
            "INSERT INTO events (key, type, payload, ts) VALUES (?, ?, ?, ?)",
            (key, event_type, _pack(payload), ts),
        )

    def pop_event(self, key: int, event_type: str) -> tuple[Any, float] | None:
        row = self._run(
            "DELETE FROM events WHERE id = (SELECT id FROM events WHERE key = ? AND type = ?"
            " ORDER BY id LIMIT 1) RETURNING payload, ts",
            (key, event_type),
        ).fetchone()
        return None if row is None else (_unpack(row[0]), row[1])

    def get_code_version(self, tenant_id: str, version: str) -> bytes | None:
        row = self._run(
            "SELECT files FROM code_versions WHERE tenant_id = ? AND version = ?",
            (tenant_id, version),
        ).fetchone()
        return None if row is None else bytes(row[0])
