"""The loader and the supervisor: tenants from a folder, versions, scoping, dispatch."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from loader import MissingDispatcherMetadataError, unwrap_envelope
from runtime import InstanceStatus, MockClock
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor
from runtime.errors import TenantLoadFailed, TenantNotFound
from runtime.testing import autojump

VERSIONED = """
from tenantflow import WorkflowEntrypoint, InstanceNotFoundError

class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("first", lambda: "{tag}")
        step.sleep("nap", "1 hour")
        return [first, step.do("second", lambda: "{tag}"), event.payload]

def fetch(request, env):
    body = request.json() or {{}}
    if request.path == "/get":
        try:
            env.WORKFLOWS.get(body["id"])
            return {{"found": True}}
        except InstanceNotFoundError:
            return {{"found": False, "error": "InstanceNotFoundError"}}
    if request.path == "/event":
        try:
            env.WORKFLOWS.get(body["id"]).send_event(type="x", payload=1)
            return {{"sent": True}}
        except InstanceNotFoundError:
            return {{"sent": False, "error": "InstanceNotFoundError"}}
    if request.path == "/batch":
        return env.WORKFLOWS.create_batch(body["items"])
    instance = env.WORKFLOWS.create(id=body.get("id"), params=body.get("params"))
    return {{"id": instance.id, "status": instance.status()}}
