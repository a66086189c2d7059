"""Bad input: ids, event types, sizes, serializability, durations, names, step count (SPEC 4)."""

from __future__ import annotations

import datetime as dt
import re

import msgpack
import pytest
import trio

from runtime import InProcessRunner, MockClock, open_store
from runtime._engine import Engine
from runtime.errors import (
    InstanceAlreadyExists,
    InvalidEventType,
    InvalidInstanceId,
    PayloadTooLarge,
    TenantflowError,
    TenantNotFound,
)
from runtime.testing import autojump
from sandbox.sdk import StepError, WorkflowEntrypoint

T = "acme"
FINISHED = ("complete", "errored", "terminated")
MIB = 1024 * 1024
# msgpack frames bytes of this length with a 5-byte header: exactly 1 MiB packed
EXACTLY_1_MIB = b"x" * (MIB - 5)
OVER_1_MIB = b"x" * (MIB - 4)
assert len(msgpack.packb(EXACTLY_1_MIB, use_bin_type=True)) == MIB


class Noop(WorkflowEntrypoint):
    def run(self, event, step):
        return event.payload if not isinstance(event.payload, bytes) else len(event.payload)


class Sleeper(WorkflowEntrypoint):
    def run(self, event, step):
        step.sleep("nap", "1 hour")


async def run_to_end(env, workflow, *, params=None, tenant=T):
    env.runner.register(tenant, workflow)
    iid, _ = await env.engine.create(tenant, params=params)
    with trio.fail_after(10):
        await env.engine.wait_for_status(tenant, iid, FINISHED)
    return await env.engine.get(tenant, iid)


async def wait_status(env, iid, *statuses):
    with trio.fail_after(10):
        return await env.engine.wait_for_status(T, iid, statuses)


def by_key(view):
    return {(s.name, s.count): s for s in view.steps}


# ---------------------------------------------------------------------------- instance ids


@pytest.mark.parametrize(
    "instance_id",
    ["a", "0", "_", "_x", "A-1_b", "order-2024_01", "a" * 100, "Z" + "-" * 99],
)
async def test_valid_instance_ids(env, instance_id):
    env.runner.register(T, Noop)
    iid, status = await env.engine.create(T, instance_id=instance_id)
    assert (iid, status) == (instance_id, "queued")
    assert (await env.engine.get(T, instance_id)).record.instance_id == instance_id


@pytest.mark.parametrize(
    "instance_id",
    [
        "",
        "a" * 101,
        "-a",
        "a b",
        "a.b",
        "a/b",
        "a:b",
        "é",
        "abc\n",
        "\nabc",
        "tab\t",
        "semi;colon",
        5,
        b"bytes",
    ],
)
async def test_invalid_instance_ids_are_refused(env, instance_id):
    env.runner.register(T, Noop)
    with pytest.raises(InvalidInstanceId) as info:
        await env.engine.create(T, instance_id=instance_id)
    assert info.value.code == "instance.invalid_id"
    summaries, _ = await env.engine.list_instances(T)
    assert summaries == []


async def test_generated_ids_follow_the_rule(env):
    env.runner.register(T, Noop)
    iid, _ = await env.engine.create(T)
    assert len(iid) <= 100
    assert re.fullmatch(r"[a-zA-Z0-9_][a-zA-Z0-9_-]*", iid)


async def test_duplicate_instance_id_is_refused_within_a_tenant(env):
    env.runner.register(T, Noop)
    env.runner.register("other", Noop)
    await env.engine.create(T, instance_id="dup", params=1)
    with trio.fail_after(10):
        await env.engine.wait_for_status(T, "dup", FINISHED)
    with pytest.raises(InstanceAlreadyExists) as info:
        await env.engine.create(T, instance_id="dup", params=2)
    assert info.value.code == "instance.already_exists"
    view = await env.engine.get(T, "dup")
    assert (view.record.params, view.record.output) == (1, 1)  # the first one is untouched
    # unique within a tenant only
    assert (await env.engine.create("other", instance_id="dup"))[0] == "dup"


async def test_create_many_reports_each_bad_item_alone(env):
    env.runner.register(T, Noop)
    await env.engine.create(T, instance_id="exists")
    results = await env.engine.create_many(
        T,
        [
            ("fresh-1", 1),
            ("exists", 2),
            ("bad id", 3),
            ("fresh-2", OVER_1_MIB),
            ("twice", 4),
            ("twice", 5),
            (None, 6),
        ],
    )
    assert results[0] == ("fresh-1", "queued")
    assert isinstance(results[1], InstanceAlreadyExists)
    assert isinstance(results[2], InvalidInstanceId)
    assert isinstance(results[3], PayloadTooLarge)
    assert [isinstance(r, InstanceAlreadyExists) for r in results[4:6]].count(True) == 1
    assert isinstance(results[6], tuple)
    assert results[6][1] == "queued"
    summaries, _ = await env.engine.list_instances(T)
    assert sorted(s.instance_id for s in summaries) == sorted(
        ["exists", "fresh-1", "twice", results[6][0]]
    )


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "a" * 64, "acme/x", "acme corp"])
async def test_invalid_tenant_ids_are_refused(env, tenant):
    with pytest.raises(TenantNotFound) as info:
        await env.engine.create(tenant)
    assert info.value.code == "tenant.not_found"


