"""PostgreSQL storage: any number of supervisors share one database (SPEC 10).

Two connections per store, each behind its own lock (the engine calls from threads):

* the **writer** (autocommit off, READ COMMITTED): ``write(units)`` is one transaction,
  committed once. Units run optimistically without savepoints; if one fails, the
  transaction is rolled back and the batch runs again with a ``SAVEPOINT`` around each
  unit, so a failing unit never undoes the others (the scheme of the SQLite store).
* the **reader** (REPEATABLE READ, READ ONLY): ``read(fn)`` runs ``fn`` on one snapshot.

Fencing: ``put_step`` with a token locks the instance row (``FOR NO KEY UPDATE``) in the
same statement that writes the step, and ``update_instance(token=...)`` is a single
``UPDATE ... WHERE run_token = token``. A supervisor that bumps the token waits for
(or is waited on by) any writer still holding the row, and PostgreSQL re-checks the
token on the newest row version, so a stale token can never write: ``LeaseLost``.

The schema is created and migrated by the program, versioned in ``tenantflow_meta``,
inside one transaction holding ``pg_advisory_xact_lock``: several supervisors may start
on the same database (or schema) at once. An up-to-date schema is only checked (no lock,
no DDL, so a role without CREATE privilege can run the supervisor). ``schema=`` (or
``options=-csearch_path=NAME`` in the URL) keeps everything in one schema, created when
missing.

Every database error is reported as ``StorageError``. A lost connection (the server
restarted, the backend was terminated, the network dropped) is replaced by a new one,
retried with a capped backoff for up to ``reconnect_timeout`` seconds (DBOS's
``db_retry``: availability traded for correctness):

* a read is simply run again on the new connection;
* a write batch that lost its connection **before** COMMIT was sent is run again on
  the new connection: PostgreSQL rolled the transaction back when the backend died, so
  nothing of it was applied, and every unit re-reads what it depends on (statuses,
  fencing tokens) in the new transaction, so it does what it would have done;
* a write batch that lost its connection **during** COMMIT has an unknown outcome: it
  may have been applied. Running it again blindly could apply it twice (a second
  activation claim, a duplicate log line), so it fails with ``StorageError`` instead,
  and the next batch gets a new connection.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ._models import InstanceRecord, InstanceStatus, LogRecord, StepRecord
from ._storage import UNSET, Notice, NoticeHandler, Outcome, Store, StoreTxn, Unit
from ._storage_sql import (
    _INSTANCE_COLUMNS,
    _STEP_COLUMNS,
    SqlTxn,
    _instance,
    _pack,
    _step,
    _step_values,
)
from .errors import InstanceAlreadyExists, LeaseLost, StorageError

__all__ = ["SCHEMA_VERSION", "PostgresStore", "PostgresTxn"]

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]
log = logging.getLogger("tenantflow.storage")

#: Reconnection backoff: first delay, cap, and the default time to keep trying.
_RETRY_FIRST: Final = 0.05
_RETRY_CAP: Final = 2.0
DEFAULT_RECONNECT_TIMEOUT: Final = 60.0
#: How often the listener looks up from waiting (to notice it should stop).
_LISTEN_WAKE_SECONDS: Final = 0.5


class _ConnectionLost(StorageError):
    """The connection died under a batch; ``committing``: while COMMIT was in flight."""

    def __init__(self, message: str, *, committing: bool) -> None:
        super().__init__(message)
        self.committing = committing


#: The advisory-lock class id of migrations (the object id is the schema's hashtext).
_MIGRATION_LOCK: Final = 0x74666D67  # "tfmg"

_SCHEMA_V1: Final = """
CREATE TABLE IF NOT EXISTS instances (
    key BIGSERIAL PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    workflow_name TEXT NOT NULL,
    code_version TEXT NOT NULL,
    status TEXT NOT NULL,
    params BYTEA,
    output BYTEA,
    error_name TEXT,
    error_message TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    wake_at DOUBLE PRECISION,
    paused_at DOUBLE PRECISION,
    run_token BIGINT NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 1,
    ready_at DOUBLE PRECISION NOT NULL,
    UNIQUE (tenant_id, instance_id)
);
CREATE INDEX IF NOT EXISTS instances_queued ON instances (priority, ready_at, key)
    WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS instances_wake ON instances (wake_at)
    WHERE status = 'waiting' AND wake_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS instances_tenant_status ON instances (tenant_id, status, key);
