"""Replay from the journal, crash recovery and nondeterminism (SPEC 4)."""

from __future__ import annotations

import collections
import threading
import uuid
from contextlib import asynccontextmanager

import trio

from runtime import (
    ActivationChannel,
    Engine,
    InProcessRunner,
    MockClock,
    Runner,
    RunnerError,
    open_store,
)
from runtime.testing import autojump
from sandbox.protocol import StepFinished, StepStarted
from sandbox.sdk import NonRetryableError, StepError, WorkflowEntrypoint

T = "acme"
FINISHED = ("complete", "errored", "terminated")

# Executions of step callbacks and of run() bodies, by name (reset by each test).
CALLS: collections.Counter[str] = collections.Counter()


def called(name, value=None):
    CALLS[name] += 1
    return value if value is not None else name


async def wait_status(engine, iid, *statuses):
    with trio.fail_after(10):
        return await engine.wait_for_status(T, iid, statuses)


async def wait_thread_event(event: threading.Event):
    assert await trio.to_thread.run_sync(event.wait, 60), "the thread never got there"


@asynccontextmanager
async def engine_on(db_path, runner, clock, *, jump=True, **options):
    """An engine on ``db_path`` like the fixtures build it; stopped (not crashed) on exit."""
    store = open_store(str(db_path))
    engine = Engine(store, runner, clock=clock, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            if jump:
                nursery.start_soon(autojump, engine, clock)
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        store.close()


class CrashingRunner(Runner):
    """Wraps a runner; its sandbox 'dies' (RunnerError) when ``crash_on(command)`` says so."""

    def __init__(self, inner, crash_on):
        self.inner = inner
        self.crash_on = crash_on
        self.crashes = 0

    @asynccontextmanager
    async def open_activation(self, target, activation):
        async with self.inner.open_activation(target, activation) as channel:
            yield _CrashingChannel(self, channel)


class _CrashingChannel(ActivationChannel):
    def __init__(self, runner, channel):
        self._runner = runner
        self._channel = channel

    async def receive(self):
        command = await self._channel.receive()
        if self._runner.crash_on(command, self._runner.crashes):
            self._runner.crashes += 1
            raise RunnerError("simulated sandbox crash")
        return command

    async def reply(self, reply):
        await self._channel.reply(reply)

    async def abort(self, reason):
        await self._channel.abort(reason)


# ---------------------------------------------------------------------------- replay


async def test_recorded_steps_are_not_run_again_after_a_suspension(env):
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            called("run()")
            a = step.do("a", lambda: called("a", 1))
            step.sleep("nap 1", 60)
            b = step.do("b", lambda: called("b", 2))
            step.sleep("nap 2", 60)
            c = step.do("c", lambda: called("c", 3))
            return [a, b, c]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env.engine, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == [1, 2, 3]
    assert CALLS == {"a": 1, "b": 1, "c": 1, "run()": 3}


async def test_replay_returns_the_recorded_result(env):
    seen = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            token = step.do("token", lambda: uuid.uuid4().hex)
            seen.append(token)
            step.sleep("nap", 5)
            return token

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env.engine, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert len(seen) == 2
    assert seen[0] == seen[1] == view.record.output == view.steps[0].output


async def test_replay_raises_the_recorded_error_again(env):
    CALLS.clear()
    seen = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def fail():
                called("fail")
                raise NonRetryableError("declined")

            try:
                step.do("charge", fail)
            except StepError as exc:
                seen.append([type(exc).__name__, exc.name, exc.message])
            step.sleep("nap", 5)
            return seen[-1]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env.engine, iid, *FINISHED) == "complete"
    assert seen == [["StepError", "NonRetryableError", "declined"]] * 2
    assert CALLS["fail"] == 1


async def test_replay_of_a_retrying_step_continues_its_attempt_count(env):
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            called("run()")
            before = step.do("before", lambda: called("before", 0))

            def flaky(ctx):
                called("flaky")
                if ctx.attempt < 3:
                    raise RuntimeError("again")
                return ctx.attempt

            return [before, step.do("flaky", flaky, retries={"delay": 1})]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env.engine, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == [0, 3]
    # each retry wait suspends: three activations, the first step run once
    assert CALLS == {"run()": 3, "before": 1, "flaky": 3}


# ---------------------------------------------------------------------------- crashes


async def test_a_crash_between_steps_resumes_from_the_journal(tmp_path):
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("a", lambda: called("a", "A"))
            b = step.do("b", lambda: called("b", "B"))
            return [a, b]

    def crash_on(command, crashes):
        return crashes == 0 and isinstance(command, StepStarted) and command.name == "b"

    inner = InProcessRunner({T: Wf})
    runner = CrashingRunner(inner, crash_on)
    async with engine_on(tmp_path / "db", runner, MockClock()) as engine:
        iid, _ = await engine.create(T)
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        view = await engine.get(T, iid)
        logs = [line.message for line in await engine.read_logs(T, iid)]
    assert runner.crashes == 1
    assert view.record.output == ["A", "B"]
    assert CALLS["a"] == 1  # persisted before the crash: never run again
    assert [(s.name, s.status) for s in view.steps] == [("a", "complete"), ("b", "complete")]
    assert any("simulated sandbox crash" in line for line in logs)


