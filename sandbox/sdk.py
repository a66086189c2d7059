"""The tenant SDK: what tenant code imports as ``tenantflow``.

Inside a sandbox, ``import tenantflow`` yields a facade over exactly ``__all__`` of
this module. Everything here is plain data and small classes whose public methods are
the whole API, because every public attribute is readable by tenant code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "InstanceNotFoundError",
    "NonRetryableError",
    "RateLimitedError",
    "Response",
    "StepError",
    "WorkflowEntrypoint",
    "WorkflowTimeoutError",
    "log",
]


class NonRetryableError(Exception):
    """Raise inside a step to stop its retries; uncaught, the instance ends ``errored``."""

    def __init__(self, message: str = "", name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.name = name or "NonRetryableError"


class StepError(Exception):
    """A step's final error as seen by ``run()``: the original exception's name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.message = message


class WorkflowTimeoutError(StepError):
    """``step.wait_for_event`` timed out before an event of its type arrived."""

    def __init__(self, message: str = "timed out waiting for event") -> None:
        super().__init__("WorkflowTimeoutError", message)


class InstanceNotFoundError(Exception):
    """No instance with this id exists for the calling tenant (code ``instance.not_found``)."""

    code = "instance.not_found"


class RateLimitedError(Exception):
    """The tenant's instance creation rate is exhausted (code ``rate_limited``)."""

    code = "rate_limited"


class Response:
    """An HTTP response returned by a tenant's ``fetch``."""

    def __init__(
        self, body: Any = b"", status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = dict(headers or {})


class WorkflowEntrypoint:
    """Base class of a tenant's ``TenantWorkflow``; ``self.env`` is the tenant's env."""

    def __init__(self, env: Any = None) -> None:
        self.env = env

    def run(self, event: Any, step: Any) -> Any:  # pragma: no cover - tenants override it
        raise NotImplementedError("TenantWorkflow must define run(self, event, step)")


# The sink of the activation running on this thread; set by the executor around tenant code.
_current_sink = threading.local()


def set_log_sink(sink: Callable[[str, str], None] | None) -> None:
    """Route ``log.*`` calls made on this thread to ``sink(level, message)`` (executor use)."""
    _current_sink.sink = sink


def _emit(level: str, parts: tuple[object, ...]) -> None:
    sink = getattr(_current_sink, "sink", None)
    message = " ".join(str(p) for p in parts)
    if sink is not None:
        sink(level, message)


class _Log:
    """``log.info/warning/error(...)``: lines go to the instance's log."""

    def info(self, *parts: object) -> None:
        _emit("info", parts)

    def warning(self, *parts: object) -> None:
        _emit("warning", parts)

    def error(self, *parts: object) -> None:
        _emit("error", parts)


log = _Log()