CREATE INDEX IF NOT EXISTS instances_tenant_queue ON instances (tenant_id, priority, ready_at, key)
    WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS steps (
    key BIGINT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    output BYTEA,
    error_name TEXT,
    error_message TEXT,
    wake_at DOUBLE PRECISION,
    event_type TEXT,
    PRIMARY KEY (key, seq)
);
CREATE INDEX IF NOT EXISTS steps_pending ON steps (key, wake_at)
    WHERE status IN ('waiting', 'retrying');
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    key BIGINT NOT NULL,
    type TEXT NOT NULL,
    payload BYTEA,
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (key, type, id);
CREATE TABLE IF NOT EXISTS logs (
    id BIGSERIAL PRIMARY KEY,
    key BIGINT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_instance ON logs (key, id);
CREATE TABLE IF NOT EXISTS code_versions (
    tenant_id TEXT NOT NULL,
    version TEXT NOT NULL,
    files BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
"""

#: Version 2: leases. ``owner`` is the supervisor holding a running instance,
#: ``lease_expires_at`` when its hold ends unless renewed (the database's clock).
_SCHEMA_V2: Final = """
ALTER TABLE instances ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE instances ADD COLUMN IF NOT EXISTS lease_expires_at DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS instances_leased ON instances (owner, key)
    WHERE status IN ('running', 'waitingForPause');
CREATE INDEX IF NOT EXISTS instances_lease_expiry ON instances (lease_expires_at)
    WHERE status IN ('running', 'waitingForPause');
"""

#: ``(version, DDL)`` in order; a database at version N gets every later step applied.
MIGRATIONS: Final[tuple[tuple[int, str], ...]] = ((1, _SCHEMA_V1), (2, _SCHEMA_V2))
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]

_STEP_INSERT: Final = (
    "INSERT INTO steps (key, seq, name, count, kind, status, attempts, started_at, ended_at,"
    " output, error_name, error_message, wake_at, event_type)"
)
_STEP_UPSERT: Final = (
    " ON CONFLICT (key, seq) DO UPDATE SET name = EXCLUDED.name, count = EXCLUDED.count,"
    " kind = EXCLUDED.kind, status = EXCLUDED.status, attempts = EXCLUDED.attempts,"
    " started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,"
    " output = EXCLUDED.output, error_name = EXCLUDED.error_name,"
    " error_message = EXCLUDED.error_message, wake_at = EXCLUDED.wake_at,"
    " event_type = EXCLUDED.event_type"
)
# Fenced: the instance row is locked and its token checked by the statement that writes
# the step; the lock is held until COMMIT, so nobody re-leases the instance in between.
_PUT_STEP_FENCED: Final = (
    "WITH fence AS (SELECT key FROM instances WHERE key = %s AND run_token = %s"
    " FOR NO KEY UPDATE) "
    + _STEP_INSERT
    + " SELECT fence.key, %s::integer, %s::text, %s::integer, %s::text, %s::text,"
    " %s::integer, %s::double precision, %s::double precision, %s::bytea, %s::text,"
    " %s::text, %s::double precision, %s::text FROM fence" + _STEP_UPSERT
)
# The same, returning the instance's status (a pause may be waiting for this step): the
# data-modifying CTE runs whether or not the outer query reads it.
_RECORD_STEP_FENCED: Final = (
    "WITH fence AS (SELECT key, status FROM instances WHERE key = %s AND run_token = %s"
    " FOR NO KEY UPDATE), put AS ("
    + _STEP_INSERT
    + " SELECT fence.key, %s::integer, %s::text, %s::integer, %s::text, %s::text,"
    " %s::integer, %s::double precision, %s::double precision, %s::bytea, %s::text,"
    " %s::text, %s::double precision, %s::text FROM fence" + _STEP_UPSERT + ")"
    " SELECT status FROM fence"
)
_PUT_STEP: Final = (
    _STEP_INSERT + " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)" + _STEP_UPSERT
)

#: The database's clock, in seconds since the epoch: leases are measured by one clock
#: for every supervisor, whatever their machines' clocks say.
_DB_NOW: Final = "extract(epoch from clock_timestamp())::double precision"

_SEARCH_PATH_OPTION: Final = re.compile(r"(?:-c\s*|--)search_path=(\S+)")


def _text(value: str) -> str:
    """Free text for a TEXT column, which cannot hold NUL: NUL becomes U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _schema_from_url(url: str) -> str | None:
    """The first schema of ``options=-csearch_path=...`` in the URL, if it names one."""
    try:
        options = conninfo_to_dict(url).get("options")
    except psycopg.ProgrammingError as exc:
        raise StorageError(f"invalid PostgreSQL URL: {exc}") from exc
    if not isinstance(options, str):
        return None
    match = _SEARCH_PATH_OPTION.search(options)
    if match is None:
        return None
    first = match.group(1).split(",")[0].strip()
    if first.startswith('"') and first.endswith('"') and len(first) >= 2:
        first = first[1:-1].replace('""', '"')
    return None if first in ("", "$user") else first


class PostgresTxn(SqlTxn):
    """The domain operations on one PostgreSQL connection inside a transaction."""

    def __init__(self, conn: Connection) -> None:
        self._c = conn
        #: Notices to send with the commit (a set: a batch of 100 creates of one tenant
        #: sends one). A unit rolled back to its savepoint may leave one here: a
        #: notice that turns out to be about nothing costs the others one look.
        self.announced: set[str] = set()

    def announce(self, notice: Notice, subject: str | int) -> None:
        self.announced.add(f"{notice.value} {subject}")

    def _run(self, query: str, args: Sequence[Any] = ()) -> Any:
        # The shared queries are written with SQLite's "?"; none contains a literal "?".
        return self._c.execute(query.replace("?", "%s"), args)

    def insert_instance(
        self,
        tenant_id: str,
        instance_id: str,
        workflow_name: str,
        code_version: str,
        params: Any,
        now: float,
    ) -> int:
        row = self._insert(tenant_id, instance_id, workflow_name, code_version, params, now)
        key: int = row[0]
        return key

    def due_steps(self, key: int, now: float) -> list[StepRecord]:
        rows = self._c.execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE key = %s"
            " AND status IN ('waiting', 'retrying') AND wake_at <= %s ORDER BY seq",
            (key, now),
        ).fetchall()
        return [_step(r) for r in rows]

    def update_instance(
        self,
        key: int,
        now: float,
        *,
        token: int | None = None,
        status: InstanceStatus = UNSET,
        output: Any = UNSET,
        error: Any = UNSET,
        wake_at: float | None = UNSET,
        paused_at: float | None = UNSET,
        code_version: str = UNSET,
        new_token: bool = False,
        priority: int = UNSET,
    ) -> int:
        sets = ["updated_at = %s"]
        args: list[Any] = [now]
        if status is not UNSET:
            sets.append("status = %s")
            args.append(status.value)
        if output is not UNSET:
            sets.append("output = %s")
            args.append(None if output is None else _pack(output))
        if error is not UNSET:
            sets += ["error_name = %s", "error_message = %s"]
            args += [None, None] if error is None else [_text(error.name), _text(error.message)]
        if wake_at is not UNSET:
            sets.append("wake_at = %s")
            args.append(wake_at)
        if paused_at is not UNSET:
            sets.append("paused_at = %s")
            args.append(paused_at)
        if code_version is not UNSET:
            sets.append("code_version = %s")
            args.append(code_version)
        if priority is not UNSET:
            sets += ["priority = %s", "ready_at = %s"]
            args += [priority, now]
        if new_token:
            sets.append("run_token = run_token + 1")
        where = "key = %s"
        args.append(key)
        if token is not None:
            # A single UPDATE: PostgreSQL re-checks the token on the newest row version
            # after waiting for a concurrent writer, so a stale token never matches.
            where += " AND run_token = %s"
            args.append(token)
        row = self._c.execute(
            f"UPDATE instances SET {', '.join(sets)} WHERE {where} RETURNING run_token", args
        ).fetchone()
        if row is None:
            raise LeaseLost(f"instance {key} is no longer held with token {token}")
        result: int = row[0]
        return result

    def insert_claimed(
        self,
        tenant_id: str,
        instance_id: str,
        workflow_name: str,
        code_version: str,
        params: Any,
        now: float,
        owner: str | None = None,
        lease_seconds: float | None = None,
    ) -> InstanceRecord:
        # One statement: inserted running under token 1 (what claim_queued would make of
        # a new row's 0), leased by the database's clock.
        row = self._insert(
            tenant_id, instance_id, workflow_name, code_version, params, now,
            claim=(owner, lease_seconds),
        )  # fmt: skip
        return _instance(row)

    def _insert(
        self,
        tenant_id: str,
        instance_id: str,
        workflow_name: str,
        code_version: str,
        params: Any,
        now: float,
        *,
        claim: tuple[str | None, float | None] | None = None,
    ) -> tuple[Any, ...]:
        """Insert a new instance, ``queued`` (returning its key) or, with ``claim`` (owner,
        lease seconds), ``running`` under token 1 (returning the whole row)."""
        status, token, owner, lease = "queued", 0, None, None
        if claim is not None:
            status, token, (owner, lease) = "running", 1, claim
        returning = "key" if claim is None else _INSTANCE_COLUMNS
        # ON CONFLICT DO NOTHING rather than catching UniqueViolation: a duplicate is
        # reported without an error, so the transaction is never left aborted.
        row: tuple[Any, ...] | None = self._c.execute(
            "INSERT INTO instances (tenant_id, instance_id, workflow_name, code_version,"
            " status, params, created_at, updated_at, ready_at, priority, run_token, owner,"
            " lease_expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 1, %s, %s,"
            f" {_DB_NOW} + %s::double precision)"
            f" ON CONFLICT (tenant_id, instance_id) DO NOTHING RETURNING {returning}",
            (
                tenant_id, instance_id, workflow_name, code_version, status, _pack(params),
                now, now, now, token, owner, lease,
            ),
        ).fetchone()  # fmt: skip
        if row is None:
            raise InstanceAlreadyExists(tenant_id, instance_id)
        return row

    def claim_queued(
        self, key: int, now: float, owner: str | None = None, lease_seconds: float | None = None
    ) -> InstanceRecord | None:
        # SKIP LOCKED: of two supervisors claiming the same key, the second skips it instead
        # of waiting for the first's row lock. Waiting deadlocked: each commit claims many
        # keys, so two supervisors' batches locked the same rows in different orders.
        row = self._c.execute(
            "UPDATE instances SET status = 'running', run_token = run_token + 1, updated_at = %s,"
            f" owner = %s, lease_expires_at = {_DB_NOW} + %s::double precision"
            " WHERE key = (SELECT key FROM instances WHERE key = %s AND status = 'queued'"
            f" FOR NO KEY UPDATE SKIP LOCKED) RETURNING {_INSTANCE_COLUMNS}",
            (now, owner, lease_seconds, key),
        ).fetchone()
        return None if row is None else _instance(row)

    def renew_leases(self, owner: str, lease_seconds: float) -> list[tuple[int, int]]:
        rows = self._c.execute(
            f"UPDATE instances SET lease_expires_at = {_DB_NOW} + %s::double precision"
            " WHERE owner = %s AND status IN ('running', 'waitingForPause')"
            " RETURNING key, run_token",
            (lease_seconds, owner),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def recover_expired(self, now: float) -> list[tuple[int, str]]:
        # SKIP LOCKED: an instance another supervisor is recovering (or writing) right now
        # is left to it; the rest are recovered here, each by exactly one supervisor.
        rows = self._c.execute(
            "WITH expired AS (SELECT key FROM instances"
            " WHERE status IN ('running', 'waitingForPause')"
            f" AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < {_DB_NOW})"
            " ORDER BY key FOR UPDATE SKIP LOCKED)"
            " UPDATE instances i SET"
            " status = CASE WHEN i.status = 'running' THEN 'queued' ELSE 'paused' END,"
            " priority = CASE WHEN i.status = 'running' THEN 0 ELSE i.priority END,"
            " ready_at = CASE WHEN i.status = 'running' THEN %s ELSE i.ready_at END,"
            " paused_at = CASE WHEN i.status = 'running' THEN i.paused_at ELSE %s END,"
            " updated_at = %s, run_token = i.run_token + 1, owner = NULL,"
            " lease_expires_at = NULL FROM expired WHERE i.key = expired.key"
            " RETURNING i.key, i.tenant_id",
            (now, now, now),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def due_keys(self, now: float, limit: int) -> list[tuple[int, str]]:
        # Locked until this transaction ends (the caller wakes them in it); SKIP LOCKED
        # leaves the ones another supervisor is waking to it, so a timer fires once.
        rows = self._c.execute(
            "SELECT key, tenant_id FROM instances WHERE status = 'waiting'"
            " AND wake_at IS NOT NULL AND wake_at <= %s ORDER BY wake_at, key LIMIT %s"
            " FOR NO KEY UPDATE SKIP LOCKED",
            (now, limit),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def recover_running(self, now: float) -> int:
        paused = self._c.execute(
            "UPDATE instances SET status = 'paused', paused_at = %s, updated_at = %s,"
            " run_token = run_token + 1 WHERE status = 'waitingForPause'",
            (now, now),
        ).rowcount
        queued = self._c.execute(
            "UPDATE instances SET status = 'queued', priority = 0, ready_at = %s,"
            " updated_at = %s, run_token = run_token + 1 WHERE status = 'running'",
            (now, now),
        ).rowcount
        return paused + queued

    def count_by_status(self, tenant_id: str | None) -> dict[str, int]:
        if tenant_id is None:
            cur = self._c.execute("SELECT status, count(*) FROM instances GROUP BY status")
        else:
            cur = self._c.execute(
                "SELECT status, count(*) FROM instances WHERE tenant_id = %s GROUP BY status",
                (tenant_id,),
            )
        return {r[0]: r[1] for r in cur.fetchall()}

    def put_step(self, key: int, token: int | None, step: StepRecord) -> None:
        values = _step_values(step, _text)
        if token is None:
            self._c.execute(_PUT_STEP, (key, *values))
            return
        if self._c.execute(_PUT_STEP_FENCED, (key, token, *values)).rowcount == 0:
            raise LeaseLost(f"instance {key} is no longer held with token {token}")

    def record_step(self, key: int, token: int | None, step: StepRecord) -> InstanceStatus | None:
        if token is None:
            return super().record_step(key, token, step)
        row = self._c.execute(
            _RECORD_STEP_FENCED, (key, token, *_step_values(step, _text))
        ).fetchone()
        if row is None:
            raise LeaseLost(f"instance {key} is no longer held with token {token}")
        return InstanceStatus(row[0])

    def shift_step_wakes(self, key: int, delta: float) -> None:
        self._c.execute(
            "UPDATE steps SET wake_at = wake_at + %s::double precision WHERE key = %s"
            " AND wake_at IS NOT NULL AND status IN ('waiting', 'retrying')",
            (delta, key),
        )

    def append_logs(self, key: int, lines: Sequence[tuple[float, str, str]]) -> None:
        if not lines:
            return
        with self._c.cursor() as cur:
            cur.executemany(
                "INSERT INTO logs (key, ts, level, message) VALUES (%s, %s, %s, %s)",
                [(key, ts, level, _text(message)) for ts, level, message in lines],
            )

    def read_logs(self, key: int, after_id: int, limit: int) -> list[LogRecord]:
        rows = self._c.execute(
            "SELECT id, ts, level, message FROM logs WHERE key = %s AND id > %s"
            " ORDER BY id LIMIT %s",
            (key, after_id, limit),
        ).fetchall()
        return [LogRecord(*r) for r in rows]

    def put_code_version(self, tenant_id: str, version: str, files: bytes, now: float) -> None:
        self._c.execute(
            "INSERT INTO code_versions (tenant_id, version, files, created_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, version) DO NOTHING",
            (tenant_id, version, files, now),
        )


class PostgresStore(Store):
    """A PostgreSQL database: one writer connection, one reader connection.

    ``url`` is a libpq URL or conninfo string. ``schema`` puts every table in that
    schema (created when missing); without it, the first schema of the URL's
    ``options=-csearch_path=...`` is used, else the server's current schema.
    """

    shared = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        self.url = url
        self.reconnect_timeout = reconnect_timeout
        #: How many times a lost connection was replaced (for tests and logs).
        self.reconnects = 0
        self._set_path = schema is not None
        self.schema: str | None = schema if schema is not None else _schema_from_url(url)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        #: The NOTIFY channel of this schema (supervisors on other schemas never hear it).
        self.channel = ""
        self._writer = self._connect()
        try:
            self._migrate()
            self._reader = self._connect_reader()
        except BaseException:
            self._writer.close()
            raise

    def _connect_reader(self) -> Connection:
        conn = self._connect()
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return conn

    def _reconnect(self, connect: Callable[[], Connection], lost: Connection) -> Connection:
        """A new connection in place of ``lost``, retried with a capped backoff."""
        try:
            lost.close()
        except psycopg.Error:
            pass
        deadline = time.monotonic() + self.reconnect_timeout
        delay = _RETRY_FIRST
        while True:
            if self._closed:
                raise StorageError("the store is closed")
            try:
                conn = connect()
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageError(
                        f"PostgreSQL unreachable for {self.reconnect_timeout:.0f}s: {exc}"
                    ) from exc
                log.warning("PostgreSQL connection lost; retrying in %.2fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(_RETRY_CAP, delay * 2)
                continue
            self.reconnects += 1
            return conn

    def _connect(self) -> Connection:
        try:
            conn = psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            if self._set_path:
                assert self.schema is not None
                path = sql.Identifier(self.schema).as_string(conn)
                conn.execute("SELECT pg_catalog.set_config('search_path', %s, false)", (path,))
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"cannot set up the PostgreSQL connection: {exc}") from exc
        return conn

    def _migrate(self) -> None:
        conn = self._writer
        try:
            schema = self.schema
            if schema is None:
                row = conn.execute("SELECT current_schema()").fetchone()
                schema = None if row is None else row[0]
                if schema is None:
                    raise StorageError(
                        "PostgreSQL has no schema to create tables in: none of search_path "
                        "exists; pass schema= or options=-csearch_path=NAME in the URL"
                    )
            self.channel = _channel(schema)
            # Fast path, no DDL and no lock (a role without CREATE privilege may start).
            if self._schema_version(schema) != SCHEMA_VERSION:
                # One migrator at a time per schema; the others wait, then find it done.
                conn.execute(
                    f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK}, hashtext(%s))", (schema,)
                )
                self._upgrade(schema)
            conn.commit()
        except psycopg.Error as exc:
            _rollback(conn)
            raise StorageError(f"PostgreSQL schema migration failed: {exc}") from exc
        except BaseException:
            _rollback(conn)
            raise

    def _schema_version(self, schema: str) -> int:
        """The version recorded in ``tenantflow_meta`` (0: none); refuses a newer one."""
        conn = self._writer
        row = conn.execute("SELECT to_regclass('tenantflow_meta') IS NOT NULL").fetchone()
        if row is None or not row[0]:
            return 0
        row = conn.execute("SELECT value FROM tenantflow_meta WHERE key = 'schema'").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"the database (schema {schema!r}) has schema version {current}, newer than "
                f"this tenantflow ({SCHEMA_VERSION}); upgrade tenantflow"
            )
        return current

    def _upgrade(self, schema: str) -> None:
        """Create or migrate the schema; the caller holds the migration lock."""
        conn = self._writer
        if self.schema is not None:
            exists = conn.execute(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        current = self._schema_version(schema)  # again: another migrator may have run
        if current == SCHEMA_VERSION:
            return
        conn.execute(
            "CREATE TABLE IF NOT EXISTS tenantflow_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        for version, ddl in MIGRATIONS:
            if version > current:
                conn.execute(ddl)
        conn.execute(
            "INSERT INTO tenantflow_meta (key, value) VALUES ('schema', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (str(SCHEMA_VERSION),),
        )

    def write(self, units: Sequence[Unit]) -> list[Outcome]:
        with self._write_lock:
            while True:
                if self._writer.closed or self._writer.broken:
                    self._writer = self._reconnect(self._connect, self._writer)
                try:
                    return self._write_units(units)
                except _ConnectionLost as exc:
                    self._writer = self._reconnect(self._connect, self._writer)
                    if exc.committing:
                        # Applied or not, nobody knows: never apply it twice (see above).
                        raise StorageError(
                            "PostgreSQL connection lost during COMMIT: the outcome of this "
                            "write is unknown"
                        ) from exc
                    # Lost before COMMIT: rolled back by the server, run it again.
                    log.warning("PostgreSQL connection lost before COMMIT; writing again")

    def _write_units(self, units: Sequence[Unit]) -> list[Outcome]:
        # Optimistic: units almost never fail, so run them without savepoints (two
        # round trips less per unit). If one does fail, roll back and run the batch
        # again with a savepoint around each unit, so the others still commit.
        outcomes = self._write_batch(units, isolated=False)
        if any(o.error is not None for o in outcomes):
            outcomes = self._write_batch(units, isolated=True)
        return outcomes

    def _write_batch(self, units: Sequence[Unit], *, isolated: bool) -> list[Outcome]:
        conn = self._writer
        txn = PostgresTxn(conn)
        outcomes: list[Outcome] = []
        committing = False
        try:
            for unit in units:
                if isolated:
                    conn.execute("SAVEPOINT unit")
                try:
                    value = unit(txn)
                    if conn.info.transaction_status == TransactionStatus.INERROR:
                        raise StorageError("the unit caught a database error and went on")
                except Exception as exc:
                    if conn.broken or conn.closed:
                        raise _ConnectionLost(
                            f"PostgreSQL connection lost: {exc}", committing=False
                        ) from exc
                    error = _storage_error(exc)
                    if not isolated:
                        _rollback(conn)
                        return [Outcome(error=error)]
                    conn.execute("ROLLBACK TO SAVEPOINT unit")
                    conn.execute("RELEASE SAVEPOINT unit")
                    outcomes.append(Outcome(error=error))
                else:
                    if isolated:
                        conn.execute("RELEASE SAVEPOINT unit")
                    outcomes.append(Outcome(value=value))
            if txn.announced:
                # NOTIFY is transactional: delivered at COMMIT, never if rolled back.
                conn.execute(
                    "SELECT pg_notify(%s, m) FROM unnest(%s::text[]) AS m",
                    (self.channel, sorted(txn.announced)),
                )
            committing = True
            conn.commit()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise _ConnectionLost(
                    f"PostgreSQL connection lost: {exc}", committing=committing
                ) from exc
            _rollback(conn)
            raise StorageError(f"PostgreSQL write failed: {exc}") from exc
        except BaseException:
            _rollback(conn)
            raise
        return outcomes

    def read(self, fn: Callable[[StoreTxn], T]) -> T:
        with self._read_lock:
            while True:
                if self._reader.closed or self._reader.broken:
                    self._reader = self._reconnect(self._connect_reader, self._reader)
                conn = self._reader
                try:
                    result = fn(PostgresTxn(conn))
                    conn.rollback()  # read-only: ending it either way releases the snapshot
                except psycopg.Error as exc:
                    if conn.broken or conn.closed:
                        # A read changes nothing: run it again on a new connection.
                        self._reader = self._reconnect(self._connect_reader, conn)
                        continue
                    _rollback(conn)
                    raise StorageError(f"PostgreSQL read failed: {exc}") from exc
                except BaseException:
                    _rollback(conn)
                    raise
                return result

    def listen(self, on_notices: NoticeHandler) -> Callable[[], None]:
        """LISTEN on a connection of its own, in a thread of its own.

        A lost connection is replaced (capped backoff, for as long as it takes); since
        notices sent meanwhile are gone, ``on_notices`` then gets ``Notice.MISSED``.
        Our own notices (sent by our writer's backend) are left out.
        """
        stop = threading.Event()
        thread = threading.Thread(
            target=self._listen, args=(on_notices, stop), name="tenantflow-listen", daemon=True
        )
        thread.start()

        def stop_listening() -> None:
            # Not joined: the caller is often the event loop. The thread sees the flag
            # within _LISTEN_WAKE_SECONDS (or at close) and ends; it is a daemon.
            stop.set()

        return stop_listening

    def _listen(self, on_notices: NoticeHandler, stop: threading.Event) -> None:
        conn: Connection | None = None
        delay = _RETRY_FIRST
        lost = False
        while not stop.is_set() and not self._closed:
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    delay = _RETRY_FIRST
                    if lost:
                        on_notices([(Notice.MISSED, "")])
                # Each notice is handed over as it arrives (the handler coalesces them).
                for note in conn.notifies(timeout=_LISTEN_WAKE_SECONDS):
                    if note.pid == self._writer.info.backend_pid:
                        continue  # our own
                    kind, _, subject = note.payload.partition(" ")
                    try:
                        notice = Notice(kind)
                    except ValueError:
                        log.warning("ignoring an unknown notice %r", note.payload[:100])
                        continue
                    on_notices([(notice, subject)])
            except psycopg.Error as exc:
                if conn is not None:
                    conn.close()
                conn, lost = None, True
                if stop.is_set() or self._closed:
                    break
                log.warning(
                    "PostgreSQL listener lost its connection; again in %.2fs: %s", delay, exc
                )
                stop.wait(delay)
                delay = min(_RETRY_CAP, delay * 2)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in (self._reader, self._writer):
            try:
                conn.close()
            except psycopg.Error:
                pass


def _channel(schema: str) -> str:
    """The NOTIFY channel of a schema: an identifier of at most 63 bytes."""
    name = f"tenantflow.{schema}"
    if len(name.encode()) > 63:
        name = "tenantflow." + hashlib.sha256(schema.encode()).hexdigest()[:40]
    return name


def _rollback(conn: Connection) -> None:
    """Roll back whatever is open; a dead connection has nothing left to roll back."""
    if conn.closed:
        return
    try:
        conn.rollback()
    except psycopg.Error:
        pass


def _storage_error(exc: Exception) -> Exception:
    """A unit's error as its caller sees it: database errors become StorageError."""
    if isinstance(exc, psycopg.Error):
        wrapped = StorageError(f"PostgreSQL error: {exc}")
        wrapped.__cause__ = exc
        return wrapped
    return exc
