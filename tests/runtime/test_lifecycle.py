"""Statuses, pause/resume, terminate, restart, listing (SPEC 4 and 8)."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

import pytest
import trio

from runtime import Engine, InProcessRunner, InstanceStatus, MockClock, open_store
from runtime.errors import CannotTerminate, InstanceNotFound, TenantflowError
from sandbox.sdk import WorkflowEntrypoint

T = "acme"
FINISHED = ("complete", "errored", "terminated")


async def wait_status(env, iid, *statuses, tenant=T):
    with trio.fail_after(10):
        return await env.engine.wait_for_status(tenant, iid, statuses)


async def wait_thread_event(event: threading.Event):
    assert await trio.to_thread.run_sync(event.wait, 60), "the thread never got there"


def by_key(view):
    return {(s.name, s.count): s for s in view.steps}


async def wait_step(env, iid, key, status):
    with trio.fail_after(10):
        while True:
            step = by_key(await env.engine.get(T, iid)).get(key)
            if step is not None and step.status == status:
                return step
            await trio.sleep(0.002)


class Gated:
    """A step callback that blocks until released; counts its calls."""

    def __init__(self, value="done"):
        self.value = value
        self.started = threading.Event()
        self.gate = threading.Event()
        self.finished = threading.Event()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        self.started.set()
        self.gate.wait(10)
        self.finished.set()
        return self.value


# ---------------------------------------------------------------------------- statuses


def test_the_nine_status_strings():
    assert {s.value for s in InstanceStatus} == {
        "queued",
        "running",
        "paused",
        "errored",
        "terminated",
        "complete",
        "waiting",
        "waitingForPause",
        "unknown",
    }
    assert InstanceStatus("waitingForPause") is InstanceStatus.WAITING_FOR_PAUSE
    assert InstanceStatus.WAITING_FOR_PAUSE == "waitingForPause"


async def test_statuses_through_a_run(manual_env):
    env = manual_env
    slow = Gated()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("slow", slow)
            step.sleep("nap", 60)
            return "ok"

    env.runner.register(T, Wf)
    iid, status = await env.engine.create(T)
    assert status == "queued"
    try:
        await wait_thread_event(slow.started)
        assert await env.engine.status(T, iid) == "running"
    finally:
        slow.gate.set()
    assert await wait_status(env, iid, "waiting") == "waiting"
    env.clock.advance(60)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.status == "complete"


async def test_unknown_instance_is_not_found_for_every_operation(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return 1

    env.runner.register(T, Wf)
    env.runner.register("other", Wf)
    iid, _ = await env.engine.create("other")
    for op in (
        env.engine.get,
        env.engine.status,
        env.engine.pause,
        env.engine.resume,
        env.engine.terminate,
        env.engine.restart,
        env.engine.read_logs,
    ):
        for missing in ("nope", iid):  # another tenant's instance looks exactly like none
            with pytest.raises(InstanceNotFound) as info:
                await op(T, missing)
            assert info.value.code == "instance.not_found"
    with pytest.raises(InstanceNotFound):
        await env.engine.send_event(T, iid, "go", None)


# ---------------------------------------------------------------------------- pause / resume


async def test_pause_takes_effect_at_the_next_step_boundary(env):
    first = Gated("first")
    second_calls = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("first", first)
            b = step.do("second", lambda: second_calls.append(1) or "second")
            return [a, b]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await wait_thread_event(first.started)
        assert await env.engine.pause(T, iid) == "waitingForPause"
        assert await env.engine.status(T, iid) == "waitingForPause"
    finally:
        first.gate.set()
    assert await wait_status(env, iid, "paused") == "paused"
    view = await env.engine.get(T, iid)
    assert [(s.name, s.status) for s in view.steps] == [("first", "complete")]
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "paused"
    assert second_calls == []

    assert await env.engine.resume(T, iid) != "paused"
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == ["first", "second"]
    assert first.calls == 1
    assert second_calls == [1]


async def test_resume_while_waiting_for_pause_cancels_the_pause(env):
    first = Gated()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", first)
            return step.do("second", lambda: "second")

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await wait_thread_event(first.started)
        assert await env.engine.pause(T, iid) == "waitingForPause"
        assert await env.engine.resume(T, iid) == "running"
    finally:
        first.gate.set()
    assert await wait_status(env, iid, *FINISHED) == "complete"


async def test_pause_a_sleeping_instance_and_resume_shifts_its_timer(manual_env):
    env = manual_env
    woke = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: 1)
            step.sleep("nap", "1 hour")
            return step.do("after", lambda: woke.append(env.clock.now()) or "woke")

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")

    env.clock.advance(600)
    assert await env.engine.pause(T, iid) == "paused"
    assert await env.engine.status(T, iid) == "paused"
    env.clock.advance(3600)  # the original wake-up time passes while paused
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "paused"
    assert woke == []

    # paused for 3600 s: the timer moves from t0 + 3600 to t0 + 7200
    assert await env.engine.resume(T, iid) == "waiting"
    view = await env.engine.get(T, iid)
    assert by_key(view)[("nap", 1)].wake_at == t0 + 7200
    assert view.record.wake_at == t0 + 7200

    env.clock.advance(2999)  # t0 + 7199: the 3000 s left at the pause are not over yet
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "waiting"
    assert woke == []
    env.clock.advance(1)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert woke == [t0 + 7200]


async def test_pause_and_resume_twice_shift_the_timer_once(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")
            return "woke"

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    assert await env.engine.pause(T, iid) == "paused"
    env.clock.advance(100)
    assert await env.engine.pause(T, iid) == "paused"  # a second pause changes nothing
    env.clock.advance(100)
    assert await env.engine.resume(T, iid) == "waiting"
    env.clock.advance(100)
    assert await env.engine.resume(T, iid) == "waiting"  # not paused: nothing to shift
    view = await env.engine.get(T, iid)
    assert by_key(view)[("nap", 1)].wake_at == t0 + 3600 + 200
    assert view.record.wake_at == t0 + 3600 + 200


async def test_pause_during_a_retry_wait_shifts_the_retry(manual_env):
    env = manual_env
    attempts = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                attempts.append(env.clock.now())
                if ctx.attempt == 1:
                    raise RuntimeError("first fails")
                return "ok"

            return step.do("flaky", flaky, retries={"delay": "60 seconds"})

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    env.clock.advance(10)
    assert await env.engine.pause(T, iid) == "paused"
    env.clock.advance(100)
    assert await env.engine.resume(T, iid) == "waiting"
    assert by_key(await env.engine.get(T, iid))[("flaky", 1)].wake_at == t0 + 160
    env.clock.advance(49)  # t0 + 159
    await trio.sleep(0.05)
    assert len(attempts) == 1
    env.clock.advance(1)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert attempts == [t0, t0 + 160]


async def test_pause_while_waiting_for_an_event_shifts_its_timeout(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            got = step.wait_for_event("approval", type="approval", timeout="1 hour")
            return got["payload"]

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    env.clock.advance(10)
    assert await env.engine.pause(T, iid) == "paused"
    env.clock.advance(7200)  # far past the original timeout, but paused
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "paused"
    assert await env.engine.resume(T, iid) == "waiting"
    assert by_key(await env.engine.get(T, iid))[("approval", 1)].wake_at == t0 + 3600 + 7200
    env.clock.advance(3000)  # before the shifted timeout
    await trio.sleep(0.05)
    await env.engine.send_event(T, iid, "approval", "yes")
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == "yes"


async def test_an_event_sent_while_paused_is_kept_for_after_resume(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return step.wait_for_event("approval", type="approval", timeout="1 hour")["payload"]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    assert await env.engine.pause(T, iid) == "paused"
    await env.engine.send_event(T, iid, "approval", {"ok": 1})
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "paused"
    await env.engine.resume(T, iid)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == {"ok": 1}


# ---------------------------------------------------------------------------- terminate


async def test_terminate_a_running_instance_at_once(env):
    slow = Gated("late result")
    after = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("slow", slow)
            step.do("after", lambda: after.append(1))
            return "finished"

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await wait_thread_event(slow.started)
        assert await env.engine.terminate(T, iid) == "terminated"
        assert await env.engine.status(T, iid) == "terminated"
    finally:
        slow.gate.set()
    await wait_thread_event(slow.finished)
    await trio.sleep(0.05)
    view = await env.engine.get(T, iid)
    assert view.record.status == "terminated"
    assert view.record.output is None
    assert after == []
    assert all(s.status != "complete" for s in view.steps if s.name == "slow")


async def test_terminate_a_sleeping_instance(manual_env):
    env = manual_env
    after = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")
            step.do("after", lambda: after.append(1))

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    assert await env.engine.terminate(T, iid) == "terminated"
    env.clock.advance(7200)
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "terminated"
    assert after == []


async def test_terminate_a_paused_instance(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    await env.engine.pause(T, iid)
    assert await env.engine.terminate(T, iid) == "terminated"
    assert await env.engine.status(T, iid) == "terminated"


async def test_terminate_a_finished_instance_fails(env):
    class Ok(WorkflowEntrypoint):
        def run(self, event, step):
            return 1

    class Bad(WorkflowEntrypoint):
        def run(self, event, step):
            raise RuntimeError("x")

    env.runner.register(T, Ok)
    env.runner.register("bad", Bad)
    done, _ = await env.engine.create(T)
    failed, _ = await env.engine.create("bad")
    await wait_status(env, done, "complete")
    await wait_status(env, failed, "errored", tenant="bad")

    class Sleeper(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 day")

    env.runner.register("sleepy", Sleeper)
    stopped, _ = await env.engine.create("sleepy")
    await env.engine.terminate("sleepy", stopped)

    for tenant, iid, status in [
        (T, done, "complete"),
        ("bad", failed, "errored"),
        ("sleepy", stopped, "terminated"),
    ]:
        with pytest.raises(CannotTerminate) as info:
            await env.engine.terminate(tenant, iid)
        assert info.value.code == "instance.cannot_terminate"
        assert await env.engine.status(tenant, iid) == status


# ---------------------------------------------------------------------------- restart


async def test_restart_discards_the_journal_and_runs_again_with_same_id_and_params(env):
    calls = []

    def count():
        calls.append(1)
        return len(calls)

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            n = step.do("count", count)
            step.sleep("nap", 30)
            return {"params": event.payload, "n": n, "id": event.instance_id}

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T, instance_id="order-1", params={"x": 1})
    assert iid == "order-1"
    assert await wait_status(env, iid, *FINISHED) == "complete"
    first = await env.engine.get(T, iid)
    assert first.record.output == {"params": {"x": 1}, "n": 1, "id": "order-1"}

    assert await env.engine.restart(T, iid) == "queued"
    assert await wait_status(env, iid, *FINISHED) == "complete"
    second = await env.engine.get(T, iid)
    assert second.record.instance_id == "order-1"
    assert second.record.params == {"x": 1}
    assert second.record.output == {"params": {"x": 1}, "n": 2, "id": "order-1"}
    assert len(calls) == 2  # the step ran again: its recorded result was discarded
    assert [(s.name, s.count, s.status) for s in second.steps] == [
        ("count", 1, "complete"),
        ("nap", 1, "complete"),
    ]
    assert second.steps[0].output == 2
    assert second.steps[0].attempts == 1
    summaries, _ = await env.engine.list_instances(T)
    assert [s.instance_id for s in summaries] == ["order-1"]


async def test_restart_runs_the_current_code(env):
    class Broken(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("a", lambda: 1)
            raise RuntimeError("bug in v1")

    class Fixed(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("different step", lambda: "v2")

    env.runner.register(T, Broken)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env, iid, *FINISHED) == "errored"
    env.runner.register(T, Fixed)
    await env.engine.restart(T, iid)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == "v2"
    assert view.record.error is None
    assert [s.name for s in view.steps] == ["different step"]


async def test_restart_a_sleeping_instance_starts_over(manual_env):
    env = manual_env
    starts = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("start", lambda: starts.append(env.clock.now()) or 1)
            step.sleep("nap", "1 hour")
            return len(starts)

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    env.clock.advance(1800)
    await env.engine.restart(T, iid)
    await wait_step(env, iid, ("nap", 1), "waiting")
    await wait_status(env, iid, "waiting")
    assert starts == [t0, t0 + 1800]
    view = await env.engine.get(T, iid)
    assert by_key(view)[("nap", 1)].wake_at == t0 + 1800 + 3600
    env.clock.advance(3600)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == 2


async def test_restart_a_running_instance(env):
    slow = Gated("slow")

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("slow", slow)

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_thread_event(slow.started)
    slow.started.clear()
    assert await env.engine.restart(T, iid) in ("queued", "running")
    await wait_thread_event(slow.started)  # the second run reached the step
    slow.gate.set()
    assert await wait_status(env, iid, *FINISHED) == "complete"
    await wait_thread_event(slow.finished)
    await trio.sleep(0.05)
    view = await env.engine.get(T, iid)
    assert view.record.status == "complete"
    assert view.record.output == "slow"
    assert [(s.name, s.status, s.attempts) for s in view.steps] == [("slow", "complete", 1)]


async def test_restart_a_terminated_instance(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return event.payload

    env.runner.register(T, Wf)
    slow = Gated()

    class Blocked(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("slow", slow)

    env.runner.register(T, Blocked)
    iid, _ = await env.engine.create(T, params=["p"])
    try:
        await wait_thread_event(slow.started)
        await env.engine.terminate(T, iid)
    finally:
        slow.gate.set()
    env.runner.register(T, Wf)
    await env.engine.restart(T, iid)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == ["p"]


# ---------------------------------------------------------------------------- listing


async def test_list_instances_pages_with_a_cursor(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return event.payload

    env.runner.register(T, Wf)
    env.runner.register("other", Wf)
    ids = []
    for n in range(5):
        iid, _ = await env.engine.create(T, instance_id=f"i{n}", params=n)
        ids.append(iid)
    await env.engine.create("other", instance_id="elsewhere")
    for iid in ids:
        await wait_status(env, iid, "complete")

    seen = []
    pages = []
    cursor = None
    while True:
        page, cursor = await env.engine.list_instances(T, limit=2, cursor=cursor)
        pages.append(len(page))
        seen += [s.instance_id for s in page]
        if cursor is None:
            break
    assert pages == [2, 2, 1]
    assert sorted(seen) == sorted(ids)
    assert len(set(seen)) == 5
    assert "elsewhere" not in seen

    everything, cursor = await env.engine.list_instances(T)
    assert cursor is None
    assert sorted(s.instance_id for s in everything) == sorted(ids)
    for summary in everything:
        assert summary.status == "complete"
        assert summary.created_at <= summary.updated_at

    exact, cursor = await env.engine.list_instances(T, limit=5)
    assert len(exact) == 5
    assert cursor is None

    for bad in [{"limit": 0}, {"status": "sleeping"}, {"cursor": "not-a-cursor"}]:
        with pytest.raises(TenantflowError) as info:
            await env.engine.list_instances(T, **bad)
        assert info.value.code == "bad_request"


async def test_list_instances_filters_by_status(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            if event.payload == "sleep":
                step.sleep("nap", "1 hour")
            return 1

    env.runner.register(T, Wf)
    done, _ = await env.engine.create(T, instance_id="done", params="now")
    sleeping, _ = await env.engine.create(T, instance_id="sleeping", params="sleep")
    await wait_status(env, done, "complete")
    await wait_status(env, sleeping, "waiting")
    waiting, _ = await env.engine.list_instances(T, status="waiting")
    assert [s.instance_id for s in waiting] == ["sleeping"]
    complete, _ = await env.engine.list_instances(T, status="complete")
    assert [s.instance_id for s in complete] == ["done"]
    none, cursor = await env.engine.list_instances(T, status="errored")
    assert (none, cursor) == ([], None)


# ---------------------------------------------------------------------------- concurrency slots


@asynccontextmanager
async def engine_on(db_path, runner, clock, **options):
    store = open_store(str(db_path))
    engine = Engine(store, runner, clock=clock, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_only_running_instances_hold_a_slot_and_a_queued_one_can_be_paused(tmp_path):
    blocker = Gated("blocked")

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            if event.payload == "sleep":
                step.sleep("nap", "1 hour")
            elif event.payload == "block":
                step.do("block", blocker)
            return event.payload

    clock = MockClock()
    async with engine_on(
        tmp_path / "db", InProcessRunner({T: Wf}), clock, max_concurrency=1
    ) as engine:

        async def status_of(iid, *statuses):
            with trio.fail_after(10):
                return await engine.wait_for_status(T, iid, statuses)

        sleeping, _ = await engine.create(T, instance_id="sleeping", params="sleep")
        await status_of(sleeping, "waiting")
        # a waiting instance holds no slot: another one runs to the end meanwhile
        quick, _ = await engine.create(T, instance_id="quick", params="quick")
        assert await status_of(quick, *FINISHED) == "complete"

        try:
            blocked, _ = await engine.create(T, instance_id="blocked", params="block")
            await wait_thread_event(blocker.started)
            assert engine.running_count == 1
            later, _ = await engine.create(T, instance_id="later", params="later")
            await trio.sleep(0.05)
            assert await engine.status(T, later) == "queued"  # no slot while 'blocked' runs
            assert await engine.pause(T, later) == "paused"
        finally:
            blocker.gate.set()
        assert await status_of(blocked, *FINISHED) == "complete"
        await trio.sleep(0.05)
        assert await engine.status(T, later) == "paused"
        await engine.resume(T, later)
        assert await status_of(later, *FINISHED) == "complete"
        assert (await engine.get(T, later)).record.output == "later"
        assert await engine.status(T, sleeping) == "waiting"
