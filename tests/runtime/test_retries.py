"""Retries, backoff delays on the mock clock, NonRetryableError, per-attempt timeouts (SPEC 4)."""

from __future__ import annotations

import itertools
import threading

import pytest
import trio

from sandbox.sdk import NonRetryableError, StepError, WorkflowEntrypoint

T = "acme"
FINISHED = ("complete", "errored", "terminated")


async def run_to_end(env, workflow, *, params=None, tenant=T):
    env.runner.register(tenant, workflow)
    iid, _ = await env.engine.create(tenant, params=params)
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


def gaps(times):
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def step_of(env, iid, name):
    view = await env.engine.get(T, iid)
    for s in view.steps:
        if s.name == name:
            return s
    return None


async def attempt_armed(env, iid, started: threading.Event):
    """Wait until the callback runs and the engine has armed the attempt's timeout."""
    await wait_thread_event(started)

    async def running():
        view = await env.engine.get(T, iid)
        return any(s.status == "running" for s in view.steps)

    await wait_until(running)


def always_failing(env, times, **step_kwargs):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def fail(ctx):
                times.append(env.clock.now())
                raise RuntimeError(f"attempt {ctx.attempt} failed")

            return step.do("fail", fail, **step_kwargs)

    return Wf


# ---------------------------------------------------------------------------- defaults


async def test_default_policy_is_6_attempts_with_exponential_10s_backoff(env):
    times = []
    t0 = env.clock.now()
    view = await run_to_end(env, always_failing(env, times))
    assert view.record.status == "errored"
    assert (view.record.error.name, view.record.error.message) == (
        "RuntimeError",
        "attempt 6 failed",
    )
    assert len(times) == 6
    assert times[0] == t0
    assert gaps(times) == [10, 20, 40, 80, 160]
    step = view.steps[0]
    assert step.status == "errored"
    assert step.attempts == 6
    assert (step.error.name, step.error.message) == ("RuntimeError", "attempt 6 failed")


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("constant", [7, 7, 7, 7]),
        ("linear", [7, 14, 21, 28]),
        ("exponential", [7, 14, 28, 56]),
    ],
)
async def test_backoff_delay_before_attempt_n_plus_1(env, backoff, expected):
    times = []
    wf = always_failing(env, times, retries={"limit": 4, "delay": "7 seconds", "backoff": backoff})
    view = await run_to_end(env, wf)
    assert view.record.status == "errored"
    assert len(times) == 5
    assert gaps(times) == expected
    assert view.steps[0].attempts == 5


async def test_partial_retries_dict_merges_over_defaults(env):
    times = []
    view = await run_to_end(env, always_failing(env, times, retries={"limit": 2}))
    assert view.record.status == "errored"
    # limit 2 -> 3 attempts; default delay 10 s, default exponential backoff
    assert gaps(times) == [10, 20]


async def test_partial_retries_with_only_backoff_keeps_default_limit_and_delay(env):
    times = []
    view = await run_to_end(env, always_failing(env, times, retries={"backoff": "constant"}))
    assert view.record.status == "errored"
    assert gaps(times) == [10, 10, 10, 10, 10]


async def test_delay_as_minutes_string(env):
    times = []
    wf = always_failing(env, times, retries={"limit": 1, "delay": "2 minutes"})
    await run_to_end(env, wf)
    assert gaps(times) == [120]


async def test_limit_zero_means_a_single_attempt(env):
    times = []
    view = await run_to_end(env, always_failing(env, times, retries={"limit": 0}))
    assert view.record.status == "errored"
    assert len(times) == 1
    assert view.steps[0].attempts == 1


async def test_zero_delay_retries_at_once(env):
    times = []
    wf = always_failing(env, times, retries={"limit": 3, "delay": 0, "backoff": "constant"})
    await run_to_end(env, wf)
    assert len(times) == 4
    assert gaps(times) == [0, 0, 0]


async def test_success_after_retries_records_output_and_attempts(env):
    times = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                times.append(env.clock.now())
                if ctx.attempt < 4:
                    raise ConnectionError("flaky network")
                return {"attempt": ctx.attempt}

            return step.do("flaky", flaky, retries={"delay": "1 second", "backoff": "linear"})

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {"attempt": 4}
    assert gaps(times) == [1, 2, 3]
    step = view.steps[0]
    assert (step.status, step.attempts, step.output, step.error) == (
        "complete",
        4,
        {"attempt": 4},
        None,
    )


# ---------------------------------------------------------------------------- non-retryable


