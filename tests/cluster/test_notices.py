"""Supervisors sharing one PostgreSQL hear each other (LISTEN/NOTIFY), in one process.

Leases here are 10 minutes, so a lease renewal (every 200 s) cannot be what carries a
stop to the supervisor holding an instance, and the dispatcher's 5 s safety net is
ruled out by counting what each engine heard. Waits have generous bounds; no test
asserts how fast a notice arrives (``make bench`` measures that).
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import trio

from runtime import InProcessRunner
from sandbox.sdk import WorkflowEntrypoint

from .test_leases import URL, schema, sql, supervisor

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(URL is None, reason="set TENANTFLOW_TEST_POSTGRES_URL to run"),
]
__all__ = ["schema"]  # the fixture, imported for this module's tests
T = "acme"
LEASE = 600.0


def blocking_workflow(started: threading.Event, release: threading.Event) -> type:
    class Wf(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            def long() -> str:
                started.set()
                release.wait(60)
                return "done"

            step.do("long", long)
            return step.wait_for_event("approval", type="approval", timeout="1 hour")["payload"]

    return Wf


async def wait_thread(event: threading.Event) -> None:
    assert await trio.to_thread.run_sync(event.wait, 60), "the workflow never got there"


async def test_terminate_through_another_supervisor_stops_the_owner_at_once(schema: str):
    started, release = threading.Event(), threading.Event()
    wf = blocking_workflow(started, release)
    try:
        async with supervisor(schema, InProcessRunner({T: wf}), "A", LEASE) as a:
            iid, _ = await a.create(T)
            await wait_thread(started)  # running on A, inside a long step
            async with supervisor(schema, InProcessRunner({T: wf}), "B", LEASE) as b:
                assert await b.terminate(T, iid) == "terminated"
                with trio.fail_after(30):
                    while iid in {s.instance_id for s in a._sessions.values()}:
                        await trio.sleep(0.01)
                assert a.notices is not None and a.notices.heard > 0
                assert await a.status(T, iid) == "terminated"
    finally:
        release.set()


async def test_a_watcher_on_one_supervisor_sees_an_instance_finish_on_another(schema: str):
    started, release = threading.Event(), threading.Event()
    wf = blocking_workflow(started, release)
    try:
        async with (
            supervisor(schema, InProcessRunner({T: wf}), "A", LEASE) as a,
            supervisor(schema, InProcessRunner({T: wf}), "B", LEASE) as b,
        ):
            iid, _ = await a.create(T)
            await wait_thread(started)
            running_on = "A" if a._sessions else "B"
            watcher = b if running_on == "A" else a
            async with trio.open_nursery() as nursery:
                seen: list[str] = []

                async def watch() -> None:
                    seen.append(await watcher.wait_for_status(T, iid, ["waiting"]))
                    seen.append(await watcher.wait_for_status(T, iid, ["complete"]))

                nursery.start_soon(watch)
                release.set()
                with trio.fail_after(30):
                    while not seen:
                        await trio.sleep(0.01)
                # the event is sent through the watcher; the instance may run anywhere
                await watcher.send_event(T, iid, "approval", {"ok": True})
                with trio.fail_after(30):
                    while len(seen) < 2:
                        await trio.sleep(0.01)
            assert seen == ["waiting", "complete"]
            assert (await b.get(T, iid)).record.output == {"ok": True}
    finally:
        release.set()


async def test_an_idle_supervisor_takes_work_another_one_queued(schema: str):
    """B is full (one slot, held); what it queues is started by A, told by a notice."""
    started, release = threading.Event(), threading.Event()
    ran_on: dict[str, str] = {}

    class Quick(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            return step.do("one", lambda: event.instance_id)

    def runner(name: str) -> InProcessRunner:
        class Tagged(Quick):
            def run(self, event: Any, step: Any) -> Any:
                ran_on[event.instance_id] = name
                return super().run(event, step)

        return InProcessRunner({T: Tagged, "blocker": blocking_workflow(started, release)})

    try:
        async with supervisor(schema, runner("A"), "A", LEASE) as a:
            a.max_concurrency = 1
            async with supervisor(schema, runner("B"), "B", LEASE) as b:
                b.max_concurrency = 1
                await b.create("blocker")  # B's only slot, or A's: whoever claims first
                await wait_thread(started)
                idle = a if b._sessions else b
                busy = b if idle is a else a
                heard_before = idle.notices.heard if idle.notices else 0
                ids = [(await busy.create(T))[0] for _ in range(5)]
                with trio.fail_after(30):
                    for iid in ids:
                        await idle.wait_for_status(T, iid, ["complete"])
                assert {ran_on[iid] for iid in ids} == {idle.owner}
                assert idle.notices is not None and idle.notices.heard > heard_before
    finally:
        release.set()


async def test_the_listener_reconnects_and_looks_again(schema: str):
    """Its connection killed, the listener comes back (and rereads the queues)."""

    class Quick(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> Any:
            return step.do("one", lambda: 1)

    async with supervisor(schema, InProcessRunner({T: Quick}), "A", LEASE) as a:
        channel = a.store.channel  # type: ignore[attr-defined]

        def listeners() -> list[tuple[Any, ...]]:
            return sql(
                schema,
                "SELECT pid FROM pg_stat_activity WHERE query = "
                + psycopg.sql.Literal(f'LISTEN "{channel}"').as_string(None),
            )

        with trio.fail_after(30):
            while not listeners():
                await trio.sleep(0.05)
        old = listeners()
        assert a.notices is not None
        heard = a.notices.heard
        for (pid,) in old:
            sql(schema, f"SELECT pg_terminate_backend({pid})")
        with trio.fail_after(30):
            while not (now := listeners()) or now == old:
                await trio.sleep(0.05)
        with trio.fail_after(30):
            while a.notices.heard == heard:  # MISSED, at least
                await trio.sleep(0.05)
        async with supervisor(schema, InProcessRunner({T: Quick}), "B", LEASE) as b:
            iid, _ = await b.create(T)
            with trio.fail_after(30):
                assert await a.wait_for_status(T, iid, ["complete"]) == "complete"
