"""The playground's routes over real HTTP, without a browser: storing source as code
versions in the database, compile errors, the admin token and its session cookie, and
``--playground`` being off by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import trio

from runtime._http_playground import CSRF_HEADER, PLAYGROUND_TENANT, SESSION_COOKIE
from runtime._supervisor import open_supervisor

if TYPE_CHECKING:
    import httpx
    from conftest import PlaygroundApi

    from runtime._supervisor import SupervisorConfig

WAIT = 30  # seconds: a bound on a wait, never an expectation

RUNS = "/v1/playground/runs"
CODE = "/v1/playground/code"
INSTANCES = f"/v1/tenants/{PLAYGROUND_TENANT}/instances"

WAITER = """\
from tenantflow import WorkflowEntrypoint, log


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        got = step.do("take", lambda: {"took": event.payload})
        log.info("waiting")
        approval = step.wait_for_event("approval", type="approval", timeout="1 hour")
        return {"version": VERSION, "got": got, "by": approval["payload"]}


VERSION = 1
"""

BROKEN = """\
from tenantflow import WorkflowEntrypoint


def broken(:
    pass
"""


def _run_body(source: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, **extra}


def cookie_of(response: httpx.Response) -> str:
    header = response.headers["set-cookie"]
    pair, _, _ = header.partition(";")
    name, _, value = pair.partition("=")
    assert name == SESSION_COOKIE
    return value


# ---------------------------------------------------------------------- off by default


async def test_without_the_flag_the_page_and_its_api_are_404(pg_api: PlaygroundApi) -> None:
    plain = pg_api.plain
    for method, path in [
        ("GET", "/playground"),
        ("GET", "/playground/app.js"),
        ("GET", "/v1/playground"),
        ("POST", RUNS),
        ("POST", CODE),
    ]:
        response = await plain.request(method, path, json={"source": "x = 1"})
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------- running source


async def test_a_run_stores_its_source_in_the_database_and_pins_it(
    pg_api: PlaygroundApi, tmp_path: Path
) -> None:
    client = pg_api.client
    first = await client.post(RUNS, json=_run_body(WAITER, params={"n": 1}))
    assert first.status_code == 201, first.text
    run1 = first.json()
    assert run1["tenant"] == PLAYGROUND_TENANT and run1["status"] == "queued"
    # The source is stored as a code version in the database, never on disk.
    blob = await pg_api.supervisor.engine.get_code_version(PLAYGROUND_TENANT, run1["code_version"])
    assert blob is not None and msgpack.unpackb(blob, raw=False) == {"main.py": WAITER}
    assert not (tmp_path / "tenants" / PLAYGROUND_TENANT).exists()
    await pg_api.wait(PLAYGROUND_TENANT, run1["id"], ("waiting",))

    # A new source is a new version: new instances pin it, the older one keeps its own.
    second = await client.post(
        RUNS, json=_run_body(WAITER.replace("VERSION = 1", "VERSION = 2"), id="second")
    )
    assert second.status_code == 201, second.text
    run2 = second.json()
    assert run2["id"] == "second" and run2["code_version"] != run1["code_version"]
    for run, version in ((run1, 1), (run2, 2)):
        path = f"{INSTANCES}/{run['id']}"
        await pg_api.wait(PLAYGROUND_TENANT, run["id"], ("waiting",))
        response = await client.post(f"{path}/events", json={"type": "approval", "payload": "ok"})
        assert response.status_code == 202, response.text
        await pg_api.wait(PLAYGROUND_TENANT, run["id"], ("complete",))
        instance = (await client.get(path)).json()
        assert instance["code_version"] == run["code_version"]
        assert instance["output"]["version"] == version
        assert [s["name"] for s in instance["steps"]] == ["take", "approval"]

    tenants = {t["tenant"]: t for t in (await client.get("/v1/tenants")).json()}
    assert tenants[PLAYGROUND_TENANT]["source"] == "database"
    assert tenants[PLAYGROUND_TENANT]["code_version"] == run2["code_version"]
    assert "source" not in tenants["shop"]
    described = (await client.get("/v1/playground")).json()
    assert described["code_version"] == run2["code_version"]
    assert "VERSION = 2" in described["source"]


async def test_the_example_runs_until_its_approval(pg_api: PlaygroundApi) -> None:
    described = (await pg_api.client.get("/v1/playground")).json()
    assert described["code_version"] is None  # nothing run yet: the example is offered
    assert described["source"] == described["example"]
    body = _run_body(described["example"], params=described["params"])
    run = (await pg_api.client.post(RUNS, json=body)).json()
    await pg_api.wait(PLAYGROUND_TENANT, run["id"], ("waiting",))
    event = described["event"]
    path = f"{INSTANCES}/{run['id']}"
    view: dict[str, Any] = {}
    with trio.fail_after(WAIT):
        # The sleep comes first; the event is buffered if it arrives before the wait.
        response = await pg_api.client.post(f"{path}/events", json=event)
        assert response.status_code == 202
        await pg_api.wait(PLAYGROUND_TENANT, run["id"], ("complete",))
        view = (await pg_api.client.get(path)).json()
    assert [(s["name"], s["type"]) for s in view["steps"]] == [
        ("check order", "do"),
        ("cool off", "sleep"),
        ("approval", "waitForEvent"),
        ("charge", "do"),
    ]
    assert view["output"]["approved_by"] == "alice"


async def test_a_compile_error_names_file_and_line(pg_api: PlaygroundApi) -> None:
    client = pg_api.client
    checked = await client.post(CODE, json={"source": BROKEN})
    assert checked.status_code == 200, checked.text
    body = checked.json()
    assert body["ok"] is False and body["tenant"] == PLAYGROUND_TENANT
    error = body["error"]
    assert error["code"] == "tenant.load_failed"
    assert (error["file"], error["line"]) == ("main.py", 4)
    assert error["message"].startswith("main.py:4: ")
    # The failed version is stored all the same (as a folder's would be) ...
    assert await pg_api.supervisor.engine.get_code_version(PLAYGROUND_TENANT, body["code_version"])

    # ... but a run of it creates no instance.
    response = await client.post(RUNS, json=_run_body(BROKEN, params={}))
    assert response.status_code == 422, response.text
    refused = response.json()["error"]
    assert refused["code"] == "tenant.load_failed"
    assert (refused["file"], refused["line"]) == ("main.py", 4)
    assert refused["code_version"] == body["code_version"]
    assert (await client.get(INSTANCES)).json()["instances"] == []

    # An error raised while the module loads names its line too.
    raising = "from tenantflow import WorkflowEntrypoint\n\n\nvalue = missing_name + 1\n"
    error = (await client.post(CODE, json={"source": raising})).json()["error"]
    assert (error["file"], error["line"]) == ("main.py", 4)
    assert "NameError" in error["message"]
    imports = (await client.post(CODE, json={"source": "import os\n"})).json()["error"]
    assert (imports["line"], "ImportError" in imports["message"]) == (1, True)

    good = (await client.post(CODE, json={"source": WAITER})).json()
    assert good["ok"] is True and good["error"] is None


async def test_bad_bodies_are_400(pg_api: PlaygroundApi) -> None:
    client = pg_api.client
    for body in [
        [],
        {},
        {"source": 3},
        {"source": "x = 1", "extra": True},
        {"source": "x = 1", "id": 5},
        {"source": "x" * (300 * 1024)},
    ]:
        response = await client.post(RUNS, json=body)
        assert response.status_code == 400, (str(body)[:60], response.text)
        assert response.json()["error"]["code"] == "bad_request"
    response = await client.post(CODE, json={"source": "x = 1", "params": {}})
    assert response.status_code == 400


async def test_a_folder_tenant_cannot_be_the_playground(pg_config: SupervisorConfig) -> None:
    config = pg_config
    assert config.tenants_dir is not None
    (config.tenants_dir / PLAYGROUND_TENANT).mkdir()
    (config.tenants_dir / PLAYGROUND_TENANT / "main.py").write_text(WAITER)
    async with open_supervisor(config) as supervisor:
        state = supervisor.registry.tenants[PLAYGROUND_TENANT]
        assert state.source == "folder"
        with pytest.raises(ValueError, match="has a folder"):
            await supervisor.put_source(PLAYGROUND_TENANT, {"main.py": WAITER})


async def test_folder_scans_keep_a_database_tenant(
    pg_api: PlaygroundApi, pg_config: SupervisorConfig
) -> None:
    registry = pg_api.supervisor.registry
    version, error = await registry.put_source(PLAYGROUND_TENANT, {"main.py": WAITER})
    assert error is None
    await registry.refresh()  # no folder: the tenant stays
    assert registry.current_version(PLAYGROUND_TENANT) == version
    # A folder of the same name appearing later is ignored while the tenant exists.
    assert pg_config.tenants_dir is not None
    folder = pg_config.tenants_dir / PLAYGROUND_TENANT
    folder.mkdir()
    (folder / "main.py").write_text(WAITER.replace("VERSION = 1", "VERSION = 3"))
    await registry.refresh()
    assert registry.current_version(PLAYGROUND_TENANT) == version
    assert registry.tenants[PLAYGROUND_TENANT].source == "database"
    for tenant_id, files, reason in [
        (PLAYGROUND_TENANT, {"../main.py": WAITER}, "not a tenant file name"),
        (PLAYGROUND_TENANT, {"helpers.py": "x = 1"}, "no main.py"),
        ("Not A Tenant", {"main.py": WAITER}, "not a valid tenant id"),
    ]:
        with pytest.raises(ValueError, match=reason):
            await registry.put_source(tenant_id, files)


async def test_the_playground_tenant_comes_back_after_a_restart(
    pg_config: SupervisorConfig,
) -> None:
    config = pg_config
    async with open_supervisor(config) as supervisor:
        version, error = await supervisor.put_source(PLAYGROUND_TENANT, {"main.py": WAITER})
        assert error is None
        handle = await supervisor.binding(PLAYGROUND_TENANT).create(params={"n": 1})
        with trio.fail_after(WAIT):
            await supervisor.engine.wait_for_status(PLAYGROUND_TENANT, handle.id, ["waiting"])
    async with open_supervisor(config) as supervisor:
        # No folder: the tenant is known again from its newest instance's code version.
        assert supervisor.registry.current_version(PLAYGROUND_TENANT) == version
        await supervisor.engine.send_event(PLAYGROUND_TENANT, handle.id, "approval", "ok")
        with trio.fail_after(WAIT):
            await supervisor.engine.wait_for_status(PLAYGROUND_TENANT, handle.id, ["complete"])


# ---------------------------------------------------------------------- the token


async def test_with_a_token_the_page_and_its_api_answer_401(pg_api: PlaygroundApi) -> None:
    secured = pg_api.secured
    page = await secured.get("/playground")
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/html")
    assert 'action="/playground/login"' in page.text
    for method, path in [("GET", "/v1/playground"), ("POST", RUNS), ("POST", CODE)]:
        response = await secured.request(method, path, json={"source": WAITER})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
    wrong = await secured.get("/playground", params={"token": "nope"})
    assert wrong.status_code == 401 and "not the admin token" in wrong.text
    assert "set-cookie" not in wrong.headers
    # The assets hold nothing secret: the login page uses the stylesheet.
    assert (await secured.get("/playground/app.css")).status_code == 200


async def test_the_token_once_gives_a_session_cookie(pg_api: PlaygroundApi) -> None:
    secured = pg_api.secured
    response = await secured.get("/playground", params={"token": pg_api.token})
    assert response.status_code == 303
    assert response.headers["location"] == "/playground"  # the token leaves the address bar
    attributes = {a.strip().lower() for a in response.headers["set-cookie"].split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    cookie = cookie_of(response)
    assert pg_api.token not in cookie  # an HMAC of the token, not the token
    jar = {"cookie": f"{SESSION_COOKIE}={cookie}"}

    page = await secured.get("/playground", headers=jar)
    assert page.status_code == 200 and 'src="/playground/app.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (await secured.get("/v1/playground", headers=jar)).status_code == 200
    assert (await secured.get("/v1/tenants", headers=jar)).status_code == 200
    # Changing state with the cookie alone also needs the header a cross-site form
    # cannot send.
    forged = await secured.post(RUNS, json=_run_body(WAITER), headers=jar)
    assert forged.status_code == 401
    run = await secured.post(RUNS, json=_run_body(WAITER), headers={**jar, CSRF_HEADER: "1"})
    assert run.status_code == 201, run.text
    instance_id = run.json()["id"]
    # The event stream (an EventSource cannot send headers) takes the cookie.
    async with secured.stream("GET", f"{INSTANCES}/{instance_id}/logs", headers=jar) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    other = {"cookie": f"{SESSION_COOKIE}={'0' * len(cookie)}"}
    assert (await secured.get("/v1/playground", headers=other)).status_code == 401
    bearer = {"authorization": f"Bearer {pg_api.token}"}
    assert (await secured.get("/playground", headers=bearer)).status_code == 200
    assert (await secured.post(RUNS, json=_run_body(WAITER), headers=bearer)).status_code == 201


async def test_the_login_form_sets_the_cookie(pg_api: PlaygroundApi) -> None:
    secured = pg_api.secured
    refused = await secured.post("/playground/login", data={"token": "wrong"})
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    accepted = await secured.post("/playground/login", data={"token": pg_api.token})
    assert accepted.status_code == 303
    jar = {"cookie": f"{SESSION_COOKIE}={cookie_of(accepted)}"}
    assert (await secured.get("/playground", headers=jar)).status_code == 200
    # Without a configured token there is nothing to log in to: the page is open.
    assert (await pg_api.client.get("/playground")).status_code == 200
    assert (await pg_api.client.get("/v1/playground")).status_code == 200


async def test_the_assets_ship_with_their_types(pg_api: PlaygroundApi) -> None:
    client = pg_api.client
    script = await client.get("/playground/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    style = await client.get("/playground/app.css")
    assert style.headers["content-type"].startswith("text/css")
    assert (await client.get("/playground/nope.js")).status_code == 404
    assert (await client.get("/playground/login.html")).status_code == 404
    assert (await client.post("/playground")).status_code == 405


def test_every_asset_is_package_data() -> None:
    """A non-editable install carries the page: each asset matches a package-data glob."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["runtime"]
    folder = root / "runtime" / "playground"
    assets = sorted(p.relative_to(root / "runtime") for p in folder.iterdir())
    assert {"index.html", "login.html", "app.js", "app.css", "example.txt"} <= {
        a.name for a in assets
    }
    for asset in assets:
        assert any(fnmatch.fnmatch(str(asset), g) for g in globs), f"{asset} is not package data"