"""


def write_tenant(root: Path, tenant: str, source: str, **files: str) -> None:
    folder = root / tenant
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.py").write_text(textwrap.dedent(source))
    for name, text in files.items():
        (folder / name).write_text(text)


@asynccontextmanager
async def supervisor_on(
    root: Path, db: Path, *, jump: bool = True, loader: str | None = None
) -> AsyncIterator[tuple[Supervisor, MockClock]]:
    clock = MockClock()
    config = SupervisorConfig(tenants_dir=root, db_url=str(db), scan_interval=0.05, loader=loader)
    async with open_supervisor(config, clock=clock) as supervisor, trio.open_nursery() as nursery:
        if jump:
            nursery.start_soon(autojump, supervisor.engine, clock)
        yield supervisor, clock
        nursery.cancel_scope.cancel()


async def call(supervisor: Supervisor, tenant: str, path: str = "/", body: object = None) -> dict:
    result = await supervisor.fetch(tenant, "POST", path, {}, {}, json.dumps(body).encode())
    assert result.error is None, result.error
    return json.loads(result.body)


async def finish(supervisor: Supervisor, tenant: str, iid: str) -> object:
    with trio.fail_after(30):
        await supervisor.engine.wait_for_status(tenant, iid, ["complete", "errored"])
    record = (await supervisor.engine.get(tenant, iid)).record
    assert record.status is InstanceStatus.COMPLETE, record.error
    return record.output


async def test_fetch_creates_an_instance_through_the_wrapped_binding(tmp_path):
    write_tenant(tmp_path / "t", "acme", VERSIONED.format(tag="v1"))
    async with supervisor_on(tmp_path / "t", tmp_path / "db") as (sup, _):
        created = await call(sup, "acme", "/", {"params": {"n": 1}})
        assert created["status"] in ("queued", "running")  # it may already have started
        assert await finish(sup, "acme", created["id"]) == ["v1", "v1", {"n": 1}]
        stored = (await sup.engine.get("acme", created["id"])).record.params
        metadata, params = unwrap_envelope(stored)
        assert metadata == {"tenant_id": "acme", "code_version": sup.require_tenant("acme")}
        assert params == {"n": 1}


async def test_a_new_folder_is_live_and_a_change_makes_a_new_version(tmp_path):
    root = tmp_path / "t"
    write_tenant(root, "acme", VERSIONED.format(tag="v1"))
    async with supervisor_on(root, tmp_path / "db", jump=False) as (sup, clock):
        v1 = sup.require_tenant("acme")
        old = (await call(sup, "acme", "/", {}))["id"]
        with trio.fail_after(30):
            await sup.engine.wait_for_status("acme", old, ["waiting"])
        # a new tenant appears, and acme's code changes, while `old` sleeps
        write_tenant(root, "newcomer", VERSIONED.format(tag="n1"))
        write_tenant(root, "acme", VERSIONED.format(tag="v2"))
        with trio.fail_after(30):
            while sup.registry.current_version("acme") == v1 or not sup.registry.tenants.get(
                "newcomer"
            ):
                await trio.sleep(0.02)
        v2 = sup.require_tenant("acme")
        assert v2 != v1 and len(v2) == 64
        assert await sup.engine.get_code_version("acme", v1) is not None
        new = (await call(sup, "acme", "/", {}))["id"]
        fresh = (await call(sup, "newcomer", "/", {}))["id"]
        with trio.fail_after(30):
            for tenant, iid in (("acme", new), ("newcomer", fresh)):
                await sup.engine.wait_for_status(tenant, iid, ["waiting"])
        clock.advance(3600)
        # the old instance finishes on the version it started with, the new on v2
        assert await finish(sup, "acme", old) == ["v1", "v1", None]
        assert await finish(sup, "acme", new) == ["v2", "v2", None]
        assert await finish(sup, "newcomer", fresh) == ["n1", "n1", None]
        assert (await sup.engine.get("acme", old)).record.code_version == v1
        # a restart takes the current version
        await sup.engine.restart("acme", old)
        with trio.fail_after(30):
            await sup.engine.wait_for_status("acme", old, ["waiting"])
        clock.advance(3600)
        assert await finish(sup, "acme", old) == ["v2", "v2", None]


async def test_code_that_does_not_compile_is_reported_and_others_keep_working(tmp_path):
    root = tmp_path / "t"
    write_tenant(root, "good", VERSIONED.format(tag="g"))
    write_tenant(root, "broken", "x = 1\nclass TenantWorkflow(:\n    pass\n")
    async with supervisor_on(root, tmp_path / "db") as (sup, _):
        with pytest.raises(TenantLoadFailed, match=r"main\.py:2"):
            sup.require_tenant("broken")
        listed = {t["tenant"]: t for t in await sup.tenants()}
        assert "main.py:2" in listed["broken"]["load_error"]
        with pytest.raises(TenantNotFound):
            sup.require_tenant("nobody")
        iid = (await call(sup, "good", "/", {}))["id"]
        assert await finish(sup, "good", iid) == ["g", "g", None]
        # breaking a working tenant keeps its last good version live
        version = sup.require_tenant("good")
        write_tenant(root, "good", "def fetch(request, env:\n")
        with trio.fail_after(30):
            while sup.registry.tenants["good"].load_error is None:
                await trio.sleep(0.02)
        assert sup.require_tenant("good") == version
        assert "main.py:1" in (sup.registry.tenants["good"].load_error or "")


async def test_another_tenants_instance_is_exactly_not_found(tmp_path):
    root = tmp_path / "t"
    write_tenant(root, "alice", VERSIONED.format(tag="a"))
    write_tenant(root, "mallory", VERSIONED.format(tag="m"))
    async with supervisor_on(root, tmp_path / "db") as (sup, _):
        secret = (await call(sup, "alice", "/", {"id": "secret-1"}))["id"]
        assert await call(sup, "alice", "/get", {"id": secret}) == {"found": True}
        missing = await call(sup, "mallory", "/get", {"id": "no-such-id"})
        theirs = await call(sup, "mallory", "/get", {"id": secret})
        assert missing == theirs == {"found": False, "error": "InstanceNotFoundError"}
        assert await call(sup, "mallory", "/event", {"id": secret}) == {
            "sent": False,
            "error": "InstanceNotFoundError",
        }
        # mallory may even reuse the id: ids are unique within a tenant only
        mine = (await call(sup, "mallory", "/", {"id": secret}))["id"]
        assert mine == secret
        assert await finish(sup, "alice", secret) == ["a", "a", None]
        assert await finish(sup, "mallory", mine) == ["m", "m", None]


async def test_create_batch_skips_existing_ids_and_reports_bad_items(tmp_path):
    write_tenant(tmp_path / "t", "acme", VERSIONED.format(tag="b"))
    async with supervisor_on(tmp_path / "t", tmp_path / "db") as (sup, _):
        await call(sup, "acme", "/", {"id": "taken"})
        result = await call(
            sup,
            "acme",
            "/batch",
            {"items": [{"id": "one"}, {"id": "taken"}, {"id": "bad id!"}, {"params": 3}]},
        )
        assert [c["id"] for c in result["created"]][:1] == ["one"]
        assert len(result["created"]) == 2
        assert result["skipped"] == [{"index": 1, "id": "taken"}]
        assert [(e["index"], e["code"]) for e in result["errors"]] == [(2, "instance.invalid_id")]


async def test_a_payload_without_the_envelope_never_reaches_load_runner(tmp_path, monkeypatch):
    calls: list[dict] = []
    module = tmp_path / "platform_loader.py"
    module.write_text(
        "CALLS = []\n"
        "def load_runner(metadata, default):\n"
        "    CALLS.append(dict(metadata))\n"
        "    return default\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    write_tenant(tmp_path / "t", "acme", VERSIONED.format(tag="L"))
    async with supervisor_on(
        tmp_path / "t", tmp_path / "db", loader="platform_loader:load_runner"
    ) as (sup, _):
        calls = sys.modules["platform_loader"].CALLS
        wrapped = (await call(sup, "acme", "/", {}))["id"]
        assert await finish(sup, "acme", wrapped) == ["L", "L", None]
        assert calls and all(c["tenant_id"] == "acme" for c in calls)
        seen = len(calls)
        bare, _ = await sup.engine.create(
            "acme", params={"no": "envelope"}, code_version=sup.require_tenant("acme")
        )
        with trio.fail_after(30):
            await sup.engine.wait_for_status("acme", bare, ["errored"])
        error = (await sup.engine.get("acme", bare)).record.error
        assert error is not None and error.name == MissingDispatcherMetadataError.__name__
        assert len(calls) == seen  # load_runner was never called for it
