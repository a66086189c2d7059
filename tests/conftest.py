"""Shared fixtures: a real store per test (SQLite file or PostgreSQL schema), a mock clock,
the in-process runner.

Every test that uses ``env``, ``manual_env`` or ``store_location`` runs once per storage
backend: ``[sqlite]`` on a file in ``tmp_path``, ``[postgres]`` in a fresh schema of the
database named by ``TENANTFLOW_TEST_POSTGRES_URL`` (dropped after the test), skipped when
that variable is unset.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from runtime import Engine, InProcessRunner, MockClock, Store, open_store
from runtime.testing import autojump

POSTGRES_URL = os.environ.get("TENANTFLOW_TEST_POSTGRES_URL")
POSTGRES_SKIP_REASON = (
    "PostgreSQL tests are off: set TENANTFLOW_TEST_POSTGRES_URL to enable them, e.g. "
    "TENANTFLOW_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test "
    "(start the server with: pg_ctlcluster --skip-systemctl-redirect "
    "$(ls /etc/postgresql) main start)"
)

STORE_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgres",
        id="postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(POSTGRES_URL is None, reason=POSTGRES_SKIP_REASON),
        ],
    ),
]


@dataclass
class StoreLocation:
    """Where a test's database lives; ``open()`` opens a store there (as often as needed)."""

    backend: str  #: "sqlite" or "postgres"
    path: Path  #: the SQLite file (unused with PostgreSQL)
    schema: str | None = None  #: the PostgreSQL schema (None with SQLite)

    def open(self) -> Store:
        if self.backend == "sqlite":
            return open_store(str(self.path))
        from runtime._storage_postgres import PostgresStore

        assert POSTGRES_URL is not None and self.schema is not None
        return PostgresStore(POSTGRES_URL, schema=self.schema)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Run one literal SQL statement on a connection of its own and commit."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.path)
            try:
                rows = conn.execute(query).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        import psycopg
        from psycopg import sql

        assert POSTGRES_URL is not None and self.schema is not None
        with psycopg.connect(POSTGRES_URL, autocommit=True) as pg:
            pg.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            cur = pg.execute(query)
            return cur.fetchall() if cur.description is not None else []


def _drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    assert POSTGRES_URL is not None
    with psycopg.connect(POSTGRES_URL, autocommit=True) as pg:
        pg.execute("SET lock_timeout = '10s'")
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=STORE_BACKENDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreLocation]:
    """A fresh, empty database for one test, on each backend in turn."""
    backend: str = request.param
    if backend == "sqlite":
        yield StoreLocation("sqlite", tmp_path / "engine.db")
        return
    schema = f"tf_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    try:
        yield StoreLocation("postgres", tmp_path / "engine.db", schema)
    finally:
        _drop_schema(schema)


@dataclass
class EngineEnv:
    """A running engine on a real store (SQLite file or PostgreSQL schema), with its runner
    and mock clock. ``db_path`` is the SQLite file (unused on PostgreSQL)."""

    engine: Engine
    runner: InProcessRunner
    clock: MockClock
    store: Store
    db_path: Path


@pytest.fixture
async def env(store_location: StoreLocation) -> AsyncIterator[EngineEnv]:
    """An engine with time-skipping: sleeps and backoffs cost no real time."""
    store = store_location.open()
    clock = MockClock()
    runner = InProcessRunner({})
    engine = Engine(store, runner, clock=clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            nursery.start_soon(autojump, engine, clock)
            yield EngineEnv(engine, runner, clock, store, store_location.path)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
async def manual_env(store_location: StoreLocation) -> AsyncIterator[EngineEnv]:
    """An engine whose mock clock moves only when the test moves it."""
    store = store_location.open()
    clock = MockClock()
    runner = InProcessRunner({})
    engine = Engine(store, runner, clock=clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield EngineEnv(engine, runner, clock, store, store_location.path)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