async def test_a_step_whose_result_was_not_persisted_runs_again_and_is_recorded_once(tmp_path):
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("a", lambda: called("a", "A"))
            b = step.do("b", lambda ctx: called("b", f"B{ctx.attempt}"))
            return [a, b]

    def crash_on(command, crashes):
        return crashes == 0 and isinstance(command, StepFinished) and command.name == "b"

    runner = CrashingRunner(InProcessRunner({T: Wf}), crash_on)
    async with engine_on(tmp_path / "db", runner, MockClock()) as engine:
        iid, _ = await engine.create(T)
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        view = await engine.get(T, iid)
    assert CALLS == {"a": 1, "b": 2}  # at least once
    assert view.record.output == ["A", "B2"]
    assert [(s.name, s.status, s.attempts, s.output) for s in view.steps] == [
        ("a", "complete", 1, "A"),
        ("b", "complete", 2, "B2"),  # recorded exactly once
    ]


async def test_a_supervisor_restart_resumes_a_sleeping_instance(tmp_path):
    CALLS.clear()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            called("run()")
            a = step.do("a", lambda: called("a", "A"))
            step.sleep("nap", "1 hour")
            return [a, step.do("b", lambda: called("b", "B"))]

    db = tmp_path / "engine.db"
    clock = MockClock()
    async with engine_on(db, InProcessRunner({T: Wf}), clock, jump=False) as engine:
        iid, _ = await engine.create(T, instance_id="durable")
        await wait_status(engine, iid, "waiting")
    assert CALLS == {"run()": 1, "a": 1}

    clock.advance(3600)
    async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        view = await engine.get(T, iid)
    assert view.record.output == ["A", "B"]
    assert CALLS == {"run()": 2, "a": 1, "b": 1}


async def test_a_supervisor_killed_mid_step_runs_that_step_again(tmp_path):
    CALLS.clear()
    gate = threading.Event()
    started = threading.Event()

    def slow():
        called("b")
        started.set()
        gate.wait(10)
        return "B"

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("a", lambda: called("a", "A"))
            return [a, step.do("b", slow)]

    db = tmp_path / "engine.db"
    clock = MockClock()
    try:
        async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
            iid, _ = await engine.create(T)
            await wait_thread_event(started)
            assert await engine.status(T, iid) == "running"
    finally:
        gate.set()  # the abandoned attempt's thread finishes; nobody hears it

    async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
        assert engine.recovered == 1
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        view = await engine.get(T, iid)
    assert view.record.output == ["A", "B"]
    assert CALLS == {"a": 1, "b": 2}
    assert [(s.name, s.status) for s in view.steps] == [("a", "complete"), ("b", "complete")]


# ---------------------------------------------------------------------------- nondeterminism


