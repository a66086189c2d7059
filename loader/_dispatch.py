"""The dispatch entrypoint: every wake-up of a dynamic instance goes back to its tenant.

``create_dynamic_workflow_entrypoint(load_runner)`` is a ``Runner`` for the engine.
On each activation it unwraps the envelope, asks the platform's ``load_runner`` for
the runner of that tenant's code (``load_runner`` is never called without the
envelope), and hands it the activation with the tenant's own params as the payload.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any

from runtime._runner import ActivationChannel, Runner, RunnerError, RunTarget
from sandbox.protocol import Activate, ErrorInfo

from ._envelope import MissingDispatcherMetadataError, unwrap_envelope

__all__ = ["LoadRunner", "create_dynamic_workflow_entrypoint", "dispatch_workflow"]

LoadRunner = Callable[[Mapping[str, Any]], Runner | Awaitable[Runner]]


async def dispatch_workflow(
    payload: Any, load_runner: LoadRunner
) -> tuple[Runner, dict[str, Any], Any]:
    """Unwrap ``payload`` and load its tenant's runner: ``(runner, metadata, params)``."""
    metadata, params = unwrap_envelope(payload)
    runner = load_runner(metadata)
    if inspect.isawaitable(runner):
        runner = await runner
    if not isinstance(runner, Runner):
        raise TypeError(f"load_runner returned {type(runner).__name__}, not a Runner")
    return runner, metadata, params


class DynamicWorkflowEntrypoint(Runner):
    """The engine's runner for dynamic instances: dispatches each to its tenant's code."""

    def __init__(
        self, load_runner: LoadRunner, *, warm: Callable[[], Collection[str]] | None = None
    ) -> None:
        self._load_runner = load_runner
        self._warm = warm

    def warm_tenants(self) -> Collection[str]:
        """What ``warm`` says (the sandbox pool behind ``load_runner``), else none."""
        return () if self._warm is None else self._warm()

    @asynccontextmanager
    async def open_activation(
        self, target: RunTarget, activation: Activate
    ) -> AsyncIterator[ActivationChannel]:
        try:
            runner, metadata, params = await dispatch_workflow(
                activation.payload, self._load_runner
            )
        except MissingDispatcherMetadataError as exc:
            error = ErrorInfo(type(exc).__name__, str(exc), False, code=exc.code)
            raise RunnerError(str(exc), error=error, permanent=True) from None
        if metadata.get("tenant_id") not in (None, target.tenant_id):
            # The envelope is only a hint; the instance's own row decides whose code runs.
            error = ErrorInfo("DispatchError", "envelope names another tenant", False)
            raise RunnerError(error.message, error=error, permanent=True)
        unwrapped = dataclasses.replace(activation, payload=params)
        async with runner.open_activation(target, unwrapped) as channel:
            yield channel


def create_dynamic_workflow_entrypoint(
    load_runner: LoadRunner, *, warm: Callable[[], Collection[str]] | None = None
) -> Runner:
    """The Python counterpart of ``createDynamicWorkflowEntrypoint``.

    ``warm`` (optional): which tenants have their code loaded now, for the dispatcher
    (``Runner.warm_tenants``)."""
    return DynamicWorkflowEntrypoint(load_runner, warm=warm)
