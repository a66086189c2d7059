"""Fixtures for tests across the process boundary: real zygote, real sandboxes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from runtime import Engine, MockClock, Store, open_store
from runtime.testing import autojump
from sandbox._host import SandboxRunner, SandboxSettings, open_sandbox_runner


@dataclass
class SandboxEnv:
    """An engine running tenant source code in real sandbox processes."""

    engine: Engine
    runner: SandboxRunner
    clock: MockClock
    store: Store
    code: dict[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    settings: dict[str, SandboxSettings] = field(default_factory=dict)

    def deploy(self, tenant_id: str, main_py: str, version: str = "v1", **files: str) -> str:
        """Make ``main_py`` (and sibling modules) the code of ``tenant_id`` at ``version``."""
        self.code[(tenant_id, version)] = {"main.py": main_py, **files}
        return version

    async def run_to_end(self, tenant_id: str, params: object = None, version: str = "v1") -> str:
        iid, _ = await self.engine.create(tenant_id, params=params, code_version=version)
        with trio.fail_after(30):
            await self.engine.wait_for_status(tenant_id, iid, ["complete", "errored", "terminated"])
        return iid


@asynccontextmanager
async def _open(tmp_path: Path, *, jump: bool, idle_timeout: float) -> AsyncIterator[SandboxEnv]:
    store = open_store(str(tmp_path / "engine.db"))
    code: dict[tuple[str, str], Mapping[str, str]] = {}
    settings: dict[str, SandboxSettings] = {}

    async def code_source(tenant_id: str, version: str) -> Mapping[str, str]:
        return code[(tenant_id, version)]

    try:
        async with open_sandbox_runner(
            code_source,
            idle_timeout=idle_timeout,
            settings=lambda tenant_id: settings.get(tenant_id, SandboxSettings()),
        ) as runner:
            clock = MockClock()
            engine = Engine(store, runner, clock=clock)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                if jump:
                    nursery.start_soon(autojump, engine, clock)
                yield SandboxEnv(engine, runner, clock, store, code, settings)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
async def sandbox_env(tmp_path: Path) -> AsyncIterator[SandboxEnv]:
    """Real sandboxes, mock time that skips ahead whenever the engine only waits."""
    async with _open(tmp_path, jump=True, idle_timeout=60) as env:
        yield env


@pytest.fixture
async def manual_sandbox_env(tmp_path: Path) -> AsyncIterator[SandboxEnv]:
    """Real sandboxes, mock time that moves only when the test moves it; fast eviction."""
    async with _open(tmp_path, jump=False, idle_timeout=0.2) as env:
        yield env
