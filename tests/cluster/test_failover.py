"""Failover with real processes: three ``tenantflow serve`` on one PostgreSQL (SPEC 10).

One supervisor is SIGKILLed mid-run, another SIGSTOPped past its lease and then
SIGCONTed; every instance completes once, no recorded step output ever changes (a
step recorded twice would change it: outputs are random), and the survivors pick up
the dead one's instances. Skipped unless TENANTFLOW_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

URL = os.environ.get("TENANTFLOW_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(URL is None, reason="set TENANTFLOW_TEST_POSTGRES_URL to run"),
]
ROOT = Path(__file__).resolve().parents[2]
LEASE = 2.0

WORKER = """\
from tenantflow import WorkflowEntrypoint
import uuid


def busy():
    total = 0
    for i in range(1500000):
        total += i
    return uuid.uuid4().hex


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", busy)
        b = step.do("b", busy)
        step.sleep("nap", "1 second")
        c = step.do("c", busy)
        return [a, b, c]
"""

WAITER = """\
from tenantflow import WorkflowEntrypoint
import uuid


def busy():
    total = 0
    for i in range(1500000):
        total += i
    return uuid.uuid4().hex


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", busy)
        got = step.wait_for_event("go", type="go", timeout="1 minute")
        b = step.do("b", busy)
        return [a, got["payload"], b]
"""

FLAKY = """\
from tenantflow import WorkflowEntrypoint
import uuid


def flaky(ctx):
    if ctx.attempt < 2:
        raise ValueError("not yet")
    return uuid.uuid4().hex


