"""What only the PostgreSQL store has: several supervisors on one database (fencing under
concurrency), connection loss, the schema taken from the URL.

Skipped unless TENANTFLOW_TEST_POSTGRES_URL is set (see tests/conftest.py).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest

from runtime import open_store
from runtime._models import InstanceStatus, StepRecord
from runtime._storage import Store, StoreTxn
from runtime.errors import LeaseLost, StorageError
from sandbox.protocol import StepKind, StepStatus

URL = os.environ.get("TENANTFLOW_TEST_POSTGRES_URL")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        URL is None,
        reason="PostgreSQL tests are off: set TENANTFLOW_TEST_POSTGRES_URL to enable them, "
        "e.g. TENANTFLOW_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test",
    ),
]

T = "acme"
WAIT = 10.0


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


@pytest.fixture
def two(schema: str) -> Iterator[tuple[Store, Store]]:
    """Two supervisors' stores on the same database."""
    from runtime._storage_postgres import PostgresStore

    assert URL is not None
    a = PostgresStore(URL, schema=schema)
    b = PostgresStore(URL, schema=schema)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def w(store: Store, unit: Callable[[StoreTxn], Any]) -> Any:
    [outcome] = store.write([unit])
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def step(seq: int) -> StepRecord:
    return StepRecord(
        seq=seq, name=f"s{seq}", count=1, kind=StepKind.DO, status=StepStatus.COMPLETE
    )


def running_instance(store: Store) -> tuple[int, int]:
    key = w(store, lambda t: t.insert_instance(T, "i1", "Wf", "v1", None, 1.0))
    record = w(store, lambda t: t.claim_queued(key, 2.0))
    return key, record.run_token


