"""PostgreSQL connections lost mid-run: the engine reconnects and loses nothing."""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import trio

from runtime import Engine, InProcessRunner
from runtime._storage_postgres import PostgresStore
from sandbox.sdk import WorkflowEntrypoint

URL = os.environ.get("TENANTFLOW_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(URL is None, reason="set TENANTFLOW_TEST_POSTGRES_URL to run"),
]
T = "acme"
CALLS: collections.Counter[str] = collections.Counter()


@pytest.fixture
def schema() -> Iterator[str]:
    from psycopg import sql

    name = f"tf_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    yield name
    assert URL is not None
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute("SET lock_timeout = '10s'")
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def terminate(store: Any) -> None:
    assert URL is not None
    pids = [store._writer.info.backend_pid, store._reader.info.backend_pid]
    with psycopg.connect(URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))


async def test_connections_killed_mid_run_lose_nothing(schema: str) -> None:
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            out = []
            for i in range(5):
                out.append(step.do(f"s{i}", lambda i=i: CALLS.update([f"s{i}"]) or i))
                step.sleep(f"z{i}", 0.02)
            return out

    assert URL is not None
    store = PostgresStore(URL, schema=schema)
    engine = Engine(store, InProcessRunner({T: Wf}), owner="me", lease_seconds=3)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            ids = [(await engine.create(T, params=n))[0] for n in range(20)]
            for _ in range(4):
                await trio.sleep(0.25)
                await trio.to_thread.run_sync(terminate, store)
            with trio.fail_after(30):
                for iid in ids:
                    status = await engine.wait_for_status(T, iid, ["complete", "errored"])
                    assert status == "complete", (await engine.get(T, iid)).record.error
            for iid in ids:
                view = await engine.get(T, iid)
                assert view.record.output == [0, 1, 2, 3, 4]
                dos = [s for s in view.steps if s.name.startswith("s")]
                assert [(s.name, s.status, s.attempts) for s in dos] == [
                    (f"s{i}", "complete", 1) for i in range(5)
                ]
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    # Each kill costs a reconnect only if the connection is used again before the next
    # kill (the workload may finish first): at least one happened, and nothing was lost.
    assert store.reconnects >= 1
    # A step runs again only if its activation was lost (at least once, never recorded twice).
    assert sum(CALLS.values()) >= 100
