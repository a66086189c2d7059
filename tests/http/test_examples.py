"""The example tenants of tenants_example/, each through real HTTP and real sandboxes.

Time is a mock clock that skips ahead whenever the engine only waits, so the agent's
24-hour sleep and the retries' backoff cost no real time.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from runtime import MockClock
from runtime._http import serve_http
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor
from runtime.testing import autojump

EXAMPLES = Path(__file__).resolve().parents[2] / "tenants_example"
WAIT = 30


class TimeSkipping:
    """Whether the mock clock may jump ahead (off while a human is to answer)."""

    on = True


@pytest.fixture
async def examples(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Supervisor]]:
    tenants = tmp_path / "tenants"
    shutil.copytree(EXAMPLES, tenants)
    clock = MockClock()
    config = SupervisorConfig(tenants_dir=tenants, db_url=str(tmp_path / "db"))
    async with open_supervisor(config, clock=clock) as supervisor, trio.open_nursery() as nursery:
        TimeSkipping.on = True
        nursery.start_soon(
            functools.partial(autojump, supervisor.engine, clock, enabled=lambda: TimeSkipping.on)
        )
        port = await nursery.start(
            lambda task_status: serve_http(supervisor, port=0, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            yield client, supervisor
        nursery.cancel_scope.cancel()


async def wait_status(client: httpx.AsyncClient, tenant: str, iid: str, *wanted: str) -> dict:
    with trio.fail_after(WAIT):
        while True:
            body = (await client.get(f"/v1/tenants/{tenant}/instances/{iid}")).json()
            if body["status"] in wanted:
                return body
            await trio.sleep(0.01)


async def test_greeter(examples):
    client, _ = examples
    created = await client.post("/t/greeter/", json={"name": "Ada"})
    assert created.status_code == 200
    done = await wait_status(client, "greeter", created.json()["id"], "complete", "errored")
    assert done["output"] == {"greeting": "Hello, Ada!"}
    assert [s["name"] for s in done["steps"]] == ["load user", "cool off", "greet"]


async def test_ci_pipeline_waits_for_the_deploy_approval(examples):
    client, _ = examples
    TimeSkipping.on = False  # the approver answers within the hour
    created = await client.post(
        "/t/ci-pipeline/", json={"repo": "acme/web", "sha": "4f2a9c1", "pr": 42}
    )
    iid = created.json()["id"]
    assert created.json()["pipeline"] == "acme/web"
    waiting = await wait_status(client, "ci-pipeline", iid, "waiting")
    with trio.fail_after(WAIT):
        while not any(s["type"] == "waitForEvent" for s in waiting["steps"]):
            waiting = await wait_status(client, "ci-pipeline", iid, "waiting")
    names = [s["name"] for s in waiting["steps"]]
    assert names[:2] == ["checkout", "install"]
    assert set(names[2:5]) == {"lint", "test", "build"}  # the parallel checks
    assert names[5:] == ["comment on PR", "deploy approval"]
    sent = await client.post(
        f"/v1/tenants/ci-pipeline/instances/{iid}/events",
        json={"type": "approve-deploy", "payload": {"by": "ada"}},
    )
    assert sent.status_code == 202
    TimeSkipping.on = True
    done = await wait_status(client, "ci-pipeline", iid, "complete", "errored")
    assert done["output"]["deployed"] is True
    assert done["output"]["release"]["approved_by"] == "ada"
    assert done["output"]["release"]["released"].startswith("acme/web:")


async def test_ci_pipeline_gives_up_when_nobody_approves(examples):
    client, _ = examples
    created = await client.post("/t/ci-pipeline/", json={"repo": "acme/api", "sha": "1"})
    done = await wait_status(client, "ci-pipeline", created.json()["id"], "complete", "errored")
    assert done["output"] == {"deployed": False, "reason": "approval timed out"}


async def test_agent_plan_retries_its_flaky_tool_and_sleeps_a_day(examples):
    client, supervisor = examples
    created = await client.post("/t/agent-plan/", json={"goal": "ship the docs", "flaky_until": 3})
    iid = created.json()["id"]
    # The human answers early: the event waits in the instance's buffer until the plan
    # reaches its approval step (time skips over the retries' backoff and the day's sleep).
    sent = await client.post(
        f"/v1/tenants/agent-plan/instances/{iid}/events",
        json={"type": "human-approval", "payload": {"ok": True}},
    )
    assert sent.status_code == 202
    done = await wait_status(client, "agent-plan", iid, "complete", "errored")
    results = done["output"]["results"]
    research = [r for r in results if r["action"] == "research"]
    assert [r["attempt"] for r in research] == [3, 3, 3]  # failed twice each, then worked
    assert results[-1] == {"action": "publish", "topic": "ship the docs", "attempt": 1}
    steps = {(s["name"], s["count"]): s for s in done["steps"]}
    nap = steps[("wait a day before following up", 1)]
    assert nap["type"] == "sleep" and nap["status"] == "complete"
    view = await supervisor.engine.get("agent-plan", iid)
    slept = next(s for s in view.steps if s.name == "wait a day before following up")
    assert slept.ended_at is not None and slept.started_at is not None
    assert slept.ended_at - slept.started_at >= 24 * 3600
