"""step.do, step.parallel, ctx, step identity, errors reaching run(), logs (SPEC 3 and 4)."""

from __future__ import annotations

import datetime as dt
import threading

import trio
import trio.testing

from runtime import InstanceStatus
from sandbox.sdk import NonRetryableError, StepError, WorkflowEntrypoint, log

T = "acme"
FINISHED = ("complete", "errored", "terminated")


async def run_to_end(env, workflow, *, params=None, tenant=T):
    env.runner.register(tenant, workflow)
    iid, status = await env.engine.create(tenant, params=params)
    assert status == "queued"
    with trio.fail_after(10):
        await env.engine.wait_for_status(tenant, iid, FINISHED)
    return await env.engine.get(tenant, iid)


async def wait_until(predicate):
    with trio.fail_after(10):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.002)


async def wait_thread_event(event: threading.Event):
    assert await trio.to_thread.run_sync(event.wait, 60), "the thread never got there"


def by_key(view):
    return {(s.name, s.count): s for s in view.steps}


# ---------------------------------------------------------------------------- event


async def test_event_carries_payload_id_timestamp_and_workflow_name(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return {
                "payload": event.payload,
                "instance_id": event.instance_id,
                "workflow_name": event.workflow_name,
                "ts": event.timestamp.timestamp(),
                "aware_utc": event.timestamp.utcoffset() == dt.timedelta(0),
            }

    created_at = env.clock.now()
    view = await run_to_end(env, Wf, params={"name": "Ada", "n": [1, 2]})
    assert view.record.status == "complete", view.record.error
    out = view.record.output
    assert out["payload"] == {"name": "Ada", "n": [1, 2]}
    assert out["instance_id"] == view.record.instance_id
    assert out["workflow_name"] == "TenantWorkflow"
    assert out["ts"] == created_at
    assert out["aware_utc"] is True
    assert view.record.params == {"name": "Ada", "n": [1, 2]}


async def test_params_default_to_none(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return {"payload": event.payload}

    view = await run_to_end(env, Wf)
    assert view.record.output == {"payload": None}


# ---------------------------------------------------------------------------- step.do


async def test_step_results_are_returned_and_journaled(env):
    values = {
        "none": None,
        "bool": True,
        "int": -42,
        "big": 2**62,
        "float": 1.25,
        "str": "héllo",
        "bytes": b"\x00\xff",
        "list": [1, "two", [3]],
        "dict": {"a": {"b": [1, None]}},
    }

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            got = {}
            for name, value in values.items():
                got[name] = step.do(name, lambda v=value: v)
            return got

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == values
    assert [s.name for s in view.steps] == list(values)
    for seq, s in enumerate(view.steps, start=1):
        assert s.seq == seq
        assert s.count == 1
        assert s.kind == "do"
        assert s.status == "complete"
        assert s.attempts == 1
        assert s.output == values[s.name]
        assert s.error is None


async def test_tuple_result_comes_back_as_list_like_on_replay(env):
    seen = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            value = step.do("pair", lambda: (1, 2))
            seen.append(value)
            step.sleep("nap", 5)
            return value

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    # first run and replay return the same (msgpack round-tripped) value
    assert seen == [[1, 2], [1, 2]]
    assert view.record.output == [1, 2]


async def test_callback_may_take_no_argument_or_ctx(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("no-arg", lambda: "plain")
            b = step.do("ctx", lambda ctx: ctx.attempt)

            def with_default(x="default"):
                return x

            c = step.do("default-arg", with_default)
            return [a, b, c]

    view = await run_to_end(env, Wf)
    assert view.record.output == ["plain", 1, "default"]


async def test_ctx_attempt_step_and_config(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def describe(ctx):
                return {
                    "attempt": ctx.attempt,
                    "name": ctx.step.name,
                    "count": ctx.step.count,
                    "config": {
                        "retries": dict(ctx.config["retries"]),
                        "timeout": ctx.config["timeout"],
                    },
                }

            default = step.do("describe", describe)
            custom = step.do(
                "describe",
                describe,
                retries={"limit": 2, "backoff": "linear"},
                timeout="30 seconds",
            )
            return [default, custom]

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    default, custom = view.record.output
    assert default["attempt"] == 1
    assert (default["name"], default["count"]) == ("describe", 1)
    assert default["config"]["retries"] == {"limit": 5, "delay": 10.0, "backoff": "exponential"}
    assert default["config"]["timeout"] == 600.0
    assert (custom["name"], custom["count"]) == ("describe", 2)
    # the partial dict is merged over the defaults
    assert custom["config"]["retries"] == {"limit": 2, "delay": 10.0, "backoff": "linear"}
    assert custom["config"]["timeout"] == 30.0


async def test_ctx_attempt_is_one_based_and_grows(env):
    attempts = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                attempts.append(ctx.attempt)
                if ctx.attempt < 3:
                    raise RuntimeError(f"fail {ctx.attempt}")
                return ctx.attempt

            return step.do("flaky", flaky, retries={"delay": 1, "backoff": "constant"})

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert attempts == [1, 2, 3]
    assert view.record.output == 3
    assert view.steps[0].attempts == 3


async def test_repeated_step_name_gets_counts_1_to_n(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            out = []
            for i in range(4):
                out.append(step.do("item", lambda ctx, i=i: [i, ctx.step.name, ctx.step.count]))
            out.append(step.do("other", lambda ctx: ctx.step.count))
            out.append(step.do("item", lambda ctx: ctx.step.count))
            return out

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == [
        [0, "item", 1],
        [1, "item", 2],
        [2, "item", 3],
        [3, "item", 4],
        1,
        5,
    ]
    assert [(s.seq, s.name, s.count) for s in view.steps] == [
        (1, "item", 1),
        (2, "item", 2),
        (3, "item", 3),
        (4, "item", 4),
        (5, "other", 1),
        (6, "item", 5),
    ]


async def test_calling_a_step_inside_a_step_is_refused(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("outer", lambda: step.do("inner", lambda: 1), retries={"limit": 0})

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert [s.name for s in view.steps] == ["outer"]
    assert view.steps[0].status == "errored"


# ---------------------------------------------------------------------------- errors


class PaymentDeclined(Exception):
    pass


async def test_step_error_reaches_run_as_step_error_with_original_name_and_message(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def fail():
                raise PaymentDeclined("card 4242 declined")

            try:
                step.do("charge", fail, retries={"limit": 1, "delay": 1})
            except StepError as exc:
                after = step.do("after", lambda: "continued")
                return {
                    "name": exc.name,
                    "message": exc.message,
                    "is_step_error": isinstance(exc, StepError),
                    "after": after,
                }
            return "not raised"

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {
        "name": "PaymentDeclined",
        "message": "card 4242 declined",
        "is_step_error": True,
        "after": "continued",
    }
    steps = by_key(view)
    charge = steps[("charge", 1)]
    assert charge.status == "errored"
    assert charge.attempts == 2
    assert (charge.error.name, charge.error.message) == ("PaymentDeclined", "card 4242 declined")
    assert steps[("after", 1)].output == "continued"


async def test_uncaught_step_error_errors_the_instance_with_its_name_and_message(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("ok", lambda: 1)

            def fail():
                raise KeyError("missing")

            step.do("boom", fail, retries={"limit": 0})
            step.do("never", lambda: 2)

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert view.record.output is None
    assert view.record.error.name == "KeyError"
    assert "missing" in view.record.error.message
    assert [(s.name, s.status) for s in view.steps] == [("ok", "complete"), ("boom", "errored")]


async def test_non_retryable_error_uncaught_errors_the_instance(env):
    calls = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def charge():
                calls.append(1)
                raise NonRetryableError("not approved")

            return step.do("charge", charge)

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert (view.record.error.name, view.record.error.message) == (
        "NonRetryableError",
        "not approved",
    )
    assert len(calls) == 1
    assert view.steps[0].attempts == 1
    assert view.steps[0].status == "errored"


async def test_error_raised_outside_steps_errors_the_instance(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("a", lambda: 1)
            raise ValueError("bad state")

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert (view.record.error.name, view.record.error.message) == ("ValueError", "bad state")
    assert view.steps[0].status == "complete"


async def test_workflow_return_value_is_the_output(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            user = step.do("load user", lambda: {"name": event.payload["name"]})
            return {"greeting": f"Hello, {user['name']}!"}

    view = await run_to_end(env, Wf, params={"name": "Ada"})
    assert view.record.status == "complete"
    assert view.record.output == {"greeting": "Hello, Ada!"}
    assert view.record.error is None


# ---------------------------------------------------------------------------- parallel


async def test_parallel_returns_a_dict_of_results(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            before = step.do("before", lambda: 0)
            results = step.parallel(
                {
                    "a": lambda: "A",
                    "b": lambda ctx: [ctx.step.name, ctx.attempt],
                    "c": lambda: {"n": 3},
                }
            )
            return {"before": before, "results": results, "order": list(results)}

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output["results"] == {"a": "A", "b": ["b", 1], "c": {"n": 3}}
    assert view.record.output["order"] == ["a", "b", "c"]
    assert [(s.name, s.kind, s.status) for s in view.steps] == [
        ("before", "do", "complete"),
        ("a", "do", "complete"),
        ("b", "do", "complete"),
        ("c", "do", "complete"),
    ]


async def test_parallel_callbacks_run_concurrently(env):
    barrier = threading.Barrier(2, timeout=5)

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            # each branch waits for the other: only concurrent branches both get through
            return step.parallel(
                {"left": lambda: barrier.wait() >= 0, "right": lambda: barrier.wait() >= 0},
                retries={"limit": 0},
            )

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {"left": True, "right": True}


async def test_parallel_branches_retry_independently(env):
    calls = {"steady": 0, "flaky": 0}

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def steady():
                calls["steady"] += 1
                return "steady"

            def flaky(ctx):
                calls["flaky"] += 1
                if ctx.attempt < 3:
                    raise RuntimeError("try again")
                return f"flaky@{ctx.attempt}"

            return step.parallel(
                {"steady": steady, "flaky": flaky},
                retries={"limit": 5, "delay": "1 second", "backoff": "constant"},
            )

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {"steady": "steady", "flaky": "flaky@3"}
    assert calls == {"steady": 1, "flaky": 3}
    steps = by_key(view)
    assert steps[("steady", 1)].attempts == 1
    assert steps[("flaky", 1)].attempts == 3


async def test_parallel_failure_reaches_run_and_keeps_the_other_results(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def bad():
                raise NonRetryableError("no way")

            try:
                step.parallel({"good": lambda: "fine", "bad": bad})
            except StepError as exc:
                return {"name": exc.name, "message": exc.message}
            return "not raised"

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {"name": "NonRetryableError", "message": "no way"}
    steps = by_key(view)
    assert steps[("good", 1)].status == "complete"
    assert steps[("good", 1)].output == "fine"
    assert steps[("bad", 1)].status == "errored"
    assert steps[("bad", 1)].attempts == 1


# ---------------------------------------------------------------------------- live view, logs


async def test_get_shows_the_running_attempt(env):
    gate = threading.Event()
    started = threading.Event()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: 1)

            def slow():
                started.set()
                gate.wait(10)
                return 2

            return step.do("slow", slow)

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await wait_thread_event(started)
        assert await env.engine.status(T, iid) == "running"
        # "started" reaches the engine a few milliseconds after the callback starts
        with trio.fail_after(10):
            view = await env.engine.get(T, iid)
            while len(view.steps) < 2:
                await trio.sleep(0.001)
                view = await env.engine.get(T, iid)
        assert view.record.status == InstanceStatus.RUNNING
        assert [(s.name, s.status) for s in view.steps] == [
            ("first", "complete"),
            ("slow", "running"),
        ]
        assert view.steps[1].attempts == 1
    finally:
        gate.set()
    with trio.fail_after(10):
        assert await env.engine.wait_for_status(T, iid, FINISHED) == "complete"


async def test_logs_written_inside_steps_appear_in_read_logs(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def work():
                log.info("hello", 42)
                log.warning("careful")
                log.error("bad", "thing")
                return 1

            step.do("work", work)
            step.parallel({"p": lambda: log.info("from branch") or 1})
            return 1

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    logs = await env.engine.read_logs(T, view.record.instance_id)
    lines = [(line.level, line.message) for line in logs]
    assert ("info", "hello 42") in lines
    assert ("warning", "careful") in lines
    assert ("error", "bad thing") in lines
    assert ("info", "from branch") in lines
    assert lines.index(("info", "hello 42")) < lines.index(("warning", "careful"))
    ids = [line.id for line in logs]
    assert ids == sorted(ids)
    # read_logs pages after an id
    later = await env.engine.read_logs(T, view.record.instance_id, after_id=ids[0])
    assert [line.id for line in later] == ids[1:]


# ---------------------------------------------------------------------------- watchdog


async def test_code_stuck_between_steps_is_stopped_after_the_silence(manual_env):
    """Code outside any step must reach its next step (or its end) within SILENCE_SECONDS
    of its last command, even right after a step that had a long timeout: it is stopped
    and the activation counts as a crash outside a step (retried later, not lost)."""
    from runtime._activation import SILENCE_SECONDS

    in_step, step_done, stuck, release = (threading.Event() for _ in range(4))

    def first():
        in_step.set()
        return step_done.wait(30)

    class Stuck(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", first, timeout="1 hour")
            if not release.is_set():
                stuck.set()
                release.wait(30)  # outside any step, saying nothing
            return "done"

    manual_env.runner.register(T, Stuck)
    engine, clock = manual_env.engine, manual_env.clock
    iid, _ = await engine.create(T)
    assert await trio.to_thread.run_sync(in_step.wait, 30)
    await trio.testing.wait_all_tasks_blocked()  # the watchdog watches the 1-hour attempt
    step_done.set()
    assert await trio.to_thread.run_sync(stuck.wait, 30)
    await trio.testing.wait_all_tasks_blocked()
    clock.advance(SILENCE_SECONDS - 1)
    await trio.testing.wait_all_tasks_blocked()
    assert (await engine.get(T, iid)).record.status == "running"  # not yet
    for _ in range(2):  # within two silences whatever the watchdog was waiting for
        clock.advance(SILENCE_SECONDS)
        await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(10):
        await engine.wait_for_status(T, iid, ["waiting"])  # parked, to be retried
    lines = [line.message for line in await engine.read_logs(T, iid)]
    assert any("stopped answering" in line for line in lines), lines
    release.set()
    clock.advance(3600)
    with trio.fail_after(10):
        assert await engine.wait_for_status(T, iid, ["complete"]) == "complete"