class TenantWorkflow(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", flaky, retries={"limit": 3, "delay": "1 second"})
        b = step.do("b", lambda: uuid.uuid4().hex)
        return [a, b]
"""

TENANTS = {"worker": WORKER, "waiter": WAITER, "flaky": FLAKY}


@dataclass
class Sup:
    proc: subprocess.Popen[bytes]
    url: str
    err: Path
    owner: str = ""

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sql(schema: str, query: str, args: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    assert URL is not None
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute(f'SET search_path TO "{schema}"')
        cur = pg.execute(query, args)
        return cur.fetchall() if cur.description is not None else []


@pytest.fixture
def schema() -> Iterator[str]:
    import psycopg
    from psycopg import sql as psql

    name = f"tf_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    yield name
    assert URL is not None
    with psycopg.connect(URL, autocommit=True) as pg:
        pg.execute("SET lock_timeout = '10s'")
        pg.execute(psql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psql.Identifier(name)))


@pytest.fixture
def cluster(tmp_path: Path, schema: str) -> Iterator[Any]:
    started: list[Sup] = []
    assert URL is not None
    db = f"{URL}{'&' if '?' in URL else '?'}options=-csearch_path%3D{schema}"

    def start(tenants: dict[str, str]) -> Sup:
        folder = tmp_path / f"tenants{len(started)}"
        folder.mkdir()
        for name, code in tenants.items():
            (folder / name).mkdir()
            (folder / name / "main.py").write_text(code)
        port = free_port()
        err = tmp_path / f"sup{len(started)}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "serve", "--tenants", str(folder),
                 "--db", db, "--port", str(port), "--lease-seconds", str(LEASE)],
                stdout=subprocess.DEVNULL, stderr=err_file, env=env, cwd=tmp_path,
            )  # fmt: skip
        sup = Sup(proc, f"http://127.0.0.1:{port}", err)
        started.append(sup)
        deadline = time.monotonic() + 30
        while True:
            try:
                health = sup.call("GET", "/healthz")
                sup.owner = health["supervisor"]
                return sup
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not start:\n{err.read_text()[-3000:]}")
                time.sleep(0.05)

    try:
        yield start
    finally:
        for sup in started:
            if sup.proc.poll() is None:
                sup.proc.send_signal(signal.SIGCONT)
                sup.proc.kill()
            sup.proc.wait(timeout=10)


class OutputWatch:
    """Samples every recorded step output; remembers any that ever changed."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.first: dict[tuple[int, int], bytes] = {}
        self.changed: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        rows = sql(
            self.schema,
            "SELECT key, seq, output FROM steps WHERE kind = 'do' AND status = 'complete'",
        )
        for key, seq, output in rows:
            seen = self.first.setdefault((key, seq), bytes(output))
            if seen != bytes(output):
                self.changed.append((key, seq))

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                self.sample()
            except psycopg.OperationalError:
                pass  # the server is restarting (test_postgres_restarted_mid_run)
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def wait_all_finished(sup: Sup, ids: dict[str, list[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for tenant, iids in ids.items():
        for iid in iids:
            while True:
                view = sup.call("GET", f"/v1/tenants/{tenant}/instances/{iid}")
                if view["status"] in ("complete", "errored", "terminated"):
                    assert view["status"] == "complete", view
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"{tenant}/{iid} still {view['status']}: {view}")
                time.sleep(0.1)


def assert_outputs_are_their_steps(sup: Sup, ids: dict[str, list[str]]) -> None:
    """Each instance returned exactly the outputs its journal recorded (TENANTS' shapes)."""
    for tenant, iids in ids.items():
        for iid in iids:
            view = sup.call("GET", f"/v1/tenants/{tenant}/instances/{iid}")
            dos = {s["name"]: s["output"] for s in view["steps"] if s.get("type", "do") == "do"}
            if tenant == "waiter":
                assert view["output"] == [dos["a"], iid, dos["b"]]
            elif tenant == "worker":
                assert view["output"] == [dos["a"], dos["b"], dos["c"]]
            else:
                assert view["output"] == [dos["a"], dos["b"]]


def test_three_supervisors_one_killed_one_stopped(cluster: Any, schema: str) -> None:
    sups = [cluster(TENANTS) for _ in range(3)]
    watch = OutputWatch(schema)
    ids: dict[str, list[str]] = {t: [] for t in TENANTS}
    for n in range(36):
        tenant = list(TENANTS)[n % 3]
        made = sups[n % 3].call("POST", f"/v1/tenants/{tenant}/instances", {"params": n})
        ids[tenant].append(made["id"])
    # Let them get going, then take two supervisors out while they hold leases.
    deadline = time.monotonic() + 15
    while True:
        held = dict(sql(schema, "SELECT owner, count(*) FROM instances"
                                " WHERE status = 'running' GROUP BY owner"))  # fmt: skip
        if held.get(sups[0].owner, 0) > 0 and held.get(sups[1].owner, 0) > 0:
            break
        assert time.monotonic() < deadline, held
        time.sleep(0.02)
    sups[1].proc.send_signal(signal.SIGSTOP)
    sups[0].proc.kill()
    killed_at = time.monotonic()
    stopped_held = sql(
        schema,
        "SELECT key FROM instances WHERE owner = %s AND status = 'running'",
        (sups[1].owner,),
    )
    dead_held = sql(
        schema,
        "SELECT key FROM instances WHERE owner = %s AND status = 'running'",
        (sups[0].owner,),
    )
    # Survivors take the dead one's instances within the lease plus a renewal period
    # (plus the time to claim them).
    dead_keys = [k for (k,) in dead_held]
    while True:
        rows = sql(schema, "SELECT key, owner FROM instances WHERE key = ANY(%s)", (dead_keys,))
        if all(owner not in (sups[0].owner,) for _, owner in rows):
            break
        assert time.monotonic() - killed_at < LEASE + LEASE / 3 + 3, rows
        time.sleep(0.05)
    time.sleep(max(0.0, killed_at + 2 * LEASE + 1 - time.monotonic()))
    for iid in ids["waiter"]:
        sups[2].call("POST", f"/v1/tenants/waiter/instances/{iid}/events",
                     {"type": "go", "payload": iid})  # fmt: skip
    sups[1].proc.send_signal(signal.SIGCONT)  # it finds out it lost its leases
    wait_all_finished(sups[2], ids, timeout=40)
    time.sleep(LEASE)  # the stopped one had its chance to write late; it must not have
    watch.stop()
    assert watch.changed == []
    assert dead_held and stopped_held
    # Every instance's output is what its steps recorded (no step ran twice in effect).
    assert_outputs_are_their_steps(sups[2], ids)
    assert sups[1].proc.poll() is None and sups[2].proc.poll() is None
    # The stopped supervisor's instances were all finished by someone: it resumed, saw
    # its leases gone, and wrote nothing (outputs never changed, above).
    keys = [k for (k,) in stopped_held]
    rows = sql(schema, "SELECT status FROM instances WHERE key = ANY(%s)", (keys,))
    assert {status for (status,) in rows} == {"complete"}


def test_an_instance_resumes_on_a_supervisor_with_an_empty_tenant_folder(
    cluster: Any, schema: str
) -> None:
    first = cluster({"worker": WORKER})
    second = cluster({})
    first.call("POST", "/v1/tenants/worker/instances", {"params": 1})
    deadline = time.monotonic() + 15
    while sql(schema, "SELECT status FROM instances") != [("waiting",)]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.proc.kill()  # its timer is the second one's to fire, its code in the database
    # (The second one's HTTP API does not know the tenant: its folder is empty. Its
    # engine runs the instance all the same, on the code version stored in the database.)
    deadline = time.monotonic() + 20
    while (rows := sql(schema, "SELECT status, owner FROM instances"))[0][0] != "complete":
        assert rows[0][0] not in ("errored", "terminated"), rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
    assert rows == [("complete", second.owner)]
    steps = sql(schema, "SELECT name, status FROM steps ORDER BY seq")
    assert steps == [("a", "complete"), ("b", "complete"), ("nap", "complete"), ("c", "complete")]
    assert second.proc.poll() is None


def _pg_restart_command() -> list[str] | None:
    """How to restart the local PostgreSQL server, if this test may (root, Debian)."""
    import shutil
    from urllib.parse import urlparse

    assert URL is not None
    host = urlparse(URL).hostname or "localhost"
    versions = (
        sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    )
    if host not in ("127.0.0.1", "localhost", "::1") or not versions or os.geteuid() != 0:
        return None
    if shutil.which("pg_ctlcluster") is None:
        return None
    version = versions[-1].parent.name
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"]


def test_postgres_restarted_mid_run(cluster: Any, schema: str) -> None:
    """The server restarts under two supervisors: they reconnect and carry on; every
    instance completes once and no recorded step output changes."""
    restart = _pg_restart_command()
    if restart is None:
        pytest.skip("needs root and a local Debian PostgreSQL cluster (pg_ctlcluster)")
    sups = [cluster(TENANTS) for _ in range(2)]
    watch = OutputWatch(schema)
    ids: dict[str, list[str]] = {t: [] for t in TENANTS}
    for n in range(24):
        tenant = list(TENANTS)[n % 3]
        made = sups[n % 2].call("POST", f"/v1/tenants/{tenant}/instances", {"params": n})
        ids[tenant].append(made["id"])
    deadline = time.monotonic() + 15
    while not sql(schema, "SELECT 1 FROM instances WHERE status = 'running'"):
        assert time.monotonic() < deadline, "nothing started"
        time.sleep(0.02)
    subprocess.run(restart, check=True, capture_output=True, timeout=60)
    restarted_at = time.monotonic()
    # Both answer again once they have reconnected (reads retry on a new connection).
    for sup in sups:
        while True:
            try:
                sup.call("GET", f"/v1/tenants/worker/instances/{ids['worker'][0]}")
                break
            except OSError as exc:  # urllib's HTTPError (503 while reconnecting) too
                if time.monotonic() - restarted_at > 60:
                    pytest.fail(f"{sup.url} did not come back: {exc}")
                time.sleep(0.2)
    for iid in ids["waiter"]:
        while True:
            try:
                sups[1].call("POST", f"/v1/tenants/waiter/instances/{iid}/events",
                             {"type": "go", "payload": iid})  # fmt: skip
                break
            except OSError as exc:
                if time.monotonic() - restarted_at > 60:
                    pytest.fail(f"events not accepted after the restart: {exc}")
                time.sleep(0.2)
    wait_all_finished(sups[0], ids, timeout=90)
    watch.stop()
    assert watch.changed == []
    assert_outputs_are_their_steps(sups[1], ids)
    # one record per step: a step recorded twice would be a second row or a changed one
    dupes = sql(schema, "SELECT key, name, count, count(*) FROM steps"
                        " GROUP BY key, name, count HAVING count(*) > 1")  # fmt: skip
    assert dupes == []
    assert all(sup.proc.poll() is None for sup in sups)
    for sup in sups:  # the restart really cut them off (their listeners, at least)
        assert "lost its connection" in sup.err.read_text()
