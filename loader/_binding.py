"""The wrapped ``WORKFLOWS`` binding: what a tenant's code calls to create and drive instances.

Unlike ``@cloudflare/dynamic-workflows`` it forwards every event field, supports
``create_batch``, and scopes every call to the calling tenant: another tenant's
instance behaves exactly like an id that does not exist (``instance.not_found``).
The tenant is the binding's own (set by the supervisor from the calling sandbox's
channel), never something the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from runtime._engine import Engine
from runtime._models import InstanceStatus
from runtime.errors import BadRequest, InstanceAlreadyExists, TenantflowError

from ._envelope import wrap_params

__all__ = [
    "MAX_BATCH",
    "BatchResult",
    "DynamicWorkflowBinding",
    "InstanceHandle",
    "wrap_workflow_binding",
]

MAX_BATCH: Final = 100


class InstanceHandle:
    """One instance of the binding's tenant."""

    def __init__(self, binding: DynamicWorkflowBinding, instance_id: str) -> None:
        self._binding = binding
        self.id = instance_id

    async def status(self) -> InstanceStatus:
        return await self._binding.engine.status(self._binding.tenant_id, self.id)

    async def pause(self) -> InstanceStatus:
        return await self._binding.engine.pause(self._binding.tenant_id, self.id)

    async def resume(self) -> InstanceStatus:
        return await self._binding.engine.resume(self._binding.tenant_id, self.id)

    async def terminate(self) -> InstanceStatus:
        return await self._binding.engine.terminate(self._binding.tenant_id, self.id)

    async def restart(self) -> InstanceStatus:
        return await self._binding.engine.restart(self._binding.tenant_id, self.id)

    async def send_event(self, *, type: str, payload: Any = None) -> None:
        await self._binding.engine.send_event(self._binding.tenant_id, self.id, type, payload)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What ``create_batch`` did with each item."""

    created: list[tuple[int, str, InstanceStatus]]  #: (index, id, status)
    skipped: list[tuple[int, str]]  #: ids that already existed
    errors: list[tuple[int, str | None, TenantflowError]]


class DynamicWorkflowBinding:
    """``env.WORKFLOWS`` of one tenant, backed by the engine."""

    def __init__(
        self,
        engine: Engine,
        metadata: Mapping[str, Any],
        *,
        current_version: Callable[[], str] | None = None,
        admit: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.metadata = dict(metadata)
        self.tenant_id: str = str(metadata["tenant_id"])
        self._current_version = current_version
        self._admit = admit

    def _metadata(self) -> dict[str, Any]:
        version = self._current_version() if self._current_version else None
        metadata = dict(self.metadata)
        if version:
            metadata["code_version"] = version
        return metadata

    async def create(self, *, id: str | None = None, params: Any = None) -> InstanceHandle:
        """Create an instance running the tenant's current code with ``params``."""
        if self._admit is not None:
            self._admit(1)
        metadata = self._metadata()
        instance_id, _ = await self.engine.create(
            self.tenant_id,
            instance_id=id,
            params=wrap_params(metadata, params),
            code_version=str(metadata.get("code_version", "")),
        )
        return InstanceHandle(self, instance_id)

    async def create_batch(self, items: object) -> BatchResult:
        """Create up to 100 instances in one commit; existing ids are skipped."""
        if not isinstance(items, list | tuple):
            raise BadRequest("create_batch takes a list of {id?, params?} objects")
        if len(items) > MAX_BATCH:
            raise BadRequest(f"a batch holds at most {MAX_BATCH} instances, not {len(items)}")
        if self._admit is not None:
            self._admit(len(items))
        metadata = self._metadata()
        version = str(metadata.get("code_version", ""))
        pairs: list[tuple[str | None, Any]] = []
        bad: dict[int, TenantflowError] = {}
        for index, item in enumerate(items):
            if not isinstance(item, Mapping) or set(item) - {"id", "params"}:
                bad[index] = BadRequest("each item is an object with optional id and params")
                pairs.append((None, None))
                continue
            pairs.append((item.get("id"), wrap_params(metadata, item.get("params"))))
        outcomes = await self.engine.create_many(self.tenant_id, pairs, code_version=version)
        result = BatchResult([], [], [])
        for index, outcome in enumerate(outcomes):
            item_id = pairs[index][0]
            if index in bad:
                result.errors.append((index, item_id, bad[index]))
            elif isinstance(outcome, InstanceAlreadyExists):
                result.skipped.append((index, str(item_id)))
            elif isinstance(outcome, TenantflowError):
                result.errors.append((index, item_id, outcome))
            elif isinstance(outcome, Exception):
                result.errors.append((index, item_id, BadRequest(str(outcome))))
            else:
                result.created.append((index, outcome[0], outcome[1]))
        return result

    async def get(self, id: str) -> InstanceHandle:
        """The handle of one of this tenant's instances (``instance.not_found`` otherwise)."""
        await self.engine.status(self.tenant_id, id)
        return InstanceHandle(self, id)


def wrap_workflow_binding(
    metadata: Mapping[str, Any],
    *,
    engine: Engine,
    current_version: Callable[[], str] | None = None,
    admit: Callable[[int], None] | None = None,
) -> DynamicWorkflowBinding:
    """The binding a tenant's code sees, creating instances inside the envelope.

    ``admit(n)`` is called before ``n`` creations and may refuse them (rate limits).
    """
    return DynamicWorkflowBinding(engine, metadata, current_version=current_version, admit=admit)