class Blocked:
    """Runs ``store.write([unit])`` in a thread whose unit stops midway until released."""

    def __init__(
        self, store: Store, before: Callable[[StoreTxn], Any], *, then_fail: bool = False
    ) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.outcome: Any = None

        def unit(t: StoreTxn) -> Any:
            value = before(t)
            self.reached.set()
            assert self.release.wait(WAIT)
            if then_fail:
                raise RuntimeError("changed its mind")
            return value

        def run() -> None:
            [self.outcome] = store.write([unit])

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.reached.wait(WAIT)

    def finish(self) -> Any:
        self.release.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.outcome


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_a_re_lease_waits_for_the_holders_step_write_then_fences_it(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    key, token = running_instance(a)
    # Supervisor A writes a step and has not committed yet...
    pending = Blocked(a, lambda t: t.put_step(key, token, step(0)))
    # ...so supervisor B's takeover (token bump) waits for A's commit.
    thread, result = in_thread(lambda: w(b, lambda t: t.update_instance(key, 3.0, new_token=True)))
    time.sleep(0.3)
    assert thread.is_alive() and result == [], "the takeover did not wait for the holder"
    assert pending.finish().error is None
    thread.join(WAIT)
    assert result == [token + 1]
    # B sees A's step; A can never write again.
    assert [s.seq for s in b.read(lambda t: t.load_steps(key))] == [0]
    with pytest.raises(LeaseLost):
        w(a, lambda t: t.put_step(key, token, step(1)))
    with pytest.raises(LeaseLost):
        w(a, lambda t: t.update_instance(key, 4.0, token=token, status=InstanceStatus.COMPLETE))


def test_a_step_write_racing_an_uncommitted_re_lease_is_lease_lost(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    key, token = running_instance(a)
    takeover = Blocked(b, lambda t: t.update_instance(key, 3.0, new_token=True))
    thread, result = in_thread(lambda: w(a, lambda t: t.put_step(key, token, step(0))))
    time.sleep(0.3)
    assert thread.is_alive() and result == [], "the step write did not wait for the takeover"
    assert takeover.finish().error is None
    thread.join(WAIT)
    assert len(result) == 1 and isinstance(result[0], LeaseLost)
    assert b.read(lambda t: t.load_steps(key)) == []


def test_a_fenced_update_racing_an_uncommitted_re_lease_is_lease_lost(
    two: tuple[Store, Store],
) -> None:
    a, b = two
    key, token = running_instance(a)
    takeover = Blocked(b, lambda t: t.update_instance(key, 3.0, new_token=True))
    thread, result = in_thread(
        lambda: w(a, lambda t: t.update_instance(key, 4.0, token=token, wake_at=99.0))
    )
    time.sleep(0.3)
    assert thread.is_alive()
    assert takeover.finish().error is None
    thread.join(WAIT)
    assert len(result) == 1 and isinstance(result[0], LeaseLost)
    assert b.read(lambda t: t.get_instance_by_key(key)).wake_at is None


def test_an_aborted_takeover_leaves_the_holder_its_lease(two: tuple[Store, Store]) -> None:
    a, b = two
    key, token = running_instance(a)
    takeover = Blocked(b, lambda t: t.update_instance(key, 3.0, new_token=True), then_fail=True)
    thread, result = in_thread(lambda: w(a, lambda t: t.put_step(key, token, step(0))))
    time.sleep(0.3)
    assert isinstance(takeover.finish().error, RuntimeError)
    thread.join(WAIT)
    assert result == [None]
    assert [s.seq for s in b.read(lambda t: t.load_steps(key))] == [0]


def test_a_lost_connection_is_replaced_and_the_work_redone(schema: str) -> None:
    import psycopg

    from runtime._storage_postgres import PostgresStore

    assert URL is not None
    store = PostgresStore(URL, schema=schema)
    try:
        w(store, lambda t: t.insert_instance(T, "i1", "Wf", "v1", None, 1.0))
        assert store.read(lambda t: t.count_by_status(None)) == {"queued": 1}
        old = store_pids(store)
        with psycopg.connect(URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (old,))
        # Both connections died idle: the write (lost before COMMIT) runs again on a new
        # connection and is applied exactly once; the read runs again too.
        key = w(store, lambda t: t.insert_instance(T, "i2", "Wf", "v1", None, 1.0))
        assert store.read(lambda t: t.count_by_status(None)) == {"queued": 2}
        assert w(store, lambda t: t.get_instance_by_key(key)).instance_id == "i2"
        assert set(store_pids(store)).isdisjoint(old)
        assert store.reconnects == 2
    finally:
        store.close()


def test_an_unreachable_server_is_a_storage_error_after_the_timeout(schema: str) -> None:
    from runtime._storage_postgres import PostgresStore

    assert URL is not None
    store = PostgresStore(URL, schema=schema, reconnect_timeout=0.5)
    try:
        store._writer.close()  # as if lost ...
        store.url = "postgresql://postgres@127.0.0.1:1/none"  # ... and nowhere to go
        started = time.monotonic()
        with pytest.raises(StorageError, match="unreachable"):
            store.write([lambda t: t.get_status(1)])
        assert time.monotonic() - started < 5
    finally:
        store.close()


def store_pids(store: Any) -> list[int]:
    return [store._writer.info.backend_pid, store._reader.info.backend_pid]


def test_a_unit_that_swallows_a_database_error_fails_alone(schema: str) -> None:
    from runtime._storage_postgres import PostgresStore

    assert URL is not None
    store = PostgresStore(URL, schema=schema)

    def swallow(t: StoreTxn) -> None:
        t.insert_instance(T, "swallowed", "Wf", "v1", None, 1.0)
        try:
            t.list_instances(T, None, -1, None)  # PostgreSQL: LIMIT must not be negative
        except StorageError:
            pass
        except Exception:
            pass

    try:
        outcomes = store.write(
            [
                lambda t: t.insert_instance(T, "a", "Wf", "v1", None, 1.0),
                swallow,
                lambda t: t.insert_instance(T, "b", "Wf", "v1", None, 1.0),
            ]
        )
        assert outcomes[0].error is None and outcomes[2].error is None
        assert isinstance(outcomes[1].error, StorageError)
        names = store.read(lambda t: [s.instance_id for _, s in t.list_instances(T, None, 9, None)])
        assert sorted(names) == ["a", "b"]
    finally:
        store.close()


def test_the_schema_can_come_from_the_url(schema: str) -> None:
    assert URL is not None
    sep = "&" if "?" in URL else "?"
    url = f"{URL}{sep}options={quote(f'-csearch_path={schema}')}"
    store = open_store(url)
    try:
        w(store, lambda t: t.insert_instance(T, "i1", "Wf", "v1", None, 1.0))
    finally:
        store.close()
    from runtime._storage_postgres import PostgresStore

    again = PostgresStore(URL, schema=schema)
    try:
        assert again.read(lambda t: t.get_instance(T, "i1")) is not None
    finally:
        again.close()


def test_postgres_scheme_alias_and_a_bad_server_are_storage_errors() -> None:
    with pytest.raises(StorageError, match="cannot connect"):
        open_store("postgres://nobody@127.0.0.1:1/none?connect_timeout=2")
