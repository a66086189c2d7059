"""Shared fixtures: a real SQLite file per test, a mock clock, the in-process runner."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from runtime import Engine, InProcessRunner, MockClock, Store, open_store
from runtime.testing import autojump

POSTGRES_URL = os.environ.get("TENANTFLOW_TEST_POSTGRES_URL")


@dataclass
class EngineEnv:
    """A running engine on a real SQLite file, with its runner and mock clock."""

    engine: Engine
    runner: InProcessRunner
    clock: MockClock
    store: Store
    db_path: Path


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[EngineEnv]:
    """An engine with time-skipping: sleeps and backoffs cost no real time."""
    db_path = tmp_path / "engine.db"
    store = open_store(str(db_path))
    clock = MockClock()
    runner = InProcessRunner({})
    engine = Engine(store, runner, clock=clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            nursery.start_soon(autojump, engine, clock)
            yield EngineEnv(engine, runner, clock, store, db_path)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
async def manual_env(tmp_path: Path) -> AsyncIterator[EngineEnv]:
    """An engine whose mock clock moves only when the test moves it."""
    db_path = tmp_path / "engine.db"
    store = open_store(str(db_path))
    clock = MockClock()
    runner = InProcessRunner({})
    engine = Engine(store, runner, clock=clock)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield EngineEnv(engine, runner, clock, store, db_path)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
