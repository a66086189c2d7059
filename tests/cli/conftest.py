"""Fixtures for the CLI tests: tenant folders, real ``tenantflow serve`` processes, the CLI.

Integration tests run ``python -m runtime.cli serve`` as a subprocess on a free port
and a SQLite file, wait for ``/healthz``, and drive it with ``python -m runtime.cli``
client subprocesses. Every process started here is stopped (SIGKILL if it must) when
the fixture ends, and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0

WAITER = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        user = step.do("load user", lambda: {"name": (event.payload or {}).get("name", "world")})
        approval = step.wait_for_event("approval", type="approval", timeout="5 minutes")
        print("approved by " + approval["payload"]["by"])
        return step.do("greet", lambda: "Hello, " + user["name"] + "!")
"""

SLEEPER = """\
from tenantflow import WorkflowEntrypoint


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("before", lambda: "awake")
        step.sleep("nap", "3 seconds")
        return step.do("after", lambda: "rested")
"""

SPINNER = """\
from tenantflow import WorkflowEntrypoint


def spin():
    total = 0
    for i in range(10000000):
        total += i
    return total


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        spun = step.do("spin", spin)
        return step.do("after", lambda: spun > 0)
"""

FAILER = """\
from tenantflow import WorkflowEntrypoint, NonRetryableError


def doom():
    raise NonRetryableError("no way")


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("doomed", doom)
"""


def write_tenants(root: Path, tenants: dict[str, dict[str, str]]) -> Path:
    """``{tenant: {file: text}}`` as folders under ``root``."""
    for tenant, files in tenants.items():
        folder = root / tenant
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Server:
    """A ``tenantflow serve`` subprocess; its stdout and stderr go to files."""

    proc: subprocess.Popen[bytes]
    url: str
    db: Path
    tenants: Path
    out_path: Path
    err_path: Path

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return bool(json.load(response).get("ok"))
        except (OSError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class ServerFactory:
    """Starts servers; `close` kills whatever is still running."""

    workdir: Path
    started: list[Server] = field(default_factory=list)

    def __call__(self, tenants: Path, db: Path, *extra: str) -> Server:
        port = free_port()
        index = len(self.started)
        out_path = self.workdir / f"server{index}.out"
        err_path = self.workdir / f"server{index}.err"
        args = cli_command(
            "serve", "--tenants", str(tenants), "--db", f"sqlite:///{db}", "--port", str(port)
        )
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [*args, *extra], stdout=out, stderr=err, env=child_env(), cwd=self.workdir
            )
        server = Server(proc, f"http://127.0.0.1:{port}", db, tenants, out_path, err_path)
        self.started.append(server)
        deadline = time.monotonic() + START_TIMEOUT
        while not server.healthy():
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{server.errors()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve not healthy in {START_TIMEOUT} s:\n{server.errors()[-3000:]}")
            time.sleep(0.05)
        return server

    def close(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of ``tenantflow serve`` processes, all killed at the end of the test."""
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One supervisor shared by a module's tests, with the waiter, sleeper and failer."""
    workdir = tmp_path_factory.mktemp("cli-server")
    tenants = write_tenants(
        workdir / "tenants",
        {
            "waiter": {"main.py": WAITER},
            "sleeper": {"main.py": SLEEPER},
            "failer": {"main.py": FAILER},
        },
    )
    factory = ServerFactory(workdir)
    try:
        yield factory(tenants, workdir / "tenantflow.db")
    finally:
        factory.close()


@dataclass
class Cli:
    """Runs ``python -m runtime.cli`` against a server, as a user's shell would."""

    url: str

    def __call__(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_command(*args),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            env=child_env(TENANTFLOW_URL=url or self.url),
            cwd=ROOT,
            check=False,
        )

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for(self, predicate: Callable[[Any], bool], *args: str, timeout: float = 30) -> Any:
        """Poll ``args --json`` until ``predicate`` holds for its answer."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.json(*args)
            if predicate(answer):
                return answer
            if time.monotonic() > deadline:
                pytest.fail(f"{args}: condition not met in {timeout} s; last answer {answer}")
            time.sleep(0.1)

    def spawn(self, *args: str, url: str | None = None) -> Follower:
        proc = subprocess.Popen(
            cli_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(TENANTFLOW_URL=url or self.url),
            cwd=ROOT,
        )
        return Follower(proc)


class Follower:
    """A CLI subprocess whose stdout lines are read as they come (bounded waits)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no such line in {timeout} s; got {self.lines}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the process ended before that line; got {self.lines}")
            self.lines.append(line)
            if predicate(line):
                return line

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the exit; its status and stderr (stdout lines are in ``lines``)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise
        self._thread.join(timeout=10)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        self.close()
        return code, stderr

    def close(self) -> None:
        """Kill it if it still runs; close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
        if self.proc.stdout is not None and not self._thread.is_alive():
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def cli(server: Server) -> Cli:
    """The CLI pointed at the module's shared server."""
    return Cli(server.url)


@pytest.fixture
def cli_for() -> Callable[[str], Cli]:
    """``cli_for(url)``: the CLI pointed at another server."""
    return Cli


@pytest.fixture
def stop_tenants(tmp_path: Path) -> Path:
    """The sleeper (``before``, a 3 s ``nap``, ``after``) and the spinner (a CPU-bound
    ``spin`` step of a second or two, then ``after``)."""
    tenants = {"sleeper": {"main.py": SLEEPER}, "spinner": {"main.py": SPINNER}}
    return write_tenants(tmp_path / "tenants", tenants)


@pytest.fixture
def refused_url() -> str:
    """A URL on which nothing listens (a port just freed)."""
    return f"http://127.0.0.1:{free_port()}"
