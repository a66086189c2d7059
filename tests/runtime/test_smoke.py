from __future__ import annotations

import trio

from runtime import InstanceStatus
from sandbox.sdk import WorkflowEntrypoint


class ThreeSteps(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", lambda: event.payload["n"] + 1)
        step.sleep("nap", "1 hour")
        b = step.do("b", lambda ctx: a * 2 + ctx.attempt)
        return {"a": a, "b": b}


async def test_three_steps(env):
    env.runner.register("acme", ThreeSteps)
    iid, status = await env.engine.create("acme", params={"n": 1})
    assert status is InstanceStatus.QUEUED
    with trio.fail_after(10):
        final = await env.engine.wait_for_status("acme", iid, ["complete", "errored"])
    view = await env.engine.get("acme", iid)
    assert final is InstanceStatus.COMPLETE, view
    assert view.record.output == {"a": 2, "b": 5}
    assert [(s.name, s.status.value) for s in view.steps] == [
        ("a", "complete"),
        ("nap", "complete"),
        ("b", "complete"),
    ]
