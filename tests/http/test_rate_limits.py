"""Per-tenant creation rate limits: 429 with Retry-After, RateLimitedError in tenant code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from runtime import MockClock
from runtime._http import serve_http
from runtime._supervisor import SupervisorConfig, open_supervisor

LIMITED = """
from tenantflow import WorkflowEntrypoint, RateLimitedError

class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: 1)

def fetch(request, env):
    made = 0
    try:
        for i in range(10):
            env.WORKFLOWS.create()
            made = made + 1
    except RateLimitedError as err:
        return {"made": made, "refused": str(err)}
    return {"made": made}
"""
TOML = "[limits]\ncreate_rate = 2\ncreate_burst = 3\n"


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, MockClock]]:
    folder = tmp_path / "tenants" / "slow"
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(LIMITED)
    (folder / "tenant.toml").write_text(TOML)
    clock = MockClock()  # time stands still unless the test moves it
    config = SupervisorConfig(tenants_dir=tmp_path / "tenants", db_url=str(tmp_path / "db"))
    async with open_supervisor(config, clock=clock) as supervisor, trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_http(supervisor, port=0, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, clock
        nursery.cancel_scope.cancel()


async def test_the_api_answers_429_with_retry_after_beyond_the_rate(limited):
    client, clock = limited
    codes = [
        (await client.post("/v1/tenants/slow/instances", json={})).status_code for _ in range(3)
    ]
    assert codes == [201, 201, 201]  # the burst
    refused = await client.post("/v1/tenants/slow/instances", json={})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    batch = await client.post("/v1/tenants/slow/instances/batch", json=[{}, {}])
    assert batch.status_code == 429
    clock.advance(1.0)  # two more tokens
    again = await client.post("/v1/tenants/slow/instances/batch", json=[{}, {}])
    assert again.status_code == 201
    assert len(again.json()["created"]) == 2


async def test_tenant_code_gets_rate_limited_error(limited):
    client, _ = limited
    answer = (await client.post("/t/slow/")).json()
    assert answer["made"] == 3
    assert "faster than 2/s" in answer["refused"]
