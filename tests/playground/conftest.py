"""Fixtures for the playground: an in-process supervisor behind three HTTP servers, real
``tenantflow serve --playground`` processes, and a headless Chromium driven by Playwright.

The browser tests need Debian's Chromium (``/usr/bin/chromium``, or the path in
``TENANTFLOW_TEST_CHROMIUM``) and the ``playwright`` package; without either they skip,
saying how to get them. Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from runtime._http import serve_http
from runtime._http_playground import PLAYGROUND_TENANT
from runtime._supervisor import Supervisor, SupervisorConfig, open_supervisor

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "pl4yground-token"
WAIT = 30  # seconds: a bound on every wait, never an expectation
CHROMIUM = os.environ.get("TENANTFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
BROWSER_SKIP = (
    "browser tests need Chromium and Playwright: apt-get install -y chromium && "
    "pip install playwright (or pip install -e '.[dev]'); set TENANTFLOW_TEST_CHROMIUM "
    "to use another Chromium binary"
)

#: A tenant with a folder, so the instances browser has another tenant to show.
SHOP = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        first = step.do("reserve", lambda: {"sku": (event.payload or {}).get("sku", "none")})
        second = step.do("invoice", lambda: {"invoiced": first["sku"]})
        return {"shop": second}
"""


def write_tenants(root: Path) -> Path:
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "main.py").write_text(SHOP)
    return root


# ---------------------------------------------------------------------- in process


@dataclass
class PlaygroundApi:
    """One supervisor; ``client`` has the playground and no token, ``secured`` the
    playground and ``TOKEN``, ``plain`` no playground (what ``serve`` does by default)."""

    supervisor: Supervisor
    client: httpx.AsyncClient
    secured: httpx.AsyncClient
    plain: httpx.AsyncClient
    token: str = TOKEN

    async def wait(self, tenant: str, instance_id: str, statuses: tuple[str, ...]) -> str:
        with trio.fail_after(WAIT):
            status = await self.supervisor.engine.wait_for_status(tenant, instance_id, statuses)
        return status.value


def playground_config(tmp_path: Path) -> SupervisorConfig:
    tenants = tmp_path / "tenants"
    if not tenants.exists():
        write_tenants(tenants)
    return SupervisorConfig(
        tenants_dir=tenants,
        db_url=f"sqlite:///{tmp_path / 'tenantflow.db'}",
        stored_tenants=(PLAYGROUND_TENANT,),
    )


@pytest.fixture
def pg_config(tmp_path: Path) -> SupervisorConfig:
    """A supervisor config with the ``shop`` tenant folder and the playground tenant."""
    return playground_config(tmp_path)


@pytest.fixture
async def pg_api(pg_config: SupervisorConfig) -> AsyncIterator[PlaygroundApi]:
    async with AsyncExitStack() as stack:
        supervisor = await stack.enter_async_context(open_supervisor(pg_config))
        nursery = await stack.enter_async_context(trio.open_nursery())
        serve = functools.partial(serve_http, supervisor, port=0, heartbeat_interval=0.2)
        ports = [
            await nursery.start(functools.partial(serve, playground=True)),
            await nursery.start(functools.partial(serve, playground=True, admin_token=TOKEN)),
            await nursery.start(serve),
        ]
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=WAIT)
            )
            for port in ports
        ]
        yield PlaygroundApi(supervisor, *clients)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """A ``tenantflow serve --playground`` subprocess on a fixed port and SQLite file."""

    workdir: Path
    port: int
    db: Path
    tenants: Path
    token: str = TOKEN
    runs: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve{self.runs}.log"

    def start(self) -> None:
        """Start (again: same port, same database) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", TENANTFLOW_ADMIN_TOKEN=self.token)
        args = [sys.executable, "-m", "runtime.cli", "serve", "--playground"]
        args += ["--tenants", str(self.tenants), "--db", f"sqlite:///{self.db}"]
        args += ["--port", str(self.port), "--grace", "1"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + WAIT
        while not self._healthy():
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve not healthy within {WAIT} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (a graceful stop), SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return bool(json.load(response).get("ok"))
        except (OSError, ValueError):
            return False

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the admin API with the bearer token (what a script would do)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("authorization", f"Bearer {self.token}")
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return json.load(response)

    def wait_status(self, tenant: str, instance_id: str, statuses: tuple[str, ...]) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            status: str = self.admin("GET", f"/v1/tenants/{tenant}/instances/{instance_id}")[
                "status"
            ]
            if status in statuses:
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"{tenant}/{instance_id} is {status}, not {statuses}")
            time.sleep(0.1)


@dataclass
class ServeFactory:
    workdir: Path
    started: list[ServeProcess] = field(default_factory=list)

    def __call__(self) -> ServeProcess:
        index = len(self.started)
        workdir = self.workdir / f"server{index}"
        workdir.mkdir(parents=True)
        server = ServeProcess(
            workdir, free_port(), workdir / "tenantflow.db", write_tenants(workdir / "tenants")
        )
        self.started.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self.started:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(timeout=10)
            # Shown by pytest when the test failed: what the supervisor said.
            print(f"--- {server.log_path}\n{server.log_tail()}")


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[ServeFactory]:
    """Starts ``serve --playground`` processes; kills what still runs at the end."""
    factory = ServeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``serve --playground`` (with the admin token) shared by a module's tests."""
    factory = ServeFactory(tmp_path_factory.mktemp("playground-server"))
    try:
        yield factory()
    finally:
        factory.close()


# ---------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if importlib.util.find_spec("playwright") is None or not Path(CHROMIUM).exists():
        pytest.skip(BROWSER_SKIP)
    from playwright.sync_api import sync_playwright

    manager = sync_playwright().start()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM)
    try:
        yield browser
    finally:
        browser.close()
