"""Leases between supervisors sharing one PostgreSQL, in one process (engines as peers).

Real processes (SIGKILL, SIGSTOP) are in test_failover.py; here two engines share a
schema and the test decides who holds what.
"""

from __future__ import annotations

import collections
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

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
    import psycopg
    from psycopg import sql

    name = f"tf_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    yield name
    assert URL is not None
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute("SET lock_timeout = '10s'")
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def sql(schema: str, query: str) -> list[tuple[Any, ...]]:
    import psycopg

    assert URL is not None
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute(f'SET search_path TO "{schema}"')
        cur = pg.execute(query)
        return cur.fetchall() if cur.description is not None else []


@asynccontextmanager
async def supervisor(schema: str, runner: Any, name: str, lease: float) -> AsyncIterator[Engine]:
    assert URL is not None
    store = PostgresStore(URL, schema=schema)
    engine = Engine(store, runner, owner=name, lease_seconds=lease)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_taken_over_instance_is_aborted_on_its_old_supervisor(schema: str) -> None:
    CALLS.clear()
    gate = threading.Event()
    started = threading.Event()

    def slow() -> str:
        CALLS["slow"] += 1
        started.set()
        gate.wait(10)
        return f"slow-{CALLS['slow']}"

    class Wf(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            a = step.do("a", lambda: CALLS.update(["a"]) or "A")
            return [a, step.do("slow", slow)]

    try:
        async with supervisor(schema, InProcessRunner({T: Wf}), "A", 0.6) as a:
            iid, _ = await a.create(T)
            assert await trio.to_thread.run_sync(started.wait, 10)
            started.clear()
            # A stalls as far as the database can tell: its lease is someone else's, expired.
            sql(schema, "UPDATE instances SET owner = 'ghost', lease_expires_at = 0")
            async with supervisor(schema, InProcessRunner({T: Wf}), "B", 0.6) as b:
                assert b.recovered == 1  # at start: the expired lease, and only it
                assert await trio.to_thread.run_sync(started.wait, 10)  # B runs it again
                with trio.fail_after(5):
                    while a.leases_lost == 0:
                        await trio.sleep(0.05)
                assert not a.busy_keys()
                gate.set()
                with trio.fail_after(10):
                    status = await b.wait_for_status(T, iid, ["complete", "errored"])
                assert status == "complete"
                view = await b.get(T, iid)
    finally:
        gate.set()
    assert view.record.output == ["A", "slow-2"]  # B's attempt; A's late result dropped
    assert CALLS == {"a": 1, "slow": 2}
    assert [(s.name, s.status) for s in view.steps] == [("a", "complete"), ("slow", "complete")]
    assert sql(schema, "SELECT owner FROM instances") == [("B",)]


async def test_live_leases_are_not_recovered_and_expired_ones_are(schema: str) -> None:
    gate = threading.Event()

    class Wf(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            return step.do("wait", lambda: gate.wait(10) and "done")

    try:
        async with supervisor(schema, InProcessRunner({T: Wf}), "A", 0.6) as a:
            ids = [(await a.create(T))[0] for _ in range(3)]
            with trio.fail_after(10):
                while len(a.busy_keys()) < 3:
                    await trio.sleep(0.02)
            async with supervisor(schema, InProcessRunner({T: Wf}), "B", 0.6) as b:
                await trio.sleep(1.5)  # several renewal periods of both
                assert b.recovered == 0 and a.leases_lost == 0
                assert sql(schema, "SELECT DISTINCT owner FROM instances") == [("A",)]
                gate.set()
                for iid in ids:
                    with trio.fail_after(10):
                        assert await a.wait_for_status(T, iid, ["complete"]) == "complete"
    finally:
        gate.set()


async def test_a_timer_set_by_a_gone_supervisor_fires_on_another(schema: str) -> None:
    class Wf(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            step.sleep("nap", "1 second")
            return "woke"

    async with supervisor(schema, InProcessRunner({T: Wf}), "B", 0.6) as b:
        async with supervisor(schema, InProcessRunner({T: Wf}), "A", 0.6) as a:
            iid, _ = await a.create(T)
            with trio.fail_after(10):
                assert await a.wait_for_status(T, iid, ["waiting"]) == "waiting"
        # A is gone; B never heard of the timer, and fires it from the database.
        with trio.fail_after(5):
            while (await b.status(T, iid)) != "complete":
                await trio.sleep(0.05)
        assert (await b.get(T, iid)).record.output == "woke"


async def test_a_lease_renewal_sharing_the_commit_of_a_start_at_once_keeps_it(
    schema: str,
) -> None:
    """A create with a free slot claims its instance in its own commit. A renewal that
    commits right after it, in the same batch, sees the lease held: the activation must
    already count as ours then, or it is released as an orphan (requeued with a new
    token) and claimed a second time."""
    started: list[str] = []

    class Quick(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> str:
            started.append(event.instance_id)
            return str(step.do("work", lambda: "done"))

    async with supervisor(schema, InProcessRunner({T: Quick}), "sup-a", 30.0) as engine:
        hold = threading.Event()
        # Park the commit thread so the create and the renewal queue into one batch.
        engine.writer.submit_nowait(lambda txn: hold.wait(10))
        await trio.testing.wait_all_tasks_blocked()  # the parking commit is in flight
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: engine.create(T, instance_id="renewed"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(engine.renew_leases)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.writer.backlog == 2  # the create's unit, then the renewal's
            hold.set()
        with trio.fail_after(10):
            assert await engine.wait_for_status(T, "renewed", ["complete"]) == "complete"
        assert (await engine.get(T, "renewed")).record.run_token == 1  # claimed once
        assert engine.stats.activations == 1
        assert started == ["renewed"]
