"""Back-pressure: a database that stops keeping up gets 503s, not a crash or a pile-up.

A real supervisor (sandboxes, HTTP) on PostgreSQL; another connection takes an
ACCESS EXCLUSIVE lock on ``instances`` and holds it, so every write (and read) of the
supervisor waits, as with a stalled or overloaded database. Writes that were accepted
before wait and commit once the lock goes; new ones are refused up front with
``storage.busy`` and ``Retry-After`` (nothing half-done); the supervisor stays up, and
everything accepted completes once the database is back.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import trio
from psycopg import sql as pgsql

from runtime._engine import _API_READERS as READERS
from runtime._http import serve_http
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor

from .test_leases import URL, schema

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(URL is None, reason="set TENANTFLOW_TEST_POSTGRES_URL to run"),
]
__all__ = ["schema"]  # the fixture, imported for this module's tests
WAIT = 60  # a bound on every wait, never an expectation
LAG = 0.5  # --max-write-lag for the test
T = "shop"
SOURCE = """\
from tenantflow import WorkflowEntrypoint

class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: event.payload)
"""


@asynccontextmanager
async def served(
    tmp_path: Path, schema: str
) -> AsyncIterator[tuple[Supervisor, httpx.AsyncClient]]:
    assert URL is not None
    (tmp_path / "tenants" / T).mkdir(parents=True)
    (tmp_path / "tenants" / T / "main.py").write_text(SOURCE)
    url = f"{URL}{'&' if '?' in URL else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(schema)))
    config = SupervisorConfig(
        tenants_dir=tmp_path / "tenants", db_url=url, max_write_lag=LAG, idle_timeout=60
    )
    async with AsyncExitStack() as stack:
        supervisor = await stack.enter_async_context(open_supervisor(config))
        nursery = await stack.enter_async_context(trio.open_nursery())
        port = await nursery.start(functools.partial(serve_http, supervisor, port=0))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as c:
            yield supervisor, c
        nursery.cancel_scope.cancel()


async def test_a_stalled_database_gets_503_and_everything_accepted_completes(
    tmp_path: Path, schema: str
) -> None:
    async with served(tmp_path, schema) as (supervisor, client):
        engine = supervisor.engine
        first = await client.post(f"/v1/tenants/{T}/instances", json={"params": 0})
        assert first.status_code == 201

        locker = psycopg.connect(URL, autocommit=False)  # type: ignore[arg-type]
        try:
            locker.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema)))
            locker.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
            accepted: list[httpx.Response] = []

            async def create_waiting() -> None:
                accepted.append(await client.post(f"/v1/tenants/{T}/instances", json={"params": 1}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create_waiting)  # queued before the lag: it waits
                with trio.fail_after(WAIT):
                    while not engine.write_congested():
                        await trio.sleep(0.05)
                refused = await client.post(f"/v1/tenants/{T}/instances", json={"params": 2})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "storage.busy"
                assert int(refused.headers["retry-after"]) >= 1
                event = await client.post(
                    f"/v1/tenants/{T}/instances/{first.json()['id']}/events",
                    json={"type": "x", "payload": 1},
                )
                assert event.status_code == 503
                # the supervisor is up and says why it refuses
                assert (await client.get("/healthz")).status_code == 200
                assert engine.stats.busy_refusals >= 2
                assert not accepted  # still waiting for its commit
                locker.rollback()  # the database is back
            assert [r.status_code for r in accepted] == [201]
        finally:
            locker.close()

        after = await client.post(f"/v1/tenants/{T}/instances", json={"params": 3})
        assert after.status_code == 201
        ids = [first.json()["id"], accepted[0].json()["id"], after.json()["id"]]
        with trio.fail_after(WAIT):
            for iid in ids:
                await engine.wait_for_status(T, iid, ["complete"])
        outputs = [(await engine.get(T, iid)).record.output for iid in ids]
        assert outputs == [0, 1, 3]
        listed = (await client.get(f"/v1/tenants/{T}/instances")).json()["instances"]
        assert len(listed) == 3  # the refused create left nothing behind
        metrics = (await client.get("/metrics")).text
        assert "tenantflow_busy_refusals_total" in metrics


async def test_reads_beyond_the_bound_get_503_while_the_database_stalls(
    tmp_path: Path, schema: str
) -> None:
    """Reads stuck behind the lock hold their slots; the one beyond them is refused after
    --max-write-lag instead of queuing without bound; all answer once the lock goes."""
    async with served(tmp_path, schema) as (supervisor, client):
        iid = (await client.post(f"/v1/tenants/{T}/instances", json={"params": 0})).json()["id"]
        with trio.fail_after(WAIT):
            await supervisor.engine.wait_for_status(T, iid, ["complete"])
        locker = psycopg.connect(URL, autocommit=False)  # type: ignore[arg-type]
        try:
            locker.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema)))
            locker.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
            answers: list[int] = []

            async def read() -> None:
                answers.append((await client.get(f"/v1/tenants/{T}/instances/{iid}")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(READERS):
                    nursery.start_soon(read)  # each holds a read slot, stuck on the lock
                with trio.fail_after(WAIT):
                    while supervisor.engine._api_readers.borrowed_tokens < READERS:
                        await trio.sleep(0.02)
                refused = await client.get(f"/v1/tenants/{T}/instances/{iid}")
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "storage.busy"
                assert "retry-after" in refused.headers
                assert (await client.get("/healthz")).status_code == 200
                locker.rollback()
            assert answers == [200] * READERS
        finally:
            locker.close()
