"""``env.WORKFLOWS`` inside the sandbox: stubs whose every method is an RPC to the host.

Tenant code can read every public attribute of these objects, so they hold nothing
but an id and the methods; the channel hides behind an underscore name, which
RestrictedPython code cannot reach.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import sdk

__all__ = ["InstanceStub", "WorkflowsStub", "raise_binding_error"]

Call = Callable[[str, dict[str, Any]], Any]


def raise_binding_error(code: str | None, name: str, message: str) -> None:
    """Raise, in tenant code, the SDK error matching a binding call's error code."""
    if code == "instance.not_found":
        raise sdk.InstanceNotFoundError(message)
    if code == "rate_limited":
        raise sdk.RateLimitedError(message)
    error = ValueError(f"{code or name}: {message}")
    raise error


class InstanceStub:
    """A handle on one of the tenant's instances."""

    def __init__(self, call: Call, instance_id: str) -> None:
        self._call = call
        self.id = instance_id

    def status(self) -> str:
        status: str = self._call("status", {"id": self.id})
        return status

    def pause(self) -> str:
        status: str = self._call("pause", {"id": self.id})
        return status

    def resume(self) -> str:
        status: str = self._call("resume", {"id": self.id})
        return status

    def terminate(self) -> str:
        status: str = self._call("terminate", {"id": self.id})
        return status

    def restart(self) -> str:
        status: str = self._call("restart", {"id": self.id})
        return status

    def send_event(self, type: str, payload: Any = None) -> None:
        self._call("send_event", {"id": self.id, "type": type, "payload": payload})


class WorkflowsStub:
    """``env.WORKFLOWS``: create and reach this tenant's instances."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def create(self, id: str | None = None, params: Any = None) -> InstanceStub:
        value = self._call("create", {"id": id, "params": params})
        return InstanceStub(self._call, str(value["id"]))

    def create_batch(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("create_batch", {"items": items})
        return result

    def get(self, id: str) -> InstanceStub:
        self._call("get", {"id": id})
        return InstanceStub(self._call, id)