# ---------------------------------------------------------------------------- event types


@pytest.mark.parametrize(
    "event_type", ["", "a" * 101, "-go", "go now", "go.now", "é", "go\n", 7, None]
)
async def test_invalid_event_types_are_refused(manual_env, event_type):
    env = manual_env
    env.runner.register(T, Sleeper)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    with pytest.raises(InvalidEventType) as info:
        await env.engine.send_event(T, iid, event_type, None)
    assert info.value.code == "workflow.invalid_event_type"
    assert await env.engine.status(T, iid) == "waiting"


@pytest.mark.parametrize("event_type", ["a", "_", "A_1-b", "x" * 100, "0approval"])
async def test_valid_event_types_are_accepted(manual_env, event_type):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return step.wait_for_event("wait", type=event.payload, timeout="1 hour")["payload"]

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T, params=event_type)
    await wait_status(env, iid, "waiting")
    await env.engine.send_event(T, iid, event_type, "ok")
    assert await wait_status(env, iid, *FINISHED) == "complete"
    assert (await env.engine.get(T, iid)).record.output == "ok"


async def test_invalid_event_type_in_wait_for_event_is_a_clear_error(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            errors = []
            for bad in ["with space", "-dash", "x" * 101]:
                try:
                    step.wait_for_event("wait", type=bad, timeout=1)
                except Exception as exc:
                    errors.append(type(exc).__name__)
            return errors

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert len(view.record.output) == 3


# ---------------------------------------------------------------------------- sizes


async def test_params_up_to_1_mib_are_accepted(env):
    view = await run_to_end(env, Noop, params=EXACTLY_1_MIB)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == MIB - 5


async def test_params_over_1_mib_are_refused(env):
    env.runner.register(T, Noop)
    with pytest.raises(PayloadTooLarge) as info:
        await env.engine.create(T, instance_id="big", params=OVER_1_MIB)
    assert info.value.code == "payload.too_large"
    with pytest.raises(PayloadTooLarge):
        await env.engine.create(T, params={"list": ["y" * 1000] * 1100})
    summaries, _ = await env.engine.list_instances(T)
    assert summaries == []


async def test_non_serializable_params_are_refused(env):
    env.runner.register(T, Noop)
    for bad in [object(), {1, 2}, dt.datetime(2024, 1, 1)]:
        with pytest.raises(TenantflowError) as info:
            await env.engine.create(T, params=bad)
        assert info.value.code == "bad_request"


async def test_event_payload_over_1_mib_is_refused_and_nothing_is_lost(manual_env):
    env = manual_env

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")
            got = step.wait_for_event("wait", type="data", timeout="1 hour")
            return len(got["payload"])

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    with pytest.raises(PayloadTooLarge) as info:
        await env.engine.send_event(T, iid, "data", OVER_1_MIB)
    assert info.value.code == "payload.too_large"
    assert await env.engine.status(T, iid) == "waiting"
    await env.engine.send_event(T, iid, "data", EXACTLY_1_MIB)
    assert await wait_status(env, iid, *FINISHED) == "complete"
    view = await env.engine.get(T, iid)
    assert view.record.output == MIB - 5
    assert by_key(view)[("before", 1)].output == "kept"


async def test_non_serializable_event_payload_is_refused(manual_env):
    env = manual_env
    env.runner.register(T, Sleeper)
    iid, _ = await env.engine.create(T)
    await wait_status(env, iid, "waiting")
    with pytest.raises(TenantflowError) as info:
        await env.engine.send_event(T, iid, "data", {"when": object()})
    assert info.value.code == "bad_request"
    assert await env.engine.status(T, iid) == "waiting"


async def test_step_result_over_1_mib_is_a_non_retryable_step_failure(env):
    calls = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")
            ok = step.do("exactly 1 MiB", lambda: EXACTLY_1_MIB)

            def big():
                calls.append(1)
                return OVER_1_MIB

            try:
                step.do("too big", big)
            except StepError as exc:
                return {"ok": len(ok), "name": exc.name, "message": exc.message}
            return "not raised"

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    out = view.record.output
    assert out["ok"] == MIB - 5
    assert "1048576" in out["message"]
    assert calls == [1]  # not retried
    steps = by_key(view)
    assert steps[("before", 1)].output == "kept"
    assert steps[("exactly 1 MiB", 1)].status == "complete"
    big = steps[("too big", 1)]
    assert (big.status, big.attempts) == ("errored", 1)
    assert big.error.name == out["name"]


async def test_uncaught_oversized_step_result_errors_the_instance_keeping_earlier_steps(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")
            step.do("too big", lambda: "y" * (MIB + 1))

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert view.record.error.message
    assert [(s.name, s.status) for s in view.steps] == [
        ("before", "complete"),
        ("too big", "errored"),
    ]
    assert view.steps[0].output == "kept"


@pytest.mark.parametrize(
    "make_value",
    [
        object,
        lambda: {1, 2},
        lambda: dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        lambda: {"nested": [object()]},
        lambda: 2**70,
        lambda: {1: "int key"},
        lambda: {(1, 2): "tuple key"},
    ],
    ids=["object", "set", "datetime", "nested", "huge-int", "int-key", "tuple-key"],
)
async def test_non_serializable_step_result_is_a_clean_non_retryable_error(env, make_value):
    calls = []

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")

            def bad():
                calls.append(1)
                return make_value()

            try:
                step.do("bad", bad)
            except StepError as exc:
                return {"name": exc.name, "message": exc.message}
            return "not raised"

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    assert view.record.output["name"] == "SerializationError", view.record.output
    assert "serializ" in view.record.output["message"]
    assert calls == [1], "a result that cannot be serialized must not be retried"
    assert by_key(view)[("bad", 1)].attempts == 1
    assert by_key(view)[("before", 1)].output == "kept"


@pytest.mark.parametrize(
    "make_output",
    [object, lambda: "z" * (MIB + 1), lambda: {1: "int key"}],
    ids=["object", "too-large", "int-key"],
)
async def test_bad_workflow_return_value_errors_the_instance_cleanly(env, make_output):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("before", lambda: "kept")
            return make_output()

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert view.record.output is None
    assert view.record.error.name in ("SerializationError", "PayloadTooLargeError")
    assert view.steps[0].output == "kept"


# ---------------------------------------------------------------------------- durations, config


async def test_invalid_durations_and_step_config_are_clear_errors(env):
    cases = {
        "sleep unit": lambda step: step.sleep("s", "10 fortnights"),
        "sleep negative": lambda step: step.sleep("s", -1),
        "sleep text": lambda step: step.sleep("s", "soon"),
        "sleep bool": lambda step: step.sleep("s", True),
        "sleep none": lambda step: step.sleep("s", None),
        "sleep nan": lambda step: step.sleep("s", float("nan")),
        "sleep negative timedelta": lambda step: step.sleep("s", dt.timedelta(seconds=-5)),
        "sleep_until text": lambda step: step.sleep_until("s", "tomorrow"),
        "timeout zero": lambda step: step.do("d", lambda: 1, timeout=0),
        "timeout text": lambda step: step.do("d", lambda: 1, timeout="forever"),
        "retries limit": lambda step: step.do("d", lambda: 1, retries={"limit": -1}),
        "retries backoff": lambda step: step.do("d", lambda: 1, retries={"backoff": "random"}),
        "retries delay": lambda step: step.do("d", lambda: 1, retries={"delay": "later"}),
        "retries field": lambda step: step.do("d", lambda: 1, retries={"tries": 3}),
        "retries type": lambda step: step.do("d", lambda: 1, retries=3),
        "callback": lambda step: step.do("d", "not callable"),
        "wait timeout": lambda step: step.wait_for_event("w", type="t", timeout="a while"),
        "wait negative": lambda step: step.wait_for_event("w", type="t", timeout=-5),
        "parallel empty": lambda step: step.parallel({}),
    }

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            first = step.do("first", lambda: "kept")
            errors = {}
            for label, call in cases.items():
                try:
                    call(step)
                    errors[label] = None
                except Exception as exc:
                    errors[label] = [type(exc).__name__, str(exc)]
            return {"first": first, "errors": errors}

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    errors = view.record.output["errors"]
    accepted = [label for label, error in errors.items() if error is None]
    assert accepted == []
    assert all(message for _, message in errors.values())
    assert view.steps[0].output == "kept"
    # no bad call left a step in the journal
    assert [s.name for s in view.steps] == ["first"]


async def test_uncaught_invalid_duration_errors_the_instance_keeping_earlier_steps(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: "kept")
            step.sleep("bad", "3 fortnights")

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert "fortnights" in view.record.error.message
    assert [(s.name, s.output) for s in view.steps] == [("first", "kept")]


async def test_step_timeout_longer_than_365_days_ends_cleanly(env):
    """A step timeout the workflow side accepts must not put the instance in a crash loop."""

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: 1)
            try:
                return step.do("long", lambda: "done", timeout="400 days")
            except Exception as exc:
                return {"error": type(exc).__name__}

    env.runner.register(T, Wf)
    iid, _ = await env.engine.create(T)
    with trio.move_on_after(2):
        await env.engine.wait_for_status(T, iid, FINISHED)
    view = await env.engine.get(T, iid)
    logs = [line.message for line in await env.engine.read_logs(T, iid)]
    assert view.record.status in FINISHED, (view.record.status, len(logs), logs[:2])


# ---------------------------------------------------------------------------- step names


async def test_step_name_limits(env):
    names = {
        "256 chars": "n" * 256,
        "unicode": "café ☕ 步骤",
        "spaces and punctuation": "load user: #1 (retry)",
    }
    bad = {
        "257 chars": "n" * 257,
        "newline": "a\nb",
        "tab": "a\tb",
        "nul": "a\x00b",
        "escape": "\x1b[31mred",
        "del": "a\x7f",
        "c1 control": "a\x85b",
        "not a string": 42,
        "empty": "",
    }

    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            ok = {label: step.do(name, lambda n=name: len(n)) for label, name in names.items()}
            errors = {}
            for label, name in bad.items():
                for kind, call in {
                    "do": lambda n=name: step.do(n, lambda: 1),
                    "sleep": lambda n=name: step.sleep(n, 1),
                    "wait": lambda n=name: step.wait_for_event(n, type="t", timeout=1),
                    "parallel": lambda n=name: step.parallel({n: lambda: 1}),
                }.items():
                    try:
                        call()
                        errors[f"{label}/{kind}"] = None
                    except Exception as exc:
                        errors[f"{label}/{kind}"] = type(exc).__name__
            return {"ok": ok, "errors": errors}

    view = await run_to_end(env, Wf)
    assert view.record.status == "complete", view.record.error
    out = view.record.output
    assert out["ok"] == {label: len(name) for label, name in names.items()}
    accepted = [label for label, error in out["errors"].items() if error is None]
    assert accepted == []
    assert [s.name for s in view.steps] == list(names.values())


async def test_uncaught_bad_step_name_errors_the_instance_keeping_earlier_steps(env):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("first", lambda: "kept")
            step.do("x" * 300, lambda: 1)

    view = await run_to_end(env, Wf)
    assert view.record.status == "errored"
    assert "256" in view.record.error.message
    assert [(s.name, s.output) for s in view.steps] == [("first", "kept")]


# ---------------------------------------------------------------------------- step count


def test_default_step_limit_is_10000(tmp_path):
    store = open_store(str(tmp_path / "db"))
    try:
        assert Engine(store, InProcessRunner({})).max_steps == 10_000
    finally:
        store.close()


async def run_with_step_limit(tmp_path, workflow, max_steps):
    store = open_store(str(tmp_path / "limited.db"))
    clock = MockClock()
    engine = Engine(store, InProcessRunner({T: workflow}), clock=clock, max_steps=max_steps)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            nursery.start_soon(autojump, engine, clock)
            iid, _ = await engine.create(T)
            with trio.fail_after(10):
                await engine.wait_for_status(T, iid, FINISHED)
            view = await engine.get(T, iid)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return view


async def test_the_step_limit_is_enforced(tmp_path):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            for i in range(3):
                step.do("item", lambda i=i: i)
            step.sleep("nap", 10)  # the count survives a replay
            step.do("item", lambda: 3)
            step.do("one too many", lambda: 4)
            return "done"

    view = await run_with_step_limit(tmp_path, Wf, max_steps=5)
    assert view.record.status == "errored"
    assert "5" in view.record.error.message
    assert [(s.name, s.count, s.status) for s in view.steps] == [
        ("item", 1, "complete"),
        ("item", 2, "complete"),
        ("item", 3, "complete"),
        ("nap", 1, "complete"),
        ("item", 4, "complete"),
    ]


async def test_exactly_the_step_limit_is_allowed(tmp_path):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            return [step.do("item", lambda i=i: i) for i in range(5)]

    view = await run_with_step_limit(tmp_path, Wf, max_steps=5)
    assert view.record.status == "complete", view.record.error
    assert view.record.output == [0, 1, 2, 3, 4]


async def test_parallel_steps_count_towards_the_limit(tmp_path):
    class Wf(WorkflowEntrypoint):
        def run(self, event, step):
            step.do("a", lambda: 1)
            step.parallel({"b": lambda: 2, "c": lambda: 3, "d": lambda: 4})

    view = await run_with_step_limit(tmp_path, Wf, max_steps=3)
    assert view.record.status == "errored"
    assert [s.name for s in view.steps if s.status == "complete"][:1] == ["a"]
    assert len(view.steps) <= 3