class V1(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", lambda: called("v1 a", "A"))
        step.sleep("nap", "1 hour")
        return [a, step.do("b", lambda: called("v1 b", "B"))]


async def swap_code_while_sleeping(env, new_class):
    CALLS.clear()
    env.runner.register(T, V1)
    iid, _ = await env.engine.create(T)
    await wait_status(env.engine, iid, "waiting")
    env.runner.register(T, new_class)
    env.clock.advance(3600)
    await wait_status(env.engine, iid, *FINISHED)
    return await env.engine.get(T, iid)


async def test_a_renamed_step_is_nondeterminism_naming_the_step(manual_env):
    class Renamed(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("renamed", lambda: called("v2 renamed", "A"))
            step.sleep("nap", "1 hour")
            return [a, step.do("b", lambda: called("v2 b", "B"))]

    view = await swap_code_while_sleeping(manual_env, Renamed)
    assert view.record.status == "errored"
    assert view.record.error.name == "NondeterminismError"
    assert "renamed" in view.record.error.message
    assert CALLS == {"v1 a": 1}
    # nothing already persisted is lost
    assert [(s.name, s.status) for s in view.steps][:2] == [("a", "complete"), ("nap", "complete")]


async def test_a_step_of_another_kind_is_nondeterminism(manual_env):
    class OtherKind(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("a", lambda: called("v2 a", "A"))
            step.do("nap", lambda: called("v2 nap", "not a sleep"))
            return step.do("b", lambda: called("v2 b", "B"))

    view = await swap_code_while_sleeping(manual_env, OtherKind)
    assert view.record.status == "errored"
    assert view.record.error.name == "NondeterminismError"
    assert "nap" in view.record.error.message
    assert "v2 nap" not in CALLS
    assert "v2 a" not in CALLS  # replayed from the journal


async def test_a_missing_step_is_nondeterminism(manual_env):
    class Shorter(WorkflowEntrypoint):
        def run(self, event, step):
            return [step.do("a", lambda: "A")]

    view = await swap_code_while_sleeping(manual_env, Shorter)
    assert view.record.status == "errored"
    assert view.record.error.name == "NondeterminismError"
    assert "nap" in view.record.error.message


async def test_catching_nondeterminism_does_not_hide_it(manual_env):
    class Stubborn(WorkflowEntrypoint):
        def run(self, event, step):
            try:
                step.do("changed", lambda: "x")
            except Exception:
                pass
            try:
                step.sleep("nap", "1 hour")
            except Exception:
                pass
            return "pretend all is well"

    view = await swap_code_while_sleeping(manual_env, Stubborn)
    assert view.record.status == "errored"
    assert view.record.error.name == "NondeterminismError"
    assert view.record.output is None


async def test_compatible_code_changes_replay_fine(manual_env):
    class Compatible(WorkflowEntrypoint):
        def run(self, event, step):
            a = step.do("a", lambda: called("v2 a", "changed"))
            step.sleep("nap", "2 hours")  # a different duration: the sleep is already recorded
            b = step.do("b", lambda: called("v2 b", "B2"))
            c = step.do("c", lambda: called("v2 c", "C"))  # new steps after the journal are fine
            return {"a": a, "b": b, "c": c, "note": "outside steps may change"}

    view = await swap_code_while_sleeping(manual_env, Compatible)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == {"a": "A", "b": "B2", "c": "C", "note": "outside steps may change"}
    assert CALLS == {"v1 a": 1, "v2 b": 1, "v2 c": 1}


# ---------------------------------------------------------------------------- durability


async def test_a_result_is_durable_before_run_continues(env):
    """Persist before proceeding: the next step can already read the previous one's row."""
    seen = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("a", lambda: "A")
            step.sleep("nap", 5)

            def check():
                def read(txn):
                    record = txn.get_instance(T, event.instance_id)
                    return [(s.name, s.status.value, s.output) for s in txn.load_steps(record.key)]

                seen.append(env.store.read(read))
                return "B"

            return step.do("b", check)

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    assert await wait_status(env.engine, iid, *FINISHED) == "complete"
    assert seen == [[("a", "complete", "A"), ("nap", "complete", None)]]


async def test_a_retry_wait_survives_a_supervisor_restart(tmp_path):
    attempts = []
    clock = MockClock()
    t0 = clock.now()

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            def flaky(ctx):
                attempts.append((ctx.attempt, clock.now()))
                if ctx.attempt == 1:
                    raise RuntimeError("first fails")
                return "ok"

            return step.do("flaky", flaky, retries={"delay": "1 minute"})

    db = tmp_path / "engine.db"
    async with engine_on(db, InProcessRunner({T: Wf}), clock, jump=False) as engine:
        iid, _ = await engine.create(T)
        await wait_status(engine, iid, "waiting")
    async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        view = await engine.get(T, iid)
    assert attempts == [(1, t0), (2, t0 + 60)]
    assert (view.steps[0].status, view.steps[0].attempts) == ("complete", 2)


async def test_buffered_events_survive_a_supervisor_restart(tmp_path):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.sleep("nap", "1 hour")
            return [
                step.wait_for_event("e1", type="e", timeout="1 minute")["payload"],
                step.wait_for_event("e2", type="e", timeout="1 minute")["payload"],
            ]

    db = tmp_path / "engine.db"
    clock = MockClock()
    async with engine_on(db, InProcessRunner({T: Wf}), clock, jump=False) as engine:
        iid, _ = await engine.create(T)
        await wait_status(engine, iid, "waiting")
        await engine.send_event(T, iid, "e", "one")
        await engine.send_event(T, iid, "e", "two")
    clock.advance(3600)
    async with engine_on(db, InProcessRunner({T: Wf}), clock, jump=False) as engine:
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        assert (await engine.get(T, iid)).record.output == ["one", "two"]


async def test_a_pending_pause_survives_a_supervisor_restart(tmp_path):
    CALLS.clear()
    gate = threading.Event()
    started = threading.Event()

    def slow():
        called("slow")
        started.set()
        gate.wait(10)
        return "S"

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return step.do("slow", slow)

    db = tmp_path / "engine.db"
    clock = MockClock()
    try:
        async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
            iid, _ = await engine.create(T)
            await wait_thread_event(started)
            assert await engine.pause(T, iid) == "waitingForPause"
    finally:
        gate.set()
    async with engine_on(db, InProcessRunner({T: Wf}), clock) as engine:
        assert await engine.status(T, iid) == "paused"
        await engine.resume(T, iid)
        assert await wait_status(engine, iid, *FINISHED) == "complete"
        assert (await engine.get(T, iid)).record.output == "S"
    assert CALLS["slow"] == 2
