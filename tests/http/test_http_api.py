"""The HTTP API of SPEC 8 over real TCP: a real supervisor, real sandboxes, hypercorn, httpx.

The tenants (``greeter``, ``waiter``, ``other``, ``broken``) are written by the ``api``
fixture in ``conftest.py``. Waits are bounded (``trio.fail_after``); nothing asserts a
wall-clock time.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from runtime._http import TenantflowApp, serve_http
from runtime._runner import RunnerError
from runtime.errors import RateLimited

if TYPE_CHECKING:
    from conftest import Api

FINISHED = ("complete", "errored", "terminated")
V1 = "/v1/tenants"
WAIT = 30  # seconds: a bound on a wait, never an expectation


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    code: str = body["error"]["code"]
    return code


# ---------------------------------------------------------------------- system routes


async def test_healthz_is_open_on_both_servers(api: Api) -> None:
    for client in (api.client, api.secured):
        response = await client.get("/healthz")
        assert response.status_code == 200
        body = response.json()
        assert body["ok"] is True and isinstance(body["supervisor"], str)


async def test_admin_api_needs_the_token_when_one_is_configured(api: Api) -> None:
    good = {"authorization": f"Bearer {api.token}"}
    refused = [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {api.token}"},
        {"authorization": f"Bearer {api.token}x"},
    ]
    for path in (V1, "/metrics", f"{V1}/greeter/instances", "/v1/no-such-route"):
        for headers in refused:
            response = await api.secured.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert error_code(response) == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
    response = await api.secured.post(f"{V1}/greeter/instances", json={})
    assert response.status_code == 401
    assert (await api.secured.get(V1, headers=good)).status_code == 200
    assert (await api.secured.get("/metrics", headers=good)).status_code == 200
    assert (await api.secured.get("/v1/no-such-route", headers=good)).status_code == 404
    response = await api.secured.post(f"{V1}/greeter/instances", json={}, headers=good)
    assert response.status_code == 201
    # without a configured token the same routes are open
    assert (await api.client.get(V1)).status_code == 200
    assert (await api.client.get("/metrics")).status_code == 200


async def test_ingress_needs_no_token_and_never_sees_the_admin_token(api: Api) -> None:
    response = await api.secured.get("/t/greeter/echo")
    assert response.status_code == 200
    response = await api.secured.get(
        "/t/greeter/echo", headers={"authorization": f"Bearer {api.token}"}
    )
    assert "authorization" not in response.json()["headers"]
    response = await api.secured.get(
        "/t/greeter/echo", headers={"authorization": "Bearer tenant-own"}
    )
    assert response.json()["headers"]["authorization"] == "Bearer tenant-own"


async def test_list_tenants(api: Api) -> None:
    response = await api.client.get(V1)
    assert response.status_code == 200
    tenants = {t["tenant"]: t for t in response.json()}
    assert set(tenants) == {"broken", "greeter", "other", "waiter"}
    greeter = tenants["greeter"]
    assert re.fullmatch(r"[0-9a-f]{64}", greeter["code_version"])
    assert greeter["sandbox"] in ("warm", "cold")
    assert greeter["instances"] == {}
    assert tenants["broken"]["code_version"] is None
    assert "main.py:3" in tenants["broken"]["load_error"]


async def test_metrics_text_exposition(api: Api) -> None:
    instance_id = await api.create("other", params={"n": 1})
    await api.wait("other", instance_id, FINISHED)
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    sample = re.compile(
        r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})?'
        r" (?P<value>[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|Inf|NaN))$"
    )
    values: dict[str, float] = {}
    buckets: list[float] = []
    types: dict[str, str] = {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        match = sample.match(line)
        assert match is not None, line
        key = match["name"] + (match["labels"] or "")
        values[key] = float(match["value"])
        if match["name"] == "tenantflow_step_latency_seconds_bucket":
            buckets.append(float(match["value"]))
    assert types["tenantflow_instances"] == "gauge"
    assert types["tenantflow_steps_total"] == "counter"
    assert types["tenantflow_sandboxes_alive"] == "gauge"
    assert types["tenantflow_sandbox_cold_starts_total"] == "counter"
    assert types["tenantflow_step_latency_seconds"] == "histogram"
    assert values['tenantflow_instances{status="complete"}'] >= 1
    assert values['tenantflow_instances{status="waitingForPause"}'] >= 0
    assert values['tenantflow_steps_total{outcome="completed"}'] >= 1
    assert 'tenantflow_steps_total{outcome="failed"}' in values
    assert values["tenantflow_sandboxes_alive"] >= 1
    assert values["tenantflow_sandbox_cold_starts_total"] >= 1
    assert buckets == sorted(buckets), "histogram buckets are cumulative"
    count = values["tenantflow_step_latency_seconds_count"]
    assert values['tenantflow_step_latency_seconds_bucket{le="+Inf"}'] == count >= 1
    assert values["tenantflow_step_latency_seconds_sum"] >= 0


# ---------------------------------------------------------------------- routing and errors


async def test_unknown_routes_and_wrong_methods(api: Api) -> None:
    response = await api.client.get("/nope")
    assert response.status_code == 404
    assert error_code(response) == "not_found"
    response = await api.client.get("/v1/tenants/greeter")
    assert response.status_code == 404
    assert error_code(response) == "not_found"
    response = await api.client.delete(V1)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert error_code(response) == "method_not_allowed"
    response = await api.client.get(f"{V1}/greeter/instances/x/pause")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    response = await api.client.post("/healthz")
    assert response.status_code == 405
    # GET .../instances/batch is the instance named "batch", not the batch route
    response = await api.client.get(f"{V1}/greeter/instances/batch")
    assert response.status_code == 404
    assert error_code(response) == "instance.not_found"


async def test_unknown_tenant_is_tenant_not_found(api: Api) -> None:
    for response in (
        await api.client.get(f"{V1}/nosuch/instances"),
        await api.client.get(f"{V1}/nosuch/instances/x"),
        await api.client.post(f"{V1}/nosuch/instances", json={}),
        await api.client.post(f"{V1}/nosuch/instances/batch", json=[]),
        await api.client.post("/t/nosuch/", json={}),
        await api.client.post("/anything", json={}, headers={"x-tenant-id": "nosuch"}),
        await api.client.get("/t/NOT..valid/x"),
    ):
        assert response.status_code == 404, response.request.url
        assert error_code(response) == "tenant.not_found"


async def test_tenant_whose_code_fails_to_load(api: Api) -> None:
    for response in (
        await api.client.post("/t/broken/", json={}),
        await api.client.post(f"{V1}/broken/instances", json={}),
        await api.client.post(f"{V1}/broken/instances/batch", json=[{}]),
    ):
        assert response.status_code == 422
        assert error_code(response) == "tenant.load_failed"
        message = response.json()["error"]["message"]
        assert "main.py:3" in message and "SyntaxError" in message
    # its (older) instances can still be read: the list is merely empty
    response = await api.client.get(f"{V1}/broken/instances")
    assert response.status_code == 200
    assert response.json() == {"instances": [], "next_cursor": None}


async def test_malformed_and_mistyped_bodies_are_bad_requests(api: Api) -> None:
    instance_id = await api.create("waiter")
    cases = [
        (f"{V1}/greeter/instances", b"{not json"),
        (f"{V1}/greeter/instances", b"[1, 2]"),
        (f"{V1}/greeter/instances", b'{"id": "a", "parms": {}}'),
        (f"{V1}/greeter/instances/batch", b'{"id": "a"}'),
        (f"{V1}/greeter/instances/batch", b""),
        (f"{V1}/waiter/instances/{instance_id}/events", b"\xff\xfe"),
        (f"{V1}/waiter/instances/{instance_id}/events", b'{"type": "a", "extra": 1}'),
        ("/t/greeter/", b"{"),  # the tenant's request.json() fails: its error, status 500
    ]
    for path, content in cases[:-1]:
        response = await api.client.post(
            path, content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (path, content, response.text)
        assert error_code(response) == "bad_request"
    response = await api.client.post(cases[-1][0], content=cases[-1][1])
    assert response.status_code == 500
    response = await api.client.get(f"{V1}/greeter/instances", params={"limit": "many"})
    assert response.status_code == 400
    assert error_code(response) == "bad_request"
    response = await api.client.get(
        f"{V1}/waiter/instances/{instance_id}", params={"step_output": "perhaps"}
    )
    assert response.status_code == 400


async def test_body_over_the_limit_by_content_length(api: Api) -> None:
    too_big = b"x" * (api.max_body + 1)
    for path in (f"{V1}/greeter/instances", "/t/greeter/echo"):
        response = await api.client.post(path, content=too_big)
        assert response.status_code == 413, path
        assert error_code(response) == "payload.too_large"
    # exactly the limit is fine (all blanks: an empty body, so a generated id)
    response = await api.client.post(f"{V1}/greeter/instances", content=b" " * api.max_body)
    assert response.status_code == 201


@pytest.mark.parametrize("path", [f"{V1}/greeter/instances", "/t/greeter/echo"])
async def test_body_over_the_limit_while_streaming(api: Api, path: str) -> None:
    # A chunked body has no Content-Length to check first. Send just over the limit and
    # never the last chunk: the 413 must come while the body is still open, so the
    # server counted as it read instead of buffering the whole body.
    chunk = b"x" * 4096
    head = f"POST {path} HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n"
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", api.client.base_url.port or 80)
        async with stream:
            await stream.send_all(head.encode())
            for _ in range(api.max_body // len(chunk) + 1):
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            head_bytes, _, body = received.partition(b"\r\n\r\n")
            lines = head_bytes.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            while len(body) < int(headers["content-length"]):
                body += await stream.receive_some(65536)
    assert lines[0].startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "payload.too_large"


async def test_rate_limited_is_429_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RateLimited("tenant 'greeter' creates too fast", retry_after=2.2)

    monkeypatch.setattr(api.supervisor.engine, "create", refuse)
    response = await api.client.post(f"{V1}/greeter/instances", json={})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert error_code(response) == "rate_limited"


async def test_uncaught_rate_limit_in_tenant_fetch_is_429(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RateLimited("tenant 'greeter' creates too fast", retry_after=0.5)

    monkeypatch.setattr(api.supervisor.engine, "create", refuse)
    response = await api.client.post("/t/greeter/", json={"name": "Ed"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert error_code(response) == "rate_limited"


async def test_runner_error_is_502(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RunnerError("the sandbox died")

    monkeypatch.setattr(api.supervisor, "fetch", crash)
    response = await api.client.get("/t/greeter/echo")
    assert response.status_code == 502
    assert error_code(response) == "sandbox.error"


# ---------------------------------------------------------------------- tenant ingress


async def test_ingress_by_path_creates_an_instance(api: Api) -> None:
    response = await api.client.post("/t/greeter/", json={"name": "Ada"})
    assert response.status_code == 200, response.text
    instance_id = response.json()["id"]
    assert await api.wait("greeter", instance_id, FINISHED) == "complete"
    response = await api.client.get(f"{V1}/greeter/instances/{instance_id}")
    body = response.json()
    assert body["params"] == {"name": "Ada"}
    assert body["output"] == {"greeting": "Hello, Ada!"}


async def test_ingress_by_header_and_what_the_tenant_sees(api: Api) -> None:
    response = await api.client.post(
        "/echo",
        params={"a": "1", "b": "two words"},
        content=b"hello",
        headers={"x-tenant-id": "greeter", "X-Custom": "Value"},
    )
    assert response.status_code == 200
    seen = response.json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/echo"
    assert seen["query"] == {"a": "1", "b": "two words"}
    assert seen["headers"]["x-custom"] == "Value"
    assert seen["headers"]["x-tenant-id"] == "greeter"
    assert all(name == name.lower() for name in seen["headers"])
    assert seen["body"] == "hello"
    response = await api.client.put("/t/greeter/echo?x=", content=b"")
    assert response.json()["path"] == "/echo"
    assert response.json()["method"] == "PUT"
    assert response.json()["query"] == {"x": ""}
    # the header form creates instances too
    response = await api.client.post("/", json={"name": "Bo"}, headers={"x-tenant-id": "greeter"})
    instance_id = response.json()["id"]
    assert await api.wait("greeter", instance_id, FINISHED) == "complete"


async def test_ingress_responses_and_tenant_errors(api: Api) -> None:
    response = await api.client.get("/t/greeter/teapot")
    assert response.status_code == 418
    assert response.text == "short and stout"
    assert response.headers["x-kind"] == "teapot"
    response = await api.client.get("/t/greeter/boom")
    assert response.status_code == 500
    assert error_code(response) == "tenant.error"
    assert response.json()["error"]["message"] == "ValueError: boom"
    # an uncaught binding error keeps its code
    response = await api.client.get("/t/greeter/missing")
    assert response.status_code == 500
    assert error_code(response) == "instance.not_found"


# ---------------------------------------------------------------------- instances


async def test_create_get_and_conflicts(api: Api) -> None:
    response = await api.client.post(
        f"{V1}/other/instances", json={"id": "job-1", "params": {"n": 1}}
    )
    assert response.status_code == 201
    assert response.json() == {"id": "job-1", "status": "queued"}
    response = await api.client.post(f"{V1}/other/instances", json={"id": "job-1"})
    assert response.status_code == 409
    assert error_code(response) == "instance.already_exists"
    for bad in ("-starts-with-dash", "has space", "x" * 101, 5):
        response = await api.client.post(f"{V1}/other/instances", json={"id": bad})
        assert response.status_code == 400, bad
        assert error_code(response) == "instance.invalid_id"
    generated = await api.create("other")  # no body fields at all: a generated id
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    response = await api.client.post(f"{V1}/other/instances")  # no body
    assert response.status_code == 201

    assert await api.wait("other", "job-1", FINISHED) == "complete"
    response = await api.client.get(f"{V1}/other/instances/job-1")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "id", "status", "params", "output", "error", "code_version",
        "created_at", "updated_at", "steps",
    }  # fmt: skip
    assert body["id"] == "job-1" and body["status"] == "complete"
    assert body["params"] == {"n": 1}
    assert body["error"] is None
    assert body["created_at"].endswith("Z")
    [step] = body["steps"]
    assert set(step) == {
        "name", "count", "type", "status", "attempts", "started_at", "ended_at", "output",
        "error",
    }  # fmt: skip
    assert (step["name"], step["count"], step["type"]) == ("one", 1, "do")
    assert step["output"] == {"params": {"n": 1}}
    assert body["output"] == step["output"]
    response = await api.client.get(f"{V1}/other/instances/job-1", params={"step_output": "false"})
    assert response.json()["steps"][0]["output"] is None
    assert response.json()["output"] == {"params": {"n": 1}}
    response = await api.client.get(f"{V1}/other/instances/job-2")
    assert response.status_code == 404
    assert error_code(response) == "instance.not_found"


async def test_batch(api: Api) -> None:
    await api.create("other", id="exists")
    items = [
        {"id": "b-1", "params": {"n": 1}},
        {"id": "exists"},
        {"id": "bad id"},
        {"params": {"n": 4}},
        {"id": "b-5", "nope": True},
    ]
    response = await api.client.post(f"{V1}/other/instances/batch", json=items)
    assert response.status_code == 201
    body = response.json()
    assert [(c["index"], c["status"]) for c in body["created"]] == [(0, "queued"), (3, "queued")]
    assert body["created"][0]["id"] == "b-1"
    assert body["skipped"] == [{"index": 1, "id": "exists"}]
    assert [(e["index"], e["code"]) for e in body["errors"]] == [
        (2, "instance.invalid_id"),
        (4, "bad_request"),
    ]
    assert body["errors"][0]["id"] == "bad id"
    response = await api.client.post(f"{V1}/other/instances/batch", json=[{}] * 101)
    assert response.status_code == 400
    assert error_code(response) == "bad_request"


async def test_list_pages_through_every_instance(api: Api) -> None:
    ids = {f"p-{n}" for n in range(7)}
    response = await api.client.post(
        f"{V1}/other/instances/batch", json=[{"id": i} for i in sorted(ids)]
    )
    assert len(response.json()["created"]) == 7
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        response = await api.client.get(f"{V1}/other/instances", params=params)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"instances", "next_cursor"}
        pages += 1
        assert len(body["instances"]) <= 3
        for row in body["instances"]:
            assert set(row) == {"id", "status", "created_at", "updated_at"}
            seen.append(row["id"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids)  # every instance once
    for instance_id in ids:
        await api.wait("other", instance_id, FINISHED)
    response = await api.client.get(f"{V1}/other/instances", params={"status": "complete"})
    assert {row["id"] for row in response.json()["instances"]} == ids
    response = await api.client.get(f"{V1}/other/instances", params={"status": "errored"})
    assert response.json()["instances"] == []
    for params in ({"status": "sleeping"}, {"limit": "0"}, {"cursor": "not-a-cursor"}):
        response = await api.client.get(f"{V1}/other/instances", params=params)
        assert response.status_code == 400, params
        assert error_code(response) == "bad_request"


async def test_pause_resume_event_terminate_restart(api: Api) -> None:
    base = f"{V1}/waiter/instances/w-1"
    await api.create("waiter", id="w-1", params={"sku": "A"})
    await api.wait("waiter", "w-1", ["waiting"])
    response = await api.client.post(f"{base}/pause")
    assert response.status_code == 200
    assert response.json() == {"id": "w-1", "status": "paused"}
    assert (await api.client.get(base)).json()["status"] == "paused"
    response = await api.client.post(f"{base}/resume")
    assert response.json() == {"id": "w-1", "status": "waiting"}

    response = await api.client.post(f"{base}/events", json={"type": "bad type!"})
    assert response.status_code == 400
    assert error_code(response) == "workflow.invalid_event_type"
    response = await api.client.post(f"{base}/events", json={"payload": 1})
    assert error_code(response) == "workflow.invalid_event_type"
    response = await api.client.post(
        f"{base}/events", json={"type": "approval", "payload": {"by": "ann"}}
    )
    assert response.status_code == 202
    assert await api.wait("waiter", "w-1", FINISHED) == "complete"
    output = (await api.client.get(base)).json()["output"]
    assert output == {"shipped": {"order": {"sku": "A"}}, "by": {"by": "ann"}}

    response = await api.client.post(f"{base}/terminate")
    assert response.status_code == 409
    assert error_code(response) == "instance.cannot_terminate"
    response = await api.client.post(f"{base}/events", json={"type": "approval"})
    assert response.status_code == 409
    response = await api.client.post(f"{base}/restart")
    assert response.json() == {"id": "w-1", "status": "queued"}
    await api.wait("waiter", "w-1", ["waiting"])
    response = await api.client.post(f"{base}/terminate")
    assert response.json() == {"id": "w-1", "status": "terminated"}
    response = await api.client.post(f"{base}/pause")
    assert response.status_code == 409
    assert error_code(response) == "instance.invalid_state"


async def test_another_tenants_instance_is_not_found(api: Api) -> None:
    await api.create("waiter", id="mine", params={"owner": "waiter"})
    await api.wait("waiter", "mine", ["waiting"])
    calls = [
        api.client.get(f"{V1}/other/instances/mine"),
        api.client.get(f"{V1}/other/instances/mine/logs"),
        api.client.post(f"{V1}/other/instances/mine/events", json={"type": "approval"}),
    ]
    calls += [api.client.post(f"{V1}/other/instances/mine/{a}") for a in ("pause", "resume")]
    calls += [api.client.post(f"{V1}/other/instances/mine/{a}") for a in ("terminate", "restart")]
    for call in calls:
        response = await call
        assert response.status_code == 404, response.request.url
        assert error_code(response) == "instance.not_found"
        assert response.json() == {
            "error": {
                "code": "instance.not_found",
                "message": "instance 'mine' not found for tenant 'other'",
            }
        }
    response = await api.client.get(f"{V1}/other/instances")
    assert response.json()["instances"] == []
    # the id is free in the other tenant, and each tenant sees its own
    await api.create("other", id="mine", params={"owner": "other"})
    response = await api.client.get(f"{V1}/other/instances/mine")
    assert response.json()["params"] == {"owner": "other"}
    response = await api.client.get(f"{V1}/waiter/instances/mine")
    assert response.json()["params"] == {"owner": "waiter"}
    assert response.json()["status"] == "waiting"


# ---------------------------------------------------------------------- log streams


async def test_log_stream_history_then_live_then_done(api: Api) -> None:
    await api.create("waiter", id="s-1", params={"sku": "B"})
    await api.wait("waiter", "s-1", ["waiting"])
    history: list[tuple[str, Any]] = []
    live: list[tuple[str, Any]] = []
    with trio.fail_after(WAIT):
        async with api.client.stream("GET", f"{V1}/waiter/instances/s-1/logs") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = api.events(response)
            async for event, data in events:
                if event == "comment":
                    continue
                history.append((event, data))
                if event == "status":
                    break
            # drive the instance while the stream is open
            sent = await api.client.post(
                f"{V1}/waiter/instances/s-1/events", json={"type": "approval", "payload": 7}
            )
            assert sent.status_code == 202
            async for event, data in events:
                if event != "comment":
                    live.append((event, data))
            # the server ended the stream after "done"

    kinds = [kind for kind, _ in history]
    assert kinds == ["step", "step", "log", "status"], history
    assert [(d["name"], d["type"], d["status"]) for _, d in history[:2]] == [
        ("prepare", "do", "complete"),
        ("approval", "waitForEvent", "waiting"),
    ]
    assert history[2][1]["message"] == "waiting for approval"
    assert set(history[2][1]) == {"id", "ts", "level", "message"}
    assert history[3][1] == {"id": "s-1", "status": "waiting"}

    kinds = [kind for kind, _ in live]
    assert kinds[-1] == "done"
    assert live[-1][1]["status"] == "complete"
    assert live[-1][1]["output"] == {"shipped": {"order": {"sku": "B"}}, "by": 7}
    assert set(kinds) <= {"step", "log", "status", "done"}
    steps = [d for kind, d in live if kind == "step"]
    assert ("approval", "complete") in [(d["name"], d["status"]) for d in steps]
    assert ("ship", "complete") in [(d["name"], d["status"]) for d in steps]
    assert "prepare" not in [d["name"] for d in steps], "unchanged steps are not sent again"
    messages = [d["message"] for kind, d in live if kind == "log"]
    assert "shipped" in messages
    statuses = [d["status"] for kind, d in live if kind == "status"]
    assert statuses[-1] == "complete"
    assert kinds.index("status") < len(kinds) - 1
    # the last ship step precedes the final status, which precedes done
    last_ship = max(i for i, (k, d) in enumerate(live) if k == "step" and d["name"] == "ship")
    final_status = max(i for i, (k, _) in enumerate(live) if k == "status")
    assert last_ship < final_status < len(live) - 1


async def test_log_stream_of_a_finished_instance_ends_at_once(api: Api) -> None:
    instance_id = await api.create("greeter", params={"name": "Cy"})
    await api.wait("greeter", instance_id, FINISHED)
    with trio.fail_after(WAIT):
        async with api.client.stream("GET", f"{V1}/greeter/instances/{instance_id}/logs") as r:
            received = [(k, d) async for k, d in api.events(r) if k != "comment"]
    kinds = [kind for kind, _ in received]
    assert kinds == ["step", "step", "log", "status", "done"]
    assert received[2][1]["message"] == "Hello, Cy!"
    assert received[4][1] == {
        "id": instance_id,
        "status": "complete",
        "output": {"greeting": "Hello, Cy!"},
        "error": None,
    }


async def test_log_stream_heartbeat(api: Api) -> None:
    await api.create("waiter", id="h-1")
    await api.wait("waiter", "h-1", ["waiting"])
    seen: list[tuple[str, Any]] = []
    with trio.fail_after(WAIT):
        async with api.client.stream("GET", f"{V1}/waiter/instances/h-1/logs") as response:
            async for event, data in api.events(response):
                seen.append((event, data))
                if event == "comment" and [kind for kind, _ in seen].count("comment") == 2:
                    # quiet but alive; now end it (read to the end: no dangling stream)
                    terminated = await api.client.post(f"{V1}/waiter/instances/h-1/terminate")
                    assert terminated.status_code == 200
    kinds = [kind for kind, _ in seen]
    assert kinds.index("status") < kinds.index("comment")
    assert all(data == "heartbeat" for kind, data in seen if kind == "comment")
    assert seen[-1] == (
        "done",
        {"id": "h-1", "status": "terminated", "output": None, "error": None},
    )


async def test_client_leaving_a_log_stream_ends_it_on_the_server(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime._http

    follow = runtime._http.follow_instance
    ended = trio.Event()

    async def observed(*args: Any, **kwargs: Any) -> None:
        try:
            await follow(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(runtime._http, "follow_instance", observed)
    await api.create("waiter", id="gone")
    await api.wait("waiter", "gone", ["waiting"])
    with trio.fail_after(WAIT):
        async with api.client.stream("GET", f"{V1}/waiter/instances/gone/logs") as response:
            assert response.status_code == 200  # then dropped unread
        await ended.wait()  # the server noticed the disconnect and stopped following
    assert (await api.client.get(f"{V1}/waiter/instances/gone")).json()["status"] == "waiting"


async def test_log_stream_needs_the_token(api: Api) -> None:
    await api.create("waiter", id="t-1")
    response = await api.secured.get(f"{V1}/waiter/instances/t-1/logs")
    assert response.status_code == 401
    response = await api.client.get(f"{V1}/waiter/instances/nope/logs")
    assert response.status_code == 404
    assert error_code(response) == "instance.not_found"


async def test_refuses_an_open_admin_api(api: Api) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        await serve_http(api.supervisor, host="0.0.0.0", port=0)
    with pytest.raises(ValueError, match="empty"):
        TenantflowApp(api.supervisor, admin_token="")
