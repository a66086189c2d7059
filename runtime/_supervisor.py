"""The supervisor: the engine, the sandboxes and the tenant folder, wired together.

::

    HTTP / CLI ──▶ Supervisor ──▶ Engine ──▶ DynamicWorkflowEntrypoint ──▶ SandboxRunner
                     │  ▲                      (unwraps the envelope,      (one process per
                     │  └── env.WORKFLOWS ◀──── calls load_runner)          tenant+version)
                     └──▶ TenantRegistry (folder -> code versions in the database)

Every ``env.WORKFLOWS`` call from a sandbox is scoped to the tenant that sandbox runs
(known from the channel it came on, never from what the tenant says).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from loader import (
    DynamicWorkflowBinding,
    LoadRunner,
    TenantCode,
    TenantRegistry,
    create_dynamic_workflow_entrypoint,
    wrap_workflow_binding,
)
from sandbox._host import SandboxRunner, SandboxSettings, open_sandbox_runner
from sandbox.protocol import Fetch, FetchResult

from ._clock import Clock
from ._engine import Engine
from ._ratelimit import RateLimiter
from ._runner import Runner, RunnerError
from ._storage import Store, open_store
from .errors import BadRequest, TenantLoadFailed, TenantNotFound

__all__ = ["Supervisor", "SupervisorConfig", "open_supervisor"]

log = logging.getLogger("tenantflow.supervisor")
_FETCH_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """What ``tenantflow serve`` was asked for."""

    tenants_dir: Path | None = None
    db_url: str = "sqlite:///./tenantflow.db"
    max_concurrency: int = 1000
    max_sandboxes: int = 64
    idle_timeout: float = 60.0
    lease_seconds: float = 15.0  #: PostgreSQL: a running instance's lease (SPEC 10)
    max_write_lag: float = 5.0  #: back-pressure: write lag (s) beyond which writes get 503
    loader: str | None = None  #: "module:callable", the platform's load_runner
    scan_interval: float = 1.0
    #: Tenants whose code lives only in the database (the playground's): at start each
    #: is restored on the code version of its newest instance.
    stored_tenants: tuple[str, ...] = ()


def import_loader(spec: str) -> LoadRunner:
    """``module:callable`` -> the callable (a clear error if it is not one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--loader takes module:callable, not {spec!r}")
    target = getattr(importlib.import_module(module_name), attr, None)
    if not callable(target):
        raise ValueError(f"--loader {spec}: {attr!r} is not a callable in {module_name}")
    loader: LoadRunner = target
    return loader


class Supervisor:
    """The running system: use its methods from the HTTP API and tests."""

    def __init__(
        self,
        config: SupervisorConfig,
        store: Store,
        engine: Engine,
        sandboxes: SandboxRunner,
        registry: TenantRegistry,
    ) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.sandboxes = sandboxes
        self.registry = registry

        def rate(tenant_id: str) -> tuple[float, float]:
            limits = registry.limits(tenant_id)
            return float(limits.create_rate), float(limits.create_burst)

        self.rate_limiter = RateLimiter(engine.clock, rate)

    # -- tenants ---------------------------------------------------------------------

    def require_tenant(self, tenant_id: str) -> str:
        """The tenant's current code version, or TenantNotFound / TenantLoadFailed."""
        state = self.registry.tenants.get(tenant_id)
        if state is None or not state.present:
            raise TenantNotFound(f"tenant {tenant_id!r} not found")
        if state.version is None:
            raise TenantLoadFailed(f"tenant {tenant_id!r} failed to load: {state.load_error}")
        return state.version

    def binding(self, tenant_id: str) -> DynamicWorkflowBinding:
        """``env.WORKFLOWS`` of ``tenant_id`` (new instances take its current code)."""
        version = self.require_tenant(tenant_id)
        return wrap_workflow_binding(
            {"tenant_id": tenant_id, "code_version": version},
            engine=self.engine,
            current_version=lambda: self.require_tenant(tenant_id),
            admit=lambda count: self.rate_limiter.admit(tenant_id, count),
        )

    async def tenants(self) -> list[dict[str, Any]]:
        """``GET /v1/tenants``."""
        counts: dict[str, dict[str, int]] = {}
        for state in self.registry.tenants.values():
            if state.present:
                counts[state.tenant_id] = await self.engine.count_by_status(state.tenant_id)
        return [
            {
                "tenant": state.tenant_id,
                "code_version": state.version,
                "sandbox": "warm" if self.sandboxes.is_warm(state.tenant_id) else "cold",
                "instances": counts.get(state.tenant_id, {}),
                **({"source": "database"} if state.source == "database" else {}),
                **({"load_error": state.load_error} if state.load_error else {}),
            }
            for state in sorted(self.registry.tenants.values(), key=lambda s: s.tenant_id)
            if state.present
        ]

    async def put_source(self, tenant_id: str, files: dict[str, str]) -> tuple[str, str | None]:
        """Store code sent as files as a new code version of ``tenant_id`` (no folder).

        ``(version, None)`` when it loads (it is now the tenant's current version), or
        ``(version, error)`` naming file and line. ValueError for a folder tenant.
        """
        return await self.registry.put_source(tenant_id, files)

    async def restore_stored_tenant(self, tenant_id: str) -> str | None:
        """Bring back a database-only tenant after a restart; its version, or None.

        No table records which of a stored tenant's versions is current (adding one is
        a schema change for both backends). Its newest instance pins the version that
        was current when that instance was created, so that version is taken: a version
        that fails to load never gets an instance, and one made current by a check but
        never run is the only thing a restart forgets. No instance: nothing to restore.
        """
        state = self.registry.tenants.get(tenant_id)
        if state is not None and state.present:
            return state.version  # a folder of that name, or already restored
        page, _ = await self.engine.list_instances(tenant_id, limit=1)
        if not page:
            return None
        record = (await self.engine.get(tenant_id, page[0].instance_id)).record
        try:
            files = await self.code_files(tenant_id, record.code_version)
        except RunnerError as exc:
            log.warning("cannot restore tenant %s: %s", tenant_id, exc)
            return None
        version, error = await self.put_source(tenant_id, dict(files))
        if error is not None:
            log.warning("tenant %s: restored code version %s fails: %s", tenant_id, version, error)
        return version

    # -- tenant ingress --------------------------------------------------------------

    async def fetch(
        self,
        tenant_id: str,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> FetchResult:
        """Run the tenant's ``fetch(request, env)`` in its sandbox."""
        version = self.require_tenant(tenant_id)
        sandbox = await self.sandboxes.get_sandbox(tenant_id, version)
        request = Fetch(0, method, path, dict(query), dict(headers), body)
        with trio.move_on_after(_FETCH_TIMEOUT_SECONDS) as scope:
            return await sandbox.fetch(request)
        assert scope.cancelled_caught
        sandbox.kill("fetch timed out")
        raise RunnerError(f"fetch did not answer within {_FETCH_TIMEOUT_SECONDS:.0f} s")

    async def handle_binding_call(
        self, tenant_id: str, code_version: str, method: str, args: dict[str, Any]
    ) -> Any:
        """Serve one ``env.WORKFLOWS`` call made by tenant code in a sandbox."""
        binding = self.binding(tenant_id)
        if method == "create":
            handle = await binding.create(id=args.get("id"), params=args.get("params"))
            return {"id": handle.id, "status": "queued"}
        if method == "create_batch":
            result = await binding.create_batch(args.get("items"))
            return batch_json(result)
        instance_id = args.get("id")
        if not isinstance(instance_id, str):
            raise BadRequest("an instance id is required")
        handle = await binding.get(instance_id)
        if method == "get":
            return {"id": handle.id}
        if method == "status":
            return (await handle.status()).value
        if method in ("pause", "resume", "terminate", "restart"):
            return (await getattr(handle, method)()).value
        if method == "send_event":
            await handle.send_event(type=args.get("type", ""), payload=args.get("payload"))
            return None
        raise BadRequest(f"env.WORKFLOWS has no method {method!r}")

    # -- code versions ---------------------------------------------------------------

    async def code_files(self, tenant_id: str, version: str) -> Mapping[str, str]:
        """A stored code version's files (from the database, not the folder)."""
        blob = await self.engine.get_code_version(tenant_id, version)
        if blob is None:
            raise RunnerError(f"code version {version[:12]} of {tenant_id!r} is not stored")
        files: dict[str, str] = msgpack.unpackb(blob, raw=False)
        return files

    async def probe(self, code: TenantCode) -> str | None:
        """Load a new code version in a sandbox; its compile error, or None."""
        try:
            await self.sandboxes.get_sandbox(code.tenant_id, code.version)
        except RunnerError as exc:
            if exc.permanent:
                return str(exc)
            log.warning("could not check %s's code: %s", code.tenant_id, exc)
        return None


def batch_json(result: Any) -> dict[str, Any]:
    """A ``BatchResult`` as SPEC 8's batch response."""
    return {
        "created": [{"index": i, "id": iid, "status": st.value} for i, iid, st in result.created],
        "skipped": [{"index": i, "id": iid} for i, iid in result.skipped],
        "errors": [
            {"index": i, "id": iid, "code": err.code, "message": err.message}
            for i, iid, err in result.errors
        ],
    }


@asynccontextmanager
async def open_supervisor(
    config: SupervisorConfig, *, clock: Clock | None = None
) -> AsyncIterator[Supervisor]:
    """Start everything; on exit stop the engine, every sandbox and the zygote."""
    store = open_store(config.db_url)
    box: list[Supervisor] = []

    async def code_source(tenant_id: str, version: str) -> Mapping[str, str]:
        return await box[0].code_files(tenant_id, version)

    def settings(tenant_id: str) -> SandboxSettings:
        limits = box[0].registry.limits(tenant_id)
        return SandboxSettings(limits.memory_mb, limits.cpu_seconds, limits.open_files)

    try:
        async with open_sandbox_runner(
            code_source,
            idle_timeout=config.idle_timeout,
            max_sandboxes=config.max_sandboxes,
            settings=settings,
        ) as sandboxes:
            custom = import_loader(config.loader) if config.loader else None

            async def load_runner(metadata: Mapping[str, Any]) -> Runner:
                if custom is None:
                    return sandboxes
                if "default" in inspect.signature(custom).parameters:
                    runner = custom(metadata, default=sandboxes)  # type: ignore[call-arg]
                else:
                    runner = custom(metadata)
                if inspect.isawaitable(runner):
                    runner = await runner
                return runner

            engine = Engine(
                store,
                create_dynamic_workflow_entrypoint(load_runner, warm=sandboxes.warm_tenants),
                clock=clock,
                max_concurrency=config.max_concurrency,
                lease_seconds=config.lease_seconds,
                max_write_lag=config.max_write_lag,
                current_version=lambda tenant_id: box[0].registry.current_version(tenant_id),
                tenant_concurrency=lambda t: box[0].registry.limits(t).max_concurrency,
            )

            async def persist(tenant_id: str, version: str, files: bytes) -> None:
                await engine.put_code_version(tenant_id, version, files)

            async def probe(code: TenantCode) -> str | None:
                return await box[0].probe(code)

            registry = TenantRegistry(config.tenants_dir, persist, probe)
            supervisor = Supervisor(config, store, engine, sandboxes, registry)
            box.append(supervisor)
            sandboxes.binding_handler = supervisor.handle_binding_call
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                await registry.refresh()
                for tenant_id in config.stored_tenants:
                    await supervisor.restore_stored_tenant(tenant_id)
                nursery.start_soon(registry.watch, config.scan_interval)
                try:
                    yield supervisor
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        store.close()