async def test_non_retryable_error_stops_retries(env):
    times = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def charge(ctx):
                times.append(ctx.attempt)
                if ctx.attempt == 2:
                    raise NonRetryableError("not approved")
                raise RuntimeError("transient")

            return step.do("charge", charge, retries={"limit": 5, "delay": 1})

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert (view.record.error.name, view.record.error.message) == (
        "NonRetryableError",
        "not approved",
    )
    assert times == [1, 2]
    assert view.steps[0].attempts == 2
    assert view.steps[0].error.name == "NonRetryableError"


async def test_non_retryable_error_can_be_caught_in_run(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def charge():
                raise NonRetryableError("card expired")

            try:
                step.do("charge", charge)
            except StepError as exc:
                return {"name": exc.name, "message": exc.message}
            return None

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete"
    assert view.record.output == {"name": "NonRetryableError", "message": "card expired"}


# ---------------------------------------------------------------------------- durable retry wait


async def test_retry_wait_is_durable_and_the_instance_is_waiting(manual_env):
    env = manual_env
    attempts = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                attempts.append((ctx.attempt, env.clock.now()))
                if ctx.attempt == 1:
                    raise RuntimeError("first fails")
                return "ok"

            return step.do("flaky", flaky, retries={"delay": "30 seconds"})

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    with trio.fail_after(10):
        await env.engine.wait_for_status(T, iid, ["waiting"])
    step = await step_of(env, iid, "flaky")
    assert step.status == "retrying"
    assert step.attempts == 1
    assert (step.error.name, step.error.message) == ("RuntimeError", "first fails")
    assert step.wake_at == t0 + 30
    view = await env.engine.get(T, iid)
    assert view.record.wake_at == t0 + 30

    env.clock.advance(29)
    await trio.sleep(0.05)
    assert await env.engine.status(T, iid) == "waiting"
    assert len(attempts) == 1

    env.clock.advance(1)
    with trio.fail_after(10):
        assert await env.engine.wait_for_status(T, iid, FINISHED) == "complete"
    assert attempts == [(1, t0), (2, t0 + 30)]
    view = await env.engine.get(T, iid)
    assert view.record.output == "ok"
    assert (view.steps[0].status, view.steps[0].attempts) == ("complete", 2)


# ---------------------------------------------------------------------------- timeouts


async def test_attempt_timeout_fails_the_attempt_and_retries(manual_env):
    env = manual_env
    gate = threading.Event()
    started = threading.Event()
    attempts = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def slow(ctx):
                attempts.append((ctx.attempt, env.clock.now()))
                if ctx.attempt == 1:
                    started.set()
                    gate.wait(10)
                    return "too late"
                return "in time"

            return step.do(
                "slow",
                slow,
                timeout="30 seconds",
                retries={"limit": 2, "delay": "5 seconds", "backoff": "constant"},
            )

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    try:
        await attempt_armed(env, iid, started)
        env.clock.advance(29)
        await trio.sleep(0.05)
        assert await env.engine.status(T, iid) == "running"

        env.clock.advance(1)
        with trio.fail_after(10):
            await env.engine.wait_for_status(T, iid, ["waiting"])
        step = await step_of(env, iid, "slow")
        assert step.status == "retrying"
        assert step.attempts == 1
        assert step.error.name == "StepTimeoutError"
        assert step.wake_at == t0 + 35

        env.clock.advance(5)
        with trio.fail_after(10):
            assert await env.engine.wait_for_status(T, iid, FINISHED) == "complete"
    finally:
        gate.set()
    view = await env.engine.get(T, iid)
    assert view.record.output == "in time"
    assert [a for a, _ in attempts] == [1, 2]
    assert attempts[1][1] == t0 + 35
    assert (view.steps[0].status, view.steps[0].attempts) == ("complete", 2)


async def test_attempt_timeout_without_retries_left_errors_the_step(manual_env):
    env = manual_env
    gate = threading.Event()
    started = threading.Event()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def slow():
                started.set()
                gate.wait(10)
                return 1

            try:
                step.do("slow", slow, timeout=10, retries={"limit": 0})
            except StepError as exc:
                return {"name": exc.name}
            return "finished"

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await attempt_armed(env, iid, started)
        env.clock.advance(10)
        with trio.fail_after(10):
            assert await env.engine.wait_for_status(T, iid, FINISHED) == "complete"
    finally:
        gate.set()
    view = await env.engine.get(T, iid)
    assert view.record.output == {"name": "StepTimeoutError"}
    assert view.steps[0].status == "errored"
    assert view.steps[0].attempts == 1
    assert view.steps[0].error.name == "StepTimeoutError"


async def test_uncaught_timeout_errors_the_instance(manual_env):
    env = manual_env
    gate = threading.Event()
    started = threading.Event()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def slow():
                started.set()
                gate.wait(10)

            step.do("slow", slow, timeout="1 minute", retries={"limit": 0})

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await attempt_armed(env, iid, started)
        env.clock.advance(60)
        with trio.fail_after(10):
            assert await env.engine.wait_for_status(T, iid, FINISHED) == "errored"
    finally:
        gate.set()
    view = await env.engine.get(T, iid)
    assert view.record.error.name == "StepTimeoutError"


async def test_default_attempt_timeout_is_10_minutes(manual_env):
    env = manual_env
    gate = threading.Event()
    started = threading.Event()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def slow():
                started.set()
                gate.wait(10)

            step.do("slow", slow, retries={"limit": 0})

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    try:
        await attempt_armed(env, iid, started)
        env.clock.advance(599)
        await trio.sleep(0.05)
        assert await env.engine.status(T, iid) == "running"
        env.clock.advance(1)
        with trio.fail_after(10):
            assert await env.engine.wait_for_status(T, iid, FINISHED) == "errored"
    finally:
        gate.set()
    view = await env.engine.get(T, iid)
    assert view.record.error.name == "StepTimeoutError"


# ---------------------------------------------------------------------------- parallel


async def test_parallel_branches_keep_their_own_backoff(manual_env):
    """Each branch's retry waits its own delay, measured from its own failure."""
    env = manual_env
    gate = threading.Event()
    b_started = threading.Event()
    times = {"a": [], "b": []}

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def a(ctx):
                times["a"].append(env.clock.now())
                if ctx.attempt == 1:
                    raise RuntimeError("a fails at once")
                return "a"

            def b(ctx):
                times["b"].append(env.clock.now())
                if ctx.attempt == 1:
                    b_started.set()
                    gate.wait(10)
                    raise RuntimeError("b fails later")
                return "b"

            return step.parallel(
                {"a": a, "b": b},
                retries={"limit": 1, "delay": "10 seconds", "backoff": "constant"},
            )

    env.runner.register(T, Wf)
    t0 = env.clock.now()
    iid, _ = await env.engine.create(T)
    try:
        await wait_thread_event(b_started)

        async def a_retrying():
            s = await step_of(env, iid, "a")
            return s is not None and s.status == "retrying"

        await wait_until(a_retrying)
        env.clock.advance(5)
        gate.set()  # b fails now, at t0 + 5: its retry is due at t0 + 15
        with trio.fail_after(10):
            await env.engine.wait_for_status(T, iid, ["waiting"])
        b_step = await step_of(env, iid, "b")
        assert b_step.status == "retrying"
        assert b_step.wake_at == t0 + 15

        env.clock.advance(5)  # t0 + 10: a's retry is due, b's is not

        async def a_done():
            s = await step_of(env, iid, "a")
            return s.status == "complete"

        await wait_until(a_done)
        await trio.sleep(0.05)
        env.clock.advance(5)  # t0 + 15: b's retry is due
        with trio.fail_after(10):
            assert await env.engine.wait_for_status(T, iid, FINISHED) == "complete"
    finally:
        gate.set()
    assert times["a"] == [t0, t0 + 10]
    assert times["b"] == [t0, t0 + 15], "b's second attempt ran before its backoff elapsed"


async def test_a_branch_waiting_for_its_retry_does_not_stop_branches_not_started_yet(manual_env):
    """One branch fails at once and must wait for its backoff: branches whose threads
    start only after that reply still run their first attempt in this activation.
    (A branch's suspension once suspended the whole activation: a slow thread start
    under load then never ran its step until the first branch's backoff elapsed.)"""
    env = manual_env
    started: set[int] = set()
    lock = threading.Lock()
    all_started = threading.Event()
    n = 40

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def first():
                raise RuntimeError("fails at once")

            def other(i):
                def cb():
                    with lock:
                        started.add(i)
                        if len(started) == n - 1:
                            all_started.set()
                    return i

                return cb

            branches = {"first": first} | {f"b{i}": other(i) for i in range(1, n)}
            return step.parallel(
                branches, retries={"limit": 1, "delay": "1 hour", "backoff": "constant"}
            )

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_thread_event(all_started)  # before any clock move: all in the first activation
    with trio.fail_after(10):
        await env.engine.wait_for_status(T, iid, ["waiting"])
    view = await env.engine.get(T, iid)
    statuses = {s.name: s.status for s in view.steps}
    assert statuses.pop("first") == "retrying"
    assert set(statuses.values()) == {"complete"}
