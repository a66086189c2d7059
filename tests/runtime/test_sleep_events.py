"""Durable sleeps and waits for events: timers, buffering, timeouts (SPEC 3 and 4)."""

from __future__ import annotations

import datetime as dt
import itertools
import threading

import trio

from sandbox.sdk import StepError, WorkflowEntrypoint, WorkflowTimeoutError

T = "acme"
FINISHED = ("complete", "errored", "terminated")
DAY = 86400


async def run_to_end(env, workflow, *, params=None, tenant=T):
    env.runner.register(tenant, workflow)
    iid, _ = await env.engine.create(tenant, params=params)
    with trio.fail_after(10):
        await env.engine.wait_for_status(tenant, iid, FINISHED)
    return await env.engine.get(tenant, iid)


async def wait_status(env, iid, *statuses):
    with trio.fail_after(10):
        return await env.engine.wait_for_status(T, iid, statuses)


def stamp(when: dt.datetime) -> dict:
    return {"epoch": when.timestamp(), "utc": when.utcoffset() == dt.timedelta(0)}


def plain_event(event: dict) -> dict:
    """An event as returned by wait_for_event, made msgpack-friendly."""
    return {"type": event["type"], "payload": event["payload"], **stamp(event["timestamp"])}


def by_key(view):
    return {(s.name, s.count): s for s in view.steps}


async def wait_step(env, iid, key, status):
    with trio.fail_after(10):
        while True:
            step = by_key(await env.engine.get(T, iid)).get(key)
            if step is not None and step.status == status:
                return step
            await trio.sleep(0.002)


# ---------------------------------------------------------------------------- sleep


async def test_sleep_lasts_exactly_its_duration_in_every_form(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            times = [step.do("now", env.clock.now)]
            step.sleep("seconds", 90)
            times.append(step.do("now", env.clock.now))
            step.sleep("string", "2 hours")
            times.append(step.do("now", env.clock.now))
            step.sleep("timedelta", dt.timedelta(days=1))
            times.append(step.do("now", env.clock.now))
            step.sleep("float", 0.5)
            times.append(step.do("now", env.clock.now))
            step.sleep("plural", "1 weeks")
            times.append(step.do("now", env.clock.now))
            return times

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    times = view.record.output
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [
        90,
        7200,
        DAY,
        0.5,
        7 * DAY,
    ]
    sleeps = [s for s in view.steps if s.kind == "sleep"]
    assert [s.name for s in sleeps] == ["seconds", "string", "timedelta", "float", "plural"]
    assert all(s.status == "complete" for s in sleeps)


async def test_a_sleeping_instance_is_waiting_until_its_timer(manual_env):
    env = manual_env
    ran = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: 1)
            step.sleep("nap", "1 hour")
            return step.do("after", lambda: ran.append(env.clock.now()) or "woke")

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    view = await env.engine.get(T, iid)
    nap = by_key(view)[("nap", 1)]
    assert (nap.kind, nap.status, nap.wake_at) == ("sleep", "waiting", t0 + 3600)
    assert view.record.wake_at == t0 + 3600

    env.clock.advance(3599)
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "waiting"
    assert ran == []

    env.clock.advance(1)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert ran == [t0 + 3600]
    view = await env.engine.get(T, iid)
    assert view.record.output == "woke"
    assert by_key(view)[("nap", 1)].status == "complete"


