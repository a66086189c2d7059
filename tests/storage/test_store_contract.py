"""The contract of ``Store`` / ``StoreTxn``, the same for every backend.

Each test runs on SQLite (a file in tmp_path) and on PostgreSQL (a fresh schema, dropped
after; skipped unless TENANTFLOW_TEST_POSTGRES_URL is set) through the ``store_location``
fixture of tests/conftest.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runtime._models import InstanceStatus, StepRecord
from runtime._storage import Outcome, Store, StoreTxn
from runtime.errors import InstanceAlreadyExists, LeaseLost, StorageError
from sandbox.protocol import ErrorInfo, StepKind, StepStatus

T = "acme"
S = InstanceStatus


@pytest.fixture
def store(store_location: Any) -> Iterator[Store]:
    s = store_location.open()
    try:
        yield s
    finally:
        s.close()


def w(store: Store, unit: Callable[[StoreTxn], Any]) -> Any:
    """Run one unit in its own write; return its value or raise its error."""
    [outcome] = store.write([unit])
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def r(store: Store, fn: Callable[[StoreTxn], Any]) -> Any:
    return store.read(fn)


def new(store: Store, iid: str, *, tenant: str = T, now: float = 1.0, params: Any = None) -> int:
    key: int = w(store, lambda t: t.insert_instance(tenant, iid, "Wf", "v1", params, now))
    return key


def set_status(store: Store, key: int, status: InstanceStatus, now: float = 2.0, **kw: Any) -> int:
    token: int = w(store, lambda t: t.update_instance(key, now, status=status, **kw))
    return token


def claim(store: Store, key: int, now: float = 2.0) -> int:
    record = w(store, lambda t: t.claim_queued(key, now))
    assert record is not None
    token: int = record.run_token
    return token


def step(seq: int, status: StepStatus = StepStatus.COMPLETE, **kw: Any) -> StepRecord:
    kw.setdefault("name", f"s{seq}")
    kw.setdefault("kind", StepKind.DO)
    return StepRecord(seq=seq, count=1, status=status, **kw)


# ------------------------------------------------------------------------------ instances


def test_insert_then_get_round_trips_every_field(store: Store) -> None:
    params = {"n": 1, "big": 2**62, "bytes": b"\x00\xff", "nested": [1.5, None, {"k": "ü"}]}
    key = new(store, "i1", now=1700000000.123456, params=params)
    assert isinstance(key, int)
    record = r(store, lambda t: t.get_instance(T, "i1"))
    assert record is not None
    assert record.key == key
    assert (record.tenant_id, record.instance_id, record.workflow_name) == (T, "i1", "Wf")
    assert record.code_version == "v1"
    assert record.status is S.QUEUED
    assert record.params == params
    assert (record.output, record.error, record.wake_at, record.paused_at) == (None,) * 4
    assert record.created_at == record.updated_at == 1700000000.123456
    assert record.run_token == 0
    assert r(store, lambda t: t.get_instance_by_key(key)) == record
    assert r(store, lambda t: t.get_status(key)) is S.QUEUED


def test_missing_instances_are_none(store: Store) -> None:
    key = new(store, "i1")
    assert r(store, lambda t: t.get_instance(T, "nope")) is None
    assert r(store, lambda t: t.get_instance("other", "i1")) is None
    assert r(store, lambda t: t.get_instance_by_key(key + 1000)) is None
    assert r(store, lambda t: t.get_status(key + 1000)) is None


def test_a_duplicate_id_is_refused_but_other_tenants_may_use_it(store: Store) -> None:
    key = new(store, "same")
    with pytest.raises(InstanceAlreadyExists):
        new(store, "same", params="second")
    other = new(store, "same", tenant="beta")
    assert other != key
    assert r(store, lambda t: t.get_instance(T, "same")).params is None
    assert r(store, lambda t: t.count_by_status(None)) == {"queued": 2}


def test_update_instance_changes_only_the_fields_given(store: Store) -> None:
    key = new(store, "i1")
    token = w(store, lambda t: t.update_instance(key, 5.0, status=S.WAITING, wake_at=60.0))
    assert token == 0
    rec = r(store, lambda t: t.get_instance_by_key(key))
    assert (rec.status, rec.wake_at, rec.updated_at, rec.created_at) == (S.WAITING, 60.0, 5.0, 1.0)
    error = ErrorInfo("BoomError", "it broke: ü")
    w(store, lambda t: t.update_instance(key, 6.0, output={"r": [1, 2]}, error=error))
    w(store, lambda t: t.update_instance(key, 7.0, paused_at=6.5, code_version="v2"))
    rec = r(store, lambda t: t.get_instance_by_key(key))
    assert rec.status is S.WAITING and rec.wake_at == 60.0
    assert rec.output == {"r": [1, 2]}
    assert (rec.error.name, rec.error.message) == ("BoomError", "it broke: ü")
    assert (rec.paused_at, rec.code_version, rec.updated_at) == (6.5, "v2", 7.0)
    w(store, lambda t: t.update_instance(key, 8.0, output=None, error=None, wake_at=None))
    rec = r(store, lambda t: t.get_instance_by_key(key))
    assert (rec.output, rec.error, rec.wake_at, rec.paused_at) == (None, None, None, 6.5)


def test_new_token_bumps_the_fencing_token(store: Store) -> None:
    key = new(store, "i1")
    assert w(store, lambda t: t.update_instance(key, 2.0, new_token=True)) == 1
    assert w(store, lambda t: t.update_instance(key, 3.0, new_token=True)) == 2
    assert w(store, lambda t: t.update_instance(key, 4.0)) == 2
    assert r(store, lambda t: t.get_instance_by_key(key)).run_token == 2


def test_update_instance_with_a_stale_token_is_lease_lost_and_changes_nothing(
    store: Store,
) -> None:
    key = new(store, "i1")
    token = claim(store, key)
    assert w(store, lambda t: t.update_instance(key, 3.0, token=token, wake_at=9.0)) == token
    newer = w(store, lambda t: t.update_instance(key, 4.0, new_token=True))
    assert newer == token + 1
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.update_instance(key, 5.0, token=token, status=S.COMPLETE))
    rec = r(store, lambda t: t.get_instance_by_key(key))
    assert (rec.status, rec.updated_at, rec.wake_at) == (S.RUNNING, 4.0, 9.0)
    assert issubclass(LeaseLost, StorageError)


def test_update_of_an_unknown_instance_is_lease_lost(store: Store) -> None:
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.update_instance(12345, 1.0, status=S.QUEUED))


def test_claim_queued_takes_a_queued_instance_once(store: Store) -> None:
    key = new(store, "i1")
    record = w(store, lambda t: t.claim_queued(key, 3.0))
    assert record.status is S.RUNNING and record.run_token == 1 and record.updated_at == 3.0
    assert record.instance_id == "i1" and record.key == key
    assert w(store, lambda t: t.claim_queued(key, 4.0)) is None
    assert w(store, lambda t: t.claim_queued(key + 1000, 4.0)) is None
    paused = new(store, "i2")
    set_status(store, paused, S.PAUSED)
    assert w(store, lambda t: t.claim_queued(paused, 4.0)) is None


def test_insert_claimed_is_a_new_running_instance_under_its_first_lease(
    store: Store, store_location: Any
) -> None:
    record = w(store, lambda t: t.insert_claimed(T, "i1", "Wf", "v1", {"n": 1}, 3.0, "sup-1", 30.0))
    assert record.status is S.RUNNING and record.run_token == 1
    assert (record.instance_id, record.workflow_name, record.code_version) == ("i1", "Wf", "v1")
    assert record.params == {"n": 1} and record.created_at == record.updated_at == 3.0
    assert r(store, lambda t: t.get_instance(T, "i1")) == record
    # the same as a claim: leased to its owner, renewed with the others, never queued
    assert w(store, lambda t: t.renew_leases("sup-1", 60.0)) == [(record.key, 1)]
    assert r(store, lambda t: t.queued_keys(10)) == []
    assert w(store, lambda t: t.claim_queued(record.key, 4.0)) is None
    with pytest.raises(InstanceAlreadyExists):
        w(store, lambda t: t.insert_claimed(T, "i1", "Wf", "v1", None, 4.0, "sup-2", 30.0))
    (owner,) = store_location.sql(f"SELECT owner FROM instances WHERE key = {record.key}")[0]
    assert owner == "sup-1"


# ---------------------------------------------------------------------------- scheduling


def test_queued_keys_woken_first_then_oldest_ready_then_key(store: Store) -> None:
    a = new(store, "a", now=1.0)
    b = new(store, "b", now=2.0)
    c = new(store, "c", now=2.0)
    d = new(store, "d", now=0.5)
    e = new(store, "e", now=3.0)
    # e is woken (priority 0) at 10.0, d at 9.0: both go before every new instance.
    w(store, lambda t: t.update_instance(e, 10.0, status=S.QUEUED, priority=0))
    w(store, lambda t: t.update_instance(d, 9.0, status=S.QUEUED, priority=0))
    running = new(store, "r", now=0.1)
    claim(store, running)
    assert r(store, lambda t: t.queued_keys(100)) == [d, e, a, b, c]
    assert r(store, lambda t: t.queued_keys(2)) == [d, e]
    # A new instance made ready again later moves back in line.
    w(store, lambda t: t.update_instance(a, 20.0, priority=1))
    assert r(store, lambda t: t.queued_keys(100)) == [d, e, b, c, a]


def test_queued_per_tenant_and_queued_tenants(store: Store) -> None:
    a1 = new(store, "a1", now=2.0)
    a2 = new(store, "a2", now=1.0)
    b1 = new(store, "b1", tenant="beta", now=1.0)
    w(store, lambda t: t.update_instance(a1, 3.0, priority=0))
    done = new(store, "gone", tenant="gamma")
    set_status(store, done, S.COMPLETE)
    assert r(store, lambda t: t.queued_for_tenant(T, 10)) == [(a1, 0), (a2, 1)]
    assert r(store, lambda t: t.queued_for_tenant(T, 1)) == [(a1, 0)]
    assert r(store, lambda t: t.queued_for_tenant("beta", 10)) == [(b1, 1)]
    assert r(store, lambda t: t.queued_for_tenant("gamma", 10)) == []
    assert sorted(r(store, lambda t: t.queued_tenants(10))) == [T, "beta"]
    assert len(r(store, lambda t: t.queued_tenants(1))) == 1


def _due_keys(store: Store, now: float, limit: int) -> list[int]:
    rows = w(store, lambda t: t.due_keys(now, limit))  # locks rows on PostgreSQL: a write
    assert all(tenant == T for _, tenant in rows)
    return [key for key, _ in rows]


def test_due_keys_and_next_wake_at(store: Store) -> None:
    assert r(store, lambda t: t.next_wake_at()) is None
    late = new(store, "late")
    soon = new(store, "soon")
    mid = new(store, "mid")
    forever = new(store, "forever")
    paused = new(store, "paused")
    set_status(store, late, S.WAITING, wake_at=300.0)
    set_status(store, soon, S.WAITING, wake_at=100.0)
    set_status(store, mid, S.WAITING, wake_at=200.0)
    set_status(store, forever, S.WAITING, wake_at=None)  # waits for an event, no timeout
    set_status(store, paused, S.PAUSED, wake_at=50.0)  # a paused timer never fires
    assert r(store, lambda t: t.next_wake_at()) == 100.0
    assert _due_keys(store, 99.0, 10) == []
    assert _due_keys(store, 100.0, 10) == [soon]
    assert _due_keys(store, 1000.0, 10) == [soon, mid, late]
    assert _due_keys(store, 1000.0, 2) == [soon, mid]
    other = new(store, "other", tenant="beta")
    set_status(store, other, S.WAITING, wake_at=150.0)
    assert w(store, lambda t: t.due_keys(1000.0, 10)) == [
        (soon, T),
        (other, "beta"),
        (mid, T),
        (late, T),
    ]
    set_status(store, soon, S.QUEUED, wake_at=None)
    assert r(store, lambda t: t.next_wake_at()) == 150.0


def test_recover_running_requeues_and_parks(store: Store) -> None:
    running = new(store, "running")
    pausing = new(store, "pausing")
    waiting = new(store, "waiting")
    queued = new(store, "queued")
    run_token = claim(store, running)
    pause_token = claim(store, pausing)
    set_status(store, pausing, S.WAITING_FOR_PAUSE)
    set_status(store, waiting, S.WAITING, wake_at=70.0)
    assert w(store, lambda t: t.recover_running(50.0)) == 2
    rec = r(store, lambda t: t.get_instance_by_key(running))
    assert (rec.status, rec.run_token, rec.updated_at) == (S.QUEUED, run_token + 1, 50.0)
    rec = r(store, lambda t: t.get_instance_by_key(pausing))
    assert (rec.status, rec.run_token, rec.paused_at) == (S.PAUSED, pause_token + 1, 50.0)
    assert r(store, lambda t: t.get_status(waiting)) is S.WAITING
    # Recovered instances are woken ones: they go first.
    assert r(store, lambda t: t.queued_keys(10)) == [running, queued]
    assert w(store, lambda t: t.recover_running(60.0)) == 0


def test_claim_takes_a_lease_that_renewal_extends(store: Store, store_location: Any) -> None:
    a = new(store, "a")
    b = new(store, "b")
    c = new(store, "c")
    rec = w(store, lambda t: t.claim_queued(a, 2.0, "sup-1", 30.0))
    assert rec is not None and rec.status is S.RUNNING
    w(store, lambda t: t.claim_queued(b, 2.0, "sup-1", 30.0))
    w(store, lambda t: t.claim_queued(c, 2.0, "sup-2", 30.0))
    (before,) = store_location.sql(f"SELECT lease_expires_at FROM instances WHERE key = {a}")[0]
    set_status(store, b, S.WAITING_FOR_PAUSE)
    assert sorted(w(store, lambda t: t.renew_leases("sup-1", 60.0))) == [
        (a, rec.run_token),
        (b, rec.run_token),
    ]
    (after,) = store_location.sql(f"SELECT lease_expires_at FROM instances WHERE key = {a}")[0]
    assert after > before + 20
    set_status(store, a, S.WAITING, wake_at=9.0)  # left running: no longer renewed
    assert w(store, lambda t: t.renew_leases("sup-1", 60.0)) == [(b, rec.run_token)]
    assert w(store, lambda t: t.renew_leases("nobody", 60.0)) == []
    # Nothing expired: recovery takes nothing from live supervisors.
    assert w(store, lambda t: t.recover_expired(3.0)) == []


def test_recover_expired_takes_only_expired_leases(store: Store, store_location: Any) -> None:
    live = new(store, "live")
    dead = new(store, "dead")
    dead_pausing = new(store, "dead-pausing", tenant="beta")
    ownerless = new(store, "ownerless")
    waiting = new(store, "waiting")
    live_token = w(store, lambda t: t.claim_queued(live, 2.0, "alive", 60.0)).run_token
    dead_token = w(store, lambda t: t.claim_queued(dead, 2.0, "dead", 60.0)).run_token
    w(store, lambda t: t.claim_queued(dead_pausing, 2.0, "dead", 60.0))
    set_status(store, dead_pausing, S.WAITING_FOR_PAUSE)
    claim(store, ownerless)  # no owner: nobody renews it
    set_status(store, waiting, S.WAITING, wake_at=70.0)
    store_location.sql("UPDATE instances SET lease_expires_at = 1.0 WHERE owner = 'dead'")
    got = w(store, lambda t: t.recover_expired(50.0))
    assert sorted(got) == sorted([(dead, T), (dead_pausing, "beta"), (ownerless, T)])
    rec = r(store, lambda t: t.get_instance_by_key(dead))
    assert (rec.status, rec.run_token, rec.updated_at) == (S.QUEUED, dead_token + 1, 50.0)
    assert r(store, lambda t: t.get_status(dead_pausing)) is S.PAUSED
    assert r(store, lambda t: t.get_instance_by_key(dead_pausing)).paused_at == 50.0
    rec = r(store, lambda t: t.get_instance_by_key(live))
    assert (rec.status, rec.run_token) == (S.RUNNING, live_token)
    assert r(store, lambda t: t.get_status(waiting)) is S.WAITING
    assert r(store, lambda t: t.queued_keys(10))[0] in (dead, ownerless)  # woken first
    # The dead supervisor's token is stale now: its writes are refused.
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.update_instance(dead, 51.0, token=dead_token, status=S.COMPLETE))
    # And it no longer renews what it lost.
    assert w(store, lambda t: t.renew_leases("dead", 60.0)) == []
    assert w(store, lambda t: t.recover_expired(60.0)) == []


# ------------------------------------------------------------------------------ listing


def test_list_instances_pages_newest_first(store: Store) -> None:
    keys = [new(store, f"i{n}", now=float(n)) for n in range(7)]
    new(store, "elsewhere", tenant="beta")
    set_status(store, keys[2], S.COMPLETE)
    set_status(store, keys[5], S.COMPLETE)
    page = r(store, lambda t: t.list_instances(T, None, 3, None))
    assert [k for k, _ in page] == [keys[6], keys[5], keys[4]]
    assert [s.instance_id for _, s in page] == ["i6", "i5", "i4"]
    summary = page[1][1]
    assert (summary.status, summary.created_at, summary.updated_at) == (S.COMPLETE, 5.0, 2.0)
    after = page[-1][0]
    page = r(store, lambda t: t.list_instances(T, None, 3, after))
    assert [k for k, _ in page] == [keys[3], keys[2], keys[1]]
    page = r(store, lambda t: t.list_instances(T, None, 3, page[-1][0]))
    assert [k for k, _ in page] == [keys[0]]
    done = r(store, lambda t: t.list_instances(T, "complete", 10, None))
    assert [k for k, _ in done] == [keys[5], keys[2]]
    assert r(store, lambda t: t.list_instances(T, "complete", 10, keys[2])) == []
    assert r(store, lambda t: t.list_instances("nobody", None, 10, None)) == []


def test_count_by_status(store: Store) -> None:
    assert r(store, lambda t: t.count_by_status(None)) == {}
    a, b, _ = new(store, "a"), new(store, "b"), new(store, "c")
    x = new(store, "x", tenant="beta")
    set_status(store, a, S.COMPLETE)
    set_status(store, b, S.WAITING)
    set_status(store, x, S.COMPLETE)
    assert r(store, lambda t: t.count_by_status(T)) == {"complete": 1, "waiting": 1, "queued": 1}
    assert r(store, lambda t: t.count_by_status("beta")) == {"complete": 1}
    assert r(store, lambda t: t.count_by_status(None)) == {
        "complete": 2,
        "waiting": 1,
        "queued": 1,
    }


# -------------------------------------------------------------------------------- journal


def test_put_step_round_trips_and_replaces(store: Store) -> None:
    key = new(store, "i1")
    token = claim(store, key)
    first = StepRecord(
        seq=0,
        name="fetch ☕",
        count=2,
        kind=StepKind.DO,
        status=StepStatus.RETRYING,
        attempts=1,
        started_at=10.25,
        ended_at=11.5,
        output=None,
        error=ErrorInfo("TimeoutError", "slow"),
        wake_at=15.0,
    )
    w(store, lambda t: t.put_step(key, token, first))
    got = r(store, lambda t: t.get_step(key, 0))
    assert got == StepRecord(**{**_fields(first), "error": ErrorInfo("TimeoutError", "slow")})
    done = StepRecord(
        seq=0,
        name="fetch ☕",
        count=2,
        kind=StepKind.DO,
        status=StepStatus.COMPLETE,
        attempts=2,
        started_at=15.0,
        ended_at=16.0,
        output={"rows": [1, 2, 3], "raw": b"\x01"},
    )
    w(store, lambda t: t.put_step(key, token, done))
    assert r(store, lambda t: t.get_step(key, 0)) == done
    assert r(store, lambda t: t.load_steps(key)) == [done]
    assert r(store, lambda t: t.get_step(key, 1)) is None


def _fields(record: StepRecord) -> dict[str, Any]:
    return {f: getattr(record, f) for f in StepRecord.__dataclass_fields__}


def test_put_step_with_a_stale_token_is_lease_lost_and_writes_nothing(store: Store) -> None:
    key = new(store, "i1")
    token = claim(store, key)
    w(store, lambda t: t.put_step(key, token, step(0)))
    w(store, lambda t: t.update_instance(key, 3.0, new_token=True))  # terminate/restart
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.put_step(key, token, step(1)))
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.put_step(key, token, step(0, StepStatus.ERRORED)))
    assert r(store, lambda t: t.load_steps(key)) == [step(0)]
    # Without a token (engine-side writes) nothing is fenced.
    w(store, lambda t: t.put_step(key, None, step(1)))
    assert [s.seq for s in r(store, lambda t: t.load_steps(key))] == [0, 1]
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.put_step(key + 1000, 1, step(0)))


def test_record_step_puts_the_step_and_reads_the_status_fenced(store: Store) -> None:
    key = new(store, "i1")
    token = claim(store, key)
    assert w(store, lambda t: t.record_step(key, token, step(0))) is S.RUNNING
    set_status(store, key, S.WAITING_FOR_PAUSE)  # a pause asked meanwhile: seen at once
    assert w(store, lambda t: t.record_step(key, token, step(1))) is S.WAITING_FOR_PAUSE
    assert [s.seq for s in r(store, lambda t: t.load_steps(key))] == [0, 1]
    w(store, lambda t: t.update_instance(key, 3.0, new_token=True))  # terminate/restart
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.record_step(key, token, step(2)))
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.record_step(key, token, step(0, StepStatus.ERRORED)))
    assert r(store, lambda t: t.load_steps(key)) == [step(0), step(1)]
    assert w(store, lambda t: t.record_step(key, None, step(2))) is S.WAITING_FOR_PAUSE
    with pytest.raises(LeaseLost):
        w(store, lambda t: t.record_step(key + 1000, 1, step(0)))


def test_load_steps_in_call_order_and_delete_steps(store: Store) -> None:
    key = new(store, "i1")
    other = new(store, "i2")
    for seq in (2, 0, 1):
        w(store, lambda t, seq=seq: t.put_step(key, None, step(seq)))
    w(store, lambda t: t.put_step(other, None, step(0)))
    w(store, lambda t: t.append_logs(key, [(1.0, "info", "mine")]))
    w(store, lambda t: t.append_logs(other, [(1.0, "info", "theirs")]))
    assert [s.seq for s in r(store, lambda t: t.load_steps(key))] == [0, 1, 2]
    w(store, lambda t: t.delete_steps(key))
    assert r(store, lambda t: t.load_steps(key)) == []
    assert r(store, lambda t: t.read_logs(key, 0, 10)) == []
    assert len(r(store, lambda t: t.load_steps(other))) == 1
    assert [x.message for x in r(store, lambda t: t.read_logs(other, 0, 10))] == ["theirs"]


def test_pending_wake_due_steps_and_shift(store: Store) -> None:
    key = new(store, "i1")
    assert r(store, lambda t: t.pending_wake(key)) == (0, None)
    sleep = step(0, StepStatus.WAITING, kind=StepKind.SLEEP, wake_at=100.0)
    retry = step(1, StepStatus.RETRYING, wake_at=50.0, attempts=1)
    event = step(2, StepStatus.WAITING, kind=StepKind.WAIT_FOR_EVENT, wake_at=None, event_type="go")
    done = step(3, StepStatus.COMPLETE, wake_at=10.0)
    for s in (sleep, retry, event, done):
        w(store, lambda t, s=s: t.put_step(key, None, s))
    assert r(store, lambda t: t.pending_wake(key)) == (3, 50.0)
    assert r(store, lambda t: t.due_steps(key, 49.0)) == []
    assert r(store, lambda t: t.due_steps(key, 50.0)) == [retry]
    assert r(store, lambda t: t.due_steps(key, 100.0)) == [sleep, retry]
    w(store, lambda t: t.shift_step_wakes(key, 25.5))
    steps = {s.seq: s for s in r(store, lambda t: t.load_steps(key))}
    assert (steps[0].wake_at, steps[1].wake_at) == (125.5, 75.5)
    assert steps[2].wake_at is None  # no timeout: nothing to shift
    assert steps[3].wake_at == 10.0  # finished steps keep theirs
    assert r(store, lambda t: t.pending_wake(key)) == (3, 75.5)
    w(store, lambda t: t.shift_step_wakes(key, 5))  # an int delta works too
    assert r(store, lambda t: t.pending_wake(key)) == (3, 80.5)


def test_find_waiting_event_step(store: Store) -> None:
    key = new(store, "i1")
    other = new(store, "i2")

    def wait(seq: int, event_type: str, status: StepStatus = StepStatus.WAITING) -> StepRecord:
        return step(seq, status, kind=StepKind.WAIT_FOR_EVENT, event_type=event_type)

    rows = [
        wait(0, "go", StepStatus.COMPLETE),
        wait(1, "stop"),
        wait(2, "go"),
        wait(3, "go"),
        step(4, StepStatus.WAITING, kind=StepKind.SLEEP, wake_at=5.0),
    ]
    for s in rows:
        w(store, lambda t, s=s: t.put_step(key, None, s))
    w(store, lambda t: t.put_step(other, None, wait(0, "only-there")))
    assert r(store, lambda t: t.find_waiting_event_step(key, "go")) == rows[2]
    assert r(store, lambda t: t.find_waiting_event_step(key, "stop")) == rows[1]
    assert r(store, lambda t: t.find_waiting_event_step(key, "only-there")) is None
    assert r(store, lambda t: t.find_waiting_event_step(key, "none")) is None


# --------------------------------------------------------------------------- events, logs


def test_events_are_first_in_first_out_per_type_and_instance(store: Store) -> None:
    key = new(store, "i1")
    other = new(store, "i2")
    assert w(store, lambda t: t.pop_event(key, "go")) is None
    w(store, lambda t: t.push_event(key, "go", {"n": 1}, 10.0))
    w(store, lambda t: t.push_event(key, "stop", "halt", 11.0))
    w(store, lambda t: t.push_event(other, "go", "not yours", 11.5))
    w(
        store,
        lambda t: [t.push_event(key, "go", n, 12.0 + n) for n in (2, 3)],
    )
    assert w(store, lambda t: t.pop_event(key, "go")) == ({"n": 1}, 10.0)
    assert w(store, lambda t: t.pop_event(key, "go")) == (2, 14.0)
    assert w(store, lambda t: t.pop_event(key, "stop")) == ("halt", 11.0)
    assert w(store, lambda t: t.pop_event(key, "go")) == (3, 15.0)
    assert w(store, lambda t: t.pop_event(key, "go")) is None
    assert w(store, lambda t: t.pop_event(other, "go")) == ("not yours", 11.5)
    w(store, lambda t: t.push_event(key, "go", None, 20.0))
    assert w(store, lambda t: t.pop_event(key, "go")) == (None, 20.0)


def test_logs_append_and_read_after_a_cursor(store: Store) -> None:
    key = new(store, "i1")
    other = new(store, "i2")
    w(store, lambda t: t.append_logs(key, [(1.0, "info", "one"), (2.0, "warning", "two")]))
    w(store, lambda t: t.append_logs(other, [(1.5, "info", "elsewhere")]))
    w(store, lambda t: t.append_logs(key, [(3.0, "error", "three ☕")]))
    w(store, lambda t: t.append_logs(key, []))
    lines = r(store, lambda t: t.read_logs(key, 0, 100))
    assert [(x.ts, x.level, x.message) for x in lines] == [
        (1.0, "info", "one"),
        (2.0, "warning", "two"),
        (3.0, "error", "three ☕"),
    ]
    ids = [x.id for x in lines]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert r(store, lambda t: t.read_logs(key, ids[0], 1)) == [lines[1]]
    assert r(store, lambda t: t.read_logs(key, ids[2], 10)) == []


def test_free_text_with_a_nul_character_is_stored(store: Store, store_location: Any) -> None:
    """Tenant text (log lines, error messages) may hold NUL; PostgreSQL TEXT cannot, so that
    backend stores U+FFFD instead. Either way the write succeeds."""
    key = new(store, "i1")
    nul = "\ufffd" if store_location.backend == "postgres" else "\x00"
    w(store, lambda t: t.append_logs(key, [(1.0, "info", "a\x00b")]))
    error = ErrorInfo("Bad\x00Error", "x\x00y")
    w(store, lambda t: t.put_step(key, None, step(0, StepStatus.ERRORED, error=error)))
    w(store, lambda t: t.update_instance(key, 2.0, status=S.ERRORED, error=error))
    assert r(store, lambda t: t.read_logs(key, 0, 10))[0].message == f"a{nul}b"
    stored = r(store, lambda t: t.get_step(key, 0)).error
    assert (stored.name, stored.message) == (f"Bad{nul}Error", f"x{nul}y")
    stored = r(store, lambda t: t.get_instance_by_key(key)).error
    assert (stored.name, stored.message) == (f"Bad{nul}Error", f"x{nul}y")


def test_code_versions_are_idempotent(store: Store) -> None:
    files = b"\x00\x01binary\xff" * 100
    assert r(store, lambda t: t.get_code_version(T, "abc")) is None
    w(store, lambda t: t.put_code_version(T, "abc", files, 1.0))
    w(store, lambda t: t.put_code_version(T, "abc", b"ignored: same content address", 2.0))
    got = r(store, lambda t: t.get_code_version(T, "abc"))
    assert got == files and isinstance(got, bytes)
    assert r(store, lambda t: t.get_code_version("beta", "abc")) is None


# ------------------------------------------------------------------------- transactions


def test_a_failing_unit_never_undoes_the_others(store: Store) -> None:
    existing = new(store, "existing")
    token = claim(store, existing)
    w(store, lambda t: t.update_instance(existing, 3.0, new_token=True))

    def half_then_fail(t: StoreTxn) -> None:
        t.insert_instance(T, "half", "Wf", "v1", None, 1.0)
        raise RuntimeError("unit failed after writing")

    units: list[Callable[[StoreTxn], Any]] = [
        lambda t: t.insert_instance(T, "a", "Wf", "v1", None, 1.0),
        half_then_fail,
        lambda t: t.insert_instance(T, "b", "Wf", "v1", None, 1.0),
        lambda t: t.insert_instance(T, "existing", "Wf", "v1", None, 1.0),  # duplicate
        lambda t: t.push_event(existing, "go", 1, 1.0),
        lambda t: t.put_step(existing, token, step(0)),  # stale token
        lambda t: t.append_logs(existing, [(1.0, "info", "kept")]),
    ]
    outcomes = store.write(units)
    assert len(outcomes) == len(units)
    assert all(isinstance(o, Outcome) for o in outcomes)
    assert isinstance(outcomes[0].value, int) and outcomes[0].error is None
    assert isinstance(outcomes[1].error, RuntimeError)
    assert isinstance(outcomes[2].value, int) and outcomes[2].error is None
    assert isinstance(outcomes[3].error, InstanceAlreadyExists)
    assert outcomes[4].error is None
    assert isinstance(outcomes[5].error, LeaseLost)
    assert outcomes[6].error is None

    def ids(t: StoreTxn) -> list[str]:
        return [s.instance_id for _, s in t.list_instances(T, None, 100, None)]

    assert sorted(r(store, ids)) == ["a", "b", "existing"]
    assert r(store, lambda t: t.load_steps(existing)) == []
    assert [x.message for x in r(store, lambda t: t.read_logs(existing, 0, 10))] == ["kept"]
    assert w(store, lambda t: t.pop_event(existing, "go")) == (1, 1.0)


def test_a_batch_without_failures_returns_every_value_in_order(store: Store) -> None:
    assert store.write([]) == []
    outcomes = store.write(
        [lambda t, n=n: t.insert_instance(T, f"i{n}", "Wf", "v1", n, 1.0) for n in range(50)]
    )
    keys = [o.value for o in outcomes]
    assert all(o.error is None for o in outcomes)
    assert len(set(keys)) == 50
    assert [r(store, lambda t, k=k: t.get_instance_by_key(k)).params for k in keys] == list(
        range(50)
    )


def test_every_unit_failing_commits_nothing_and_the_store_goes_on(store: Store) -> None:
    def fail(t: StoreTxn) -> None:
        t.insert_instance(T, "x", "Wf", "v1", None, 1.0)
        raise ValueError("no")

    outcomes = store.write([fail, fail])
    assert [type(o.error) for o in outcomes] == [ValueError, ValueError]
    assert r(store, lambda t: t.count_by_status(None)) == {}
    new(store, "after")
    assert r(store, lambda t: t.count_by_status(None)) == {"queued": 1}


def test_a_read_is_one_consistent_snapshot(store: Store) -> None:
    key = new(store, "first")

    def write_meanwhile() -> None:
        new(store, "second")
        w(store, lambda t: t.update_instance(key, 9.0, status=S.COMPLETE))

    def fn(t: StoreTxn) -> tuple[Any, ...]:
        before = (t.count_by_status(None), t.get_status(key))
        thread = threading.Thread(target=write_meanwhile)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        after = (t.count_by_status(None), t.get_status(key))
        return before, after

    before, after = r(store, fn)
    assert before == after == ({"queued": 1}, S.QUEUED)
    assert r(store, lambda t: (t.count_by_status(None), t.get_status(key))) == (
        {"queued": 1, "complete": 1},
        S.COMPLETE,
    )


def test_a_read_sees_only_committed_work(store: Store) -> None:
    def fail(t: StoreTxn) -> None:
        t.insert_instance(T, "ghost", "Wf", "v1", None, 1.0)
        raise RuntimeError

    store.write([fail])
    assert r(store, lambda t: t.get_instance(T, "ghost")) is None


def test_a_read_cannot_write(store: Store) -> None:
    with pytest.raises(Exception):  # noqa: B017 - each backend has its own error here
        r(store, lambda t: t.insert_instance(T, "nope", "Wf", "v1", None, 1.0))
    assert r(store, lambda t: t.count_by_status(None)) == {}
    new(store, "fine")  # and neither connection is left in a broken state
    assert r(store, lambda t: t.count_by_status(None)) == {"queued": 1}


def test_errors_raised_by_a_read_propagate_and_the_reader_goes_on(store: Store) -> None:
    def boom(t: StoreTxn) -> None:
        t.count_by_status(None)
        raise KeyError("mine")

    with pytest.raises(KeyError):
        r(store, boom)
    assert r(store, lambda t: t.count_by_status(None)) == {}


def test_close_is_idempotent(store_location: Any) -> None:
    s = store_location.open()
    s.close()
    s.close()


# ---------------------------------------------------------------------------- migrations


def _schema_version(store_location: Any) -> int:
    [(value,)] = store_location.sql("SELECT value FROM tenantflow_meta WHERE key = 'schema'")
    return int(value)


def test_opening_again_keeps_the_schema_and_the_data(store_location: Any) -> None:
    first = store_location.open()
    key = new(first, "kept", params={"x": 1})
    first.close()
    version = _schema_version(store_location)
    assert version >= 1
    second = store_location.open()
    try:
        assert r(second, lambda t: t.get_instance_by_key(key)).params == {"x": 1}
        assert new(second, "more") != key
    finally:
        second.close()
    assert _schema_version(store_location) == version
    rows = store_location.sql("SELECT count(*) FROM tenantflow_meta")
    assert rows == [(1,)]


def test_a_newer_schema_is_refused(store_location: Any) -> None:
    store_location.open().close()
    store_location.sql("UPDATE tenantflow_meta SET value = '999' WHERE key = 'schema'")
    with pytest.raises(StorageError, match="999"):
        store_location.open()


def test_several_stores_opening_one_fresh_database_at_once(store_location: Any) -> None:
    """PostgreSQL: every supervisor starts; the migration runs once. SQLite serves one
    supervisor per file: the others are refused with a clear StorageError."""
    n = 4
    barrier = threading.Barrier(n)
    opened: list[Store] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def open_one() -> None:
        barrier.wait()
        try:
            s = store_location.open()
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                opened.append(s)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not any(thread.is_alive() for thread in threads)
        if store_location.backend == "sqlite":
            assert len(opened) == 1, errors
            assert len(errors) == n - 1
            assert all(isinstance(e, StorageError) and "in use" in str(e) for e in errors)
        else:
            assert errors == [] and len(opened) == n
        keys = [new(s, f"from-{i}") for i, s in enumerate(opened)]
        for s in opened:
            assert r(s, lambda t: t.count_by_status(None)) == {"queued": len(keys)}
        assert _schema_version(store_location) >= 1
    finally:
        for s in opened:
            s.close()
