"""``GET .../instances/{id}/logs``: an instance's steps, log and status as server-sent events.

::

    history   step* (every step)  log* (every line)  status
    live      step* (changed)     log* (new)         status (when it changed)   ...
    end       done (when the instance is finished; then the stream closes)

Between changes a ``: heartbeat`` comment goes out after each quiet interval, so
proxies keep the connection open and the client learns that the server is alive.
The follower re-reads when the engine signals a change of the instance or growth of
its log (``Engine.change_event`` / ``Engine.log_event``) and after each heartbeat, so a
missed signal delays an update by one heartbeat at most and never loses it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from ._engine import Engine
from ._http_io import json_bytes
from ._models import FINISHED_STATUSES
from ._views import jsonable, log_json, step_json

__all__ = ["SSE_HEADERS", "follow_instance", "sse_event"]

SSE_HEADERS: Final = (
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),  # nginx: do not buffer the stream
)
HEARTBEAT: Final = b": heartbeat\n\n"
_LOG_PAGE: Final = 1000

Emit = Callable[[bytes], Awaitable[None]]


def sse_event(event: str, data: Any) -> bytes:
    """One event; the JSON data is a single line (json.dumps escapes newlines)."""
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


async def follow_instance(
    engine: Engine, tenant_id: str, instance_id: str, emit: Emit, *, heartbeat: float
) -> None:
    """Emit the instance's history, then its changes, until it is finished.

    Raises ``InstanceNotFound`` (before emitting anything) for an id the tenant does
    not own; returns after the ``done`` event.
    """
    key = (await engine.get(tenant_id, instance_id)).record.key
    sent_steps: dict[int, dict[str, Any]] = {}
    last_log = 0
    last_status: str | None = None
    log_grew = False
    while True:
        # Take the events before reading, so a change during the read is not missed.
        changed = engine.change_event(key)
        logged = engine.log_event(key)
        if log_grew:
            # A log line is signalled when it is queued for writing: wait until the
            # writer has committed everything queued so far, then read it.
            await engine.writer.submit(_nothing)
        view = await engine.get(tenant_id, instance_id)
        out: list[bytes] = []
        for step in view.steps:
            data = step_json(step)
            if sent_steps.get(step.seq) != data:
                sent_steps[step.seq] = data
                out.append(sse_event("step", data))
        while True:
            lines = await engine.read_logs(tenant_id, instance_id, after_id=last_log)
            for line in lines:
                out.append(sse_event("log", log_json(line)))
                last_log = line.id
            if len(lines) < _LOG_PAGE:
                break
        record = view.record
        if record.status.value != last_status:
            last_status = record.status.value
            out.append(sse_event("status", {"id": instance_id, "status": last_status}))
        if record.status in FINISHED_STATUSES:
            done = {
                "id": instance_id,
                "status": record.status.value,
                "output": jsonable(record.output),
                "error": record.error.to_dict() if record.error else None,
            }
            out.append(sse_event("done", done))
            await emit(b"".join(out))
            return
        if out:
            await emit(b"".join(out))
        quiet = True
        with trio.move_on_after(heartbeat):
            await _wait_any(changed, logged)
            quiet = False
        if quiet:
            await emit(HEARTBEAT)
        log_grew = logged.is_set()


def _nothing(txn: object) -> None:
    """A write unit that writes nothing: its commit is a barrier for earlier units."""


async def _wait_any(*events: trio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