async def test_sleep_of_zero_does_not_wait(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            t = step.do("t", env.clock.now)
            step.sleep("none", 0)
            return [t, step.do("t", env.clock.now)]

    view = await run_to_end(env, Wf)
    a, b = view.record.output
    assert a == b


async def test_sleep_until_a_future_time(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            start = step.do("start", env.clock.now)
            target = dt.datetime.fromtimestamp(start + 500, dt.UTC)
            step.sleep_until("until datetime", target)
            mid = step.do("mid", env.clock.now)
            step.sleep_until("until epoch", mid + 250)
            return [start, mid, step.do("end", env.clock.now)]

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    start, mid, end = view.record.output
    assert mid == start + 500
    assert end == mid + 250


async def test_sleep_until_in_the_past_is_an_error(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")
            past = dt.datetime.fromtimestamp(env.clock.now() - 60, dt.UTC)
            step.sleep_until("too late", past)
            return "slept"

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert "past" in view.record.error.message
    steps = by_key(view)
    assert steps[("before", 1)].output == "kept"
    assert steps[("too late", 1)].status == "errored"


async def test_sleep_until_in_the_past_raises_the_same_error_on_replay(env):
    """The error a tenant catches must not change between the first run and a replay."""
    seen = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            past = dt.datetime.fromtimestamp(1_600_000_000, dt.UTC)
            try:
                step.sleep_until("too late", past)
            except Exception as exc:
                seen.append([type(exc).__name__, isinstance(exc, StepError)])
            step.sleep("nap", 10)
            return seen[-1]

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert len(seen) == 2
    assert seen[0] == seen[1], f"first run raised {seen[0]}, the replay raised {seen[1]}"


async def test_sleep_limit_is_365_days(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            start = step.do("start", env.clock.now)
            step.sleep("a year", "365 days")
            end = step.do("end", env.clock.now)
            errors = {}
            for name, duration in {
                "366 days": "366 days",
                "seconds": 365 * DAY + 1,
                "timedelta": dt.timedelta(days=400),
            }.items():
                try:
                    step.sleep(name, duration)
                except Exception as exc:
                    errors[name] = str(exc)
            try:
                step.sleep_until("far", end + 366 * DAY)
            except Exception as exc:
                errors["until"] = str(exc)
            return {"slept": end - start, "errors": errors}

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    out = view.record.output
    assert out["slept"] == 365 * DAY
    assert set(out["errors"]) == {"366 days", "seconds", "timedelta", "until"}
    assert all("365" in message for message in out["errors"].values()), out["errors"]


async def test_uncaught_too_long_sleep_errors_the_instance_and_keeps_earlier_steps(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: 1)
            step.sleep("forever", "2 weeks")
            step.sleep("too long", "53 weeks")

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert "365" in view.record.error.message
    assert [(s.name, s.status) for s in view.steps][:2] == [
        ("first", "complete"),
        ("forever", "complete"),
    ]


# ---------------------------------------------------------------------------- events


async def test_event_delivered_to_a_waiting_step(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            got = step.wait_for_event("approval", type="approval", timeout="1 hour")
            first = plain_event(got)
            step.sleep("after", 10)  # the result below comes from a replay
            return {"first": first, "replayed": plain_event(got)}

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    wait = by_key(await env.engine.get(T, iid))[("approval", 1)]
    assert (wait.kind, wait.status, wait.wake_at) == ("waitForEvent", "waiting", t0 + 3600)

    env.clock.advance(100)
    await env.engine.send_event(T, iid, "approval", {"ok": True, "by": "ops"})
    await wait_status(env, iid, "waiting")
    env.clock.advance(10)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    expected = {
        "type": "approval",
        "payload": {"ok": True, "by": "ops"},
        "epoch": t0 + 100,
        "utc": True,
    }
    assert view.record.output == {"first": expected, "replayed": expected}
    wait = by_key(view)[("approval", 1)]
    assert (wait.kind, wait.status) == ("waitForEvent", "complete")


async def test_events_sent_before_the_wait_are_buffered(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("first", "1 hour")
            got = step.wait_for_event("approval", type="approval", timeout="1 minute")
            return plain_event(got)

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    env.clock.advance(10)
    await env.engine.send_event(T, iid, "approval", [1, 2, 3])
    env.clock.advance(3590)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == {
        "type": "approval",
        "payload": [1, 2, 3],
        "epoch": t0 + 10,
        "utc": True,
    }


async def test_events_sent_while_an_earlier_step_runs_are_buffered(manual_env):
    env = manual_env
    gate = threading.Event()
    started = threading.Event()

    def slow():
        started.set()
        gate.wait(10)
        return "slow"

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("slow", slow)
            return [
                step.wait_for_event("first", type="go", timeout="1 minute")["payload"],
                step.wait_for_event("second", type="go", timeout="1 minute")["payload"],
            ]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        assert await trio.to_thread.run_sync(started.wait, 10)
        assert await env.engine.status(T, iid) == "running"
        await env.engine.send_event(T, iid, "go", 1)
        await env.engine.send_event(T, iid, "go", 2)
    finally:
        gate.set()
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == [1, 2]


async def test_buffered_events_are_fifo_per_type_and_other_types_are_untouched(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("first", "1 hour")
            out = []
            for name, kind in [("a1", "a"), ("a2", "a"), ("b1", "b")]:
                got = step.wait_for_event(name, type=kind, timeout="1 minute")
                out.append([got["type"], got["payload"], got["timestamp"].timestamp()])
            try:
                step.wait_for_event("a3", type="a", timeout="1 minute")
                out.append("a3 got an event")
            except WorkflowTimeoutError:
                out.append("a3 timed out")
            return out

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    env.clock.advance(1)
    await env.engine.send_event(T, iid, "a", "first a")
    env.clock.advance(1)
    await env.engine.send_event(T, iid, "b", {"only": "b"})
    env.clock.advance(1)
    await env.engine.send_event(T, iid, "a", "second a")
    assert await env.engine.status(T, iid) == "waiting"
    env.clock.advance(3597)  # the sleep ends at t0 + 3600
    await wait_step(env, iid, ("a3", 1), "waiting")  # the buffer of 'a' is empty
    await wait_status(env, iid, "waiting")
    env.clock.advance(60)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == [
        ["a", "first a", t0 + 1],
        ["a", "second a", t0 + 3],
        ["b", {"only": "b"}, t0 + 2],
        "a3 timed out",
    ]


async def test_an_event_of_another_type_does_not_wake_the_wait(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.wait_for_event("wait a", type="a", timeout="1 hour")
            b = step.wait_for_event("wait b", type="b", timeout="1 hour")
            return [a["payload"], b["payload"]]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    await env.engine.send_event(T, iid, "b", "for b")
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "waiting"
    assert by_key(await env.engine.get(T, iid))[("wait a", 1)].status == "waiting"
    await env.engine.send_event(T, iid, "a", "for a")
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == ["for a", "for b"]


async def test_two_waits_of_one_type_each_take_one_event(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return [
                step.wait_for_event("tick", type="tick", timeout="1 hour")["payload"]
                for _ in range(3)
            ]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    for n in range(3):
        await wait_status(env, iid, "waiting")
        await env.engine.send_event(T, iid, "tick", n)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == [0, 1, 2]
    assert [(s.name, s.count) for s in view.steps] == [("tick", 1), ("tick", 2), ("tick", 3)]


async def test_wait_timeout_raises_a_catchable_workflow_timeout_error(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            start = step.do("start", env.clock.now)
            try:
                step.wait_for_event("approval", type="approval", timeout="1 hour")
            except WorkflowTimeoutError as exc:
                caught = {
                    "name": exc.name,
                    "is_step_error": isinstance(exc, StepError),
                    "class": type(exc).__name__,
                }
            else:
                caught = None
            return {"caught": caught, "waited": step.do("end", env.clock.now) - start}

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {
        "caught": {
            "name": "WorkflowTimeoutError",
            "is_step_error": True,
            "class": "WorkflowTimeoutError",
        },
        "waited": 3600,
    }
    wait = by_key(view)[("approval", 1)]
    assert (wait.kind, wait.status, wait.error.name) == (
        "waitForEvent",
        "errored",
        "WorkflowTimeoutError",
    )


async def test_default_event_timeout_is_24_hours(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            start = step.do("start", env.clock.now)
            try:
                step.wait_for_event("approval", type="approval")
            except WorkflowTimeoutError:
                pass
            return step.do("end", env.clock.now) - start

    view = await run_to_end(env, Wf)
    assert view.record.output == DAY


async def test_uncaught_wait_timeout_errors_the_instance(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: 1)
            step.wait_for_event("approval", type="approval", timeout="5 minutes")
            return "approved"

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert view.record.error.name == "WorkflowTimeoutError"
    assert view.steps[0].status == "complete"


async def test_wait_timeout_longer_than_365_days_ends_cleanly(env):
    """An over-long event timeout must give a clear outcome, not a crash loop."""

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: 1)
            try:
                step.wait_for_event("approval", type="approval", timeout="400 days")
            except Exception as exc:
                return {"error": type(exc).__name__}
            return "waited"

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    with trio.move_on_after(2):
        await env.engine.wait_for_status(T, iid, FINISHED)
    view = await env.engine.get(T, iid)
    logs = [line.message for line in await env.engine.read_logs(T, iid)]
    assert view.record.status in FINISHED, (view.record.status, len(logs), logs[:2])
    assert view.steps[0].status == "complete"
