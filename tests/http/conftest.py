"""A real supervisor (real sandboxes, a SQLite file) behind two real HTTP servers.

``api.client`` talks to a server without an admin token; ``api.secured`` to one that
requires ``TOKEN`` (the client sends no Authorization header by itself).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from runtime._http import serve_http
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor

TOKEN = "s3cret-token"
MAX_BODY = 64 * 1024
HEARTBEAT = 0.1
WAIT = 30  # seconds: a bound on every wait, never an expectation

GREETER = """\
from tenantflow import WorkflowEntrypoint, Response


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        params = event.payload or {}
        user = step.do("load user", lambda: {"name": params.get("name", "world")})
        greeting = step.do("greet", lambda: "Hello, " + user["name"] + "!")
        print(greeting)
        return {"greeting": greeting}


def fetch(request, env):
    if request.path == "/echo":
        return {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode(),
        }
    if request.path == "/boom":
        raise ValueError("boom")
    if request.path == "/missing":
        return {"status": env.WORKFLOWS.get("nope").status()}
    if request.path == "/teapot":
        return Response("short and stout", status=418, headers={"x-kind": "teapot"})
    instance = env.WORKFLOWS.create(params=request.json())
    return {"id": instance.id}
"""

WAITER = """\
from tenantflow import WorkflowEntrypoint, log


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        order = step.do("prepare", lambda: {"order": event.payload})
        log.info("waiting for approval")
        approval = step.wait_for_event("approval", type="approval", timeout="1 hour")
        shipped = step.do("ship", lambda: {"shipped": order, "by": approval["payload"]})
        print("shipped")
        return shipped
"""

OTHER = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("one", lambda: {"params": event.payload})
"""

BROKEN = """\
from tenantflow import WorkflowEntrypoint

def broken(:
    pass
"""

TENANTS = {"greeter": GREETER, "waiter": WAITER, "other": OTHER, "broken": BROKEN}


@dataclass
class Api:
    """What a test gets: the supervisor, and a client of each server."""

    supervisor: Supervisor
    client: httpx.AsyncClient  #: server without an admin token
    secured: httpx.AsyncClient  #: server with ``token``; requests carry no token by default
    token: str = TOKEN
    max_body: int = MAX_BODY

    async def create(self, tenant: str, **body: Any) -> str:
        response = await self.client.post(f"/v1/tenants/{tenant}/instances", json=body)
        assert response.status_code == 201, response.text
        instance_id: str = response.json()["id"]
        return instance_id

    async def wait(self, tenant: str, instance_id: str, statuses: Iterable[str]) -> str:
        with trio.fail_after(WAIT):
            status = await self.supervisor.engine.wait_for_status(tenant, instance_id, statuses)
        return status.value

    @staticmethod
    async def events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
        """(event, data) pairs of a text/event-stream; a comment line is ("comment", text)."""
        event: str | None = None
        data: list[str] = []
        async for line in response.aiter_lines():
            if line.startswith(":"):
                yield "comment", line[1:].strip()
            elif line == "":
                if event is not None:
                    yield event, json.loads("\n".join(data))
                event, data = None, []
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)


def write_tenants(root: Path) -> Path:
    for tenant, source in TENANTS.items():
        (root / tenant).mkdir(parents=True)
        (root / tenant / "main.py").write_text(source)
    return root


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config = SupervisorConfig(
        tenants_dir=write_tenants(tmp_path / "tenants"),
        db_url=f"sqlite:///{tmp_path / 'tenantflow.db'}",
        idle_timeout=60,
    )
    serve = functools.partial(serve_http, max_body_bytes=MAX_BODY, heartbeat_interval=HEARTBEAT)
    async with AsyncExitStack() as stack:
        supervisor = await stack.enter_async_context(open_supervisor(config))
        nursery = await stack.enter_async_context(trio.open_nursery())
        port = await nursery.start(functools.partial(serve, supervisor, port=0))
        secured_port = await nursery.start(
            functools.partial(serve, supervisor, port=0, admin_token=TOKEN)
        )
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{secured_port}", timeout=WAIT) as sec,
        ):
            yield Api(supervisor, client, sec)
        nursery.cancel_scope.cancel()
