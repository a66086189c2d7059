"""The supervisor's HTTP API (SPEC 8): tenant ingress, the admin API, health and metrics.

``TenantflowApp`` is a plain ASGI 3 application; ``serve_http`` runs it on hypercorn's
trio worker. Routing, in order::

    /healthz                         open
    /metrics, /v1/...                admin: bearer token when one is configured (with
                                     --playground also its session cookie)
    /playground[/...]                with --playground: the browser playground
                                     (runtime/_http_playground.py)
    /t/{tenant}/{path}               tenant ingress (open): the tenant sees /{path}
    any other path + x-tenant-id     tenant ingress (open): the tenant sees the path
    anything else                    404 not_found

Every admin route is scoped to the tenant named in its path: another tenant's instance
is ``instance.not_found``, exactly like an id that does not exist (the engine looks
instances up by (tenant, id)). Reading and controlling instances works while a tenant's
newest code fails to load; creating needs loadable code (``tenant.load_failed``).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._http_io import (
    ClientDisconnected,
    HttpRequest,
    Receive,
    Responder,
    Scope,
    Send,
    error_body,
    tenant_headers,
)
from ._http_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._http_metrics import render_metrics
from ._http_playground import Playground, is_page_path
from ._http_sse import SSE_HEADERS, follow_instance, sse_event
from ._models import InstanceStatus
from ._runner import RunnerError
from ._supervisor import Supervisor, batch_json
from ._views import instance_json, summary_json
from .errors import (
    BadRequest,
    InvalidEventType,
    RateLimited,
    TenantflowError,
    TenantLoadFailed,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "TenantflowApp", "serve_http"]

log = logging.getLogger("tenantflow.http")

DEFAULT_MAX_BODY_BYTES: Final = 2 * 1024 * 1024
DEFAULT_HEARTBEAT_SECONDS: Final = 15.0
_DEFAULT_PAGE: Final = 50
_INGRESS: Final = re.compile(r"^/t/(?P<tenant>[^/]+)(?P<path>/.*)?$")
_TENANT: Final = r"/v1/tenants/(?P<tenant>[^/]+)"
_INSTANCE: Final = _TENANT + r"/instances/(?P<id>[^/]+)"


@dataclass(frozen=True, slots=True)
class _Call:
    """A request matched to a route, with the route's path parameters."""

    request: HttpRequest
    reply: Responder
    params: Mapping[str, str]


_Handler = Callable[[_Call], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: _Handler


class TenantflowApp:
    """The HTTP API of one supervisor, as an ASGI 3 application."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        admin_token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_SECONDS,
        playground: bool = False,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if admin_token is not None and not admin_token.strip():
            raise ValueError("admin_token is empty: pass None to leave the admin API open")
        self.supervisor = supervisor
        self.max_body_bytes = max_body_bytes
        self.heartbeat_interval = heartbeat_interval
        self._token = admin_token.encode() if admin_token is not None else None
        table: list[tuple[str, str, _Handler]] = [
            ("GET", "/healthz", self._healthz),
            ("GET", "/metrics", self._metrics),
            ("GET", "/v1/tenants", self._list_tenants),
            ("POST", _TENANT + "/instances", self._create),
            ("GET", _TENANT + "/instances", self._list_instances),
            ("POST", _TENANT + "/instances/batch", self._create_batch),
            ("GET", _INSTANCE, self._get_instance),
            ("POST", _INSTANCE + "/(?P<action>pause|resume|terminate|restart)", self._control),
            ("POST", _INSTANCE + "/events", self._send_event),
            ("GET", _INSTANCE + "/logs", self._logs),
        ]
        #: The browser playground, when served; its API routes exist only then.
        self.playground: Playground | None = None
        if playground:
            self.playground = pg = Playground(supervisor, admin_token=self._token)
            table += [
                ("GET", "/v1/playground", lambda call: pg.describe(call.request, call.reply)),
                ("POST", "/v1/playground/code", lambda call: pg.check(call.request, call.reply)),
                ("POST", "/v1/playground/runs", lambda call: pg.run(call.request, call.reply)),
            ]
        self._routes = [_Route(m, re.compile(f"^{p}$"), h) for m, p, h in table]

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        request = HttpRequest(scope, receive, self.max_body_bytes)
        reply = Responder(send)
        try:
            await self._dispatch(request, reply)
        except ClientDisconnected:
            return
        except Exception as exc:
            if not isinstance(exc, TenantflowError | RunnerError):
                log.exception("%s %s failed", request.method, request.path)
            if reply.started:
                return  # the status line has gone out: nothing more to say
            await reply.error(exc, close=request.abandoned)

    async def _dispatch(self, request: HttpRequest, reply: Responder) -> None:
        path = request.path
        admin = path == "/metrics" or path == "/v1" or path.startswith("/v1/")
        if self.playground is not None and is_page_path(path):
            authorized = self._authorized(request)
            await self.playground.page(request, reply, authorized=authorized)
            return
        if admin and not self._authorized(request):
            await reply.json(
                401,
                error_body("unauthorized", "a valid 'Authorization: Bearer <token>' is required"),
                [("www-authenticate", 'Bearer realm="tenantflow"')],
            )
            return
        ingress = _INGRESS.match(path)
        if ingress is not None:
            await self._ingress(request, reply, ingress["tenant"], ingress["path"] or "/")
            return
        allowed: list[str] = []
        for route in self._routes:
            match = route.pattern.match(path)
            if match is None:
                continue
            if route.method == request.method:
                await route.handler(_Call(request, reply, match.groupdict()))
                return
            allowed.append(route.method)
        if allowed:
            await reply.json(
                405,
                error_body("method_not_allowed", f"{request.method} is not allowed on {path}"),
                [("allow", ", ".join(sorted(set(allowed))))],
            )
            return
        tenant = request.headers.get("x-tenant-id")
        if tenant is not None and not admin and path != "/healthz":
            await self._ingress(request, reply, tenant.strip(), path)
            return
        await reply.json(404, error_body("not_found", f"no route for {request.method} {path}"))

    def _authorized(self, request: HttpRequest) -> bool:
        if self._token is None:
            return True
        if self._carries_token(request.headers.get("authorization")):
            return True
        return self.playground is not None and self.playground.session_ok(request)

    def _carries_token(self, header: str | None) -> bool:
        if self._token is None or header is None:
            return False
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Headers are decoded as latin-1, so this gives back the bytes that were sent.
        return hmac.compare_digest(given.strip().encode("latin-1"), self._token)

    # ------------------------------------------------------------------ tenant ingress

    async def _ingress(
        self, request: HttpRequest, reply: Responder, tenant_id: str, path: str
    ) -> None:
        self.supervisor.require_tenant(tenant_id)  # 404 / 422 before reading the body
        body = await request.body()
        headers = dict(request.headers)
        if self._carries_token(headers.get("authorization")):
            del headers["authorization"]  # never hand the admin token to tenant code
        result = await self.supervisor.fetch(
            tenant_id, request.method, path, request.query, headers, body
        )
        if result.error is not None:
            error = result.error
            if error.code == RateLimited.code:
                # SPEC 7: creating beyond the tenant's rate is a 429, also when the
                # tenant's fetch lets the error escape (the delay does not cross the RPC).
                raise RateLimited(error.message, retry_after=1.0)
            message = f"{error.name}: {error.message}"
            await reply.json(500, error_body(error.code or "tenant.error", message))
            return
        if not 200 <= result.status <= 599:
            raise RunnerError(f"tenant {tenant_id!r} answered with status {result.status}")
        if result.status in (204, 304):
            await reply.start(result.status, tenant_headers(result.headers))
            await reply.write(b"", more=False)
            return
        await reply.respond(
            result.status, result.body, content_type=None, headers=tenant_headers(result.headers)
        )

    # ------------------------------------------------------------------ system

    async def _healthz(self, call: _Call) -> None:
        # "supervisor": this supervisor's id, the owner of the leases it holds (SPEC 10).
        await call.reply.json(200, {"ok": True, "supervisor": self.supervisor.engine.owner})

    async def _metrics(self, call: _Call) -> None:
        text = await render_metrics(self.supervisor)
        await call.reply.respond(200, text.encode(), METRICS_CONTENT_TYPE)

    async def _list_tenants(self, call: _Call) -> None:
        await call.reply.json(200, await self.supervisor.tenants())

    # ------------------------------------------------------------------ instances

    def _tenant(self, call: _Call) -> str:
        """The path's tenant; TenantNotFound unless its folder exists (loadable or not)."""
        tenant_id = call.params["tenant"]
        try:
            self.supervisor.require_tenant(tenant_id)
        except TenantLoadFailed:
            pass  # its instances can still be read and controlled
        return tenant_id

    async def _create(self, call: _Call) -> None:
        body = _object(await call.request.json(empty={}), {"id", "params"})
        binding = self.supervisor.binding(call.params["tenant"])
        handle = await binding.create(id=body.get("id"), params=body.get("params"))
        await call.reply.json(201, {"id": handle.id, "status": InstanceStatus.QUEUED.value})

    async def _create_batch(self, call: _Call) -> None:
        items = await call.request.json()
        if not isinstance(items, list):
            raise BadRequest("the body is a JSON array of {id?, params?} objects")
        binding = self.supervisor.binding(call.params["tenant"])
        await call.reply.json(201, batch_json(await binding.create_batch(items)))

    async def _list_instances(self, call: _Call) -> None:
        tenant_id = self._tenant(call)
        query = call.request.query
        limit_text = query.get("limit") or str(_DEFAULT_PAGE)
        try:
            limit = int(limit_text)
        except ValueError:
            raise BadRequest(f"limit must be an integer, not {limit_text!r:.40}") from None
        page, cursor = await self.supervisor.engine.list_instances(
            tenant_id,
            status=query.get("status") or None,
            limit=limit,
            cursor=query.get("cursor") or None,
        )
        await call.reply.json(
            200, {"instances": [summary_json(s) for s in page], "next_cursor": cursor}
        )

    async def _get_instance(self, call: _Call) -> None:
        tenant_id = self._tenant(call)
        step_output = _flag(call.request.query.get("step_output"), "step_output", default=True)
        view = await self.supervisor.engine.get(tenant_id, call.params["id"])
        await call.reply.json(200, instance_json(view, step_output=step_output))

    async def _control(self, call: _Call) -> None:
        tenant_id = self._tenant(call)
        engine = self.supervisor.engine
        actions: dict[str, Callable[[str, str], Awaitable[InstanceStatus]]] = {
            "pause": engine.pause,
            "resume": engine.resume,
            "terminate": engine.terminate,
            "restart": engine.restart,
        }
        instance_id = call.params["id"]
        status = await actions[call.params["action"]](tenant_id, instance_id)
        await call.reply.json(200, {"id": instance_id, "status": status.value})

    async def _send_event(self, call: _Call) -> None:
        tenant_id = self._tenant(call)
        body = _object(await call.request.json(), {"type", "payload"})
        instance_id = call.params["id"]
        event_type = body.get("type")
        if not isinstance(event_type, str):
            raise InvalidEventType(f"the event type is a string, not {event_type!r:.40}")
        await self.supervisor.engine.send_event(
            tenant_id, instance_id, event_type, body.get("payload")
        )
        await call.reply.json(202, {"id": instance_id, "type": event_type})

    async def _logs(self, call: _Call) -> None:
        tenant_id = self._tenant(call)
        instance_id = call.params["id"]
        engine = self.supervisor.engine
        await engine.get(tenant_id, instance_id)  # instance.not_found before the stream
        reply = call.reply
        await reply.start(200, SSE_HEADERS)
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                await call.request.wait_disconnect()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            try:
                await follow_instance(
                    engine, tenant_id, instance_id, reply.write, heartbeat=self.heartbeat_interval
                )
            except TenantflowError as exc:
                await reply.write(sse_event("error", exc.to_dict()))
            except Exception:
                log.exception("log stream of %s/%s failed", tenant_id, instance_id)
                await reply.write(sse_event("error", error_body("internal", "stream failed")))
            nursery.cancel_scope.cancel()
        await reply.write(b"", more=False)


def _object(value: Any, keys: set[str]) -> dict[str, Any]:
    """``value`` as a JSON object whose keys are among ``keys`` (400 otherwise)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadRequest(f"the body is a JSON object with the keys {sorted(keys)}")
    unknown = set(value) - keys
    if unknown:
        raise BadRequest(f"unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
    return value


def _flag(text: str | None, name: str, *, default: bool) -> bool:
    if text is None or text == "":
        return default
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadRequest(f"{name} must be true or false, not {text!r:.40}")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------------- serving


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve_http(
    supervisor: Supervisor,
    *,
    host: str = "127.0.0.1",
    port: int = 8787,
    admin_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_SECONDS,
    playground: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP API with hypercorn until cancelled.

    ``task_status.started`` receives the port listened on (``port=0`` picks a free
    one). A non-loopback ``host`` needs an ``admin_token``: the admin API must not be
    open to the network. ``playground`` serves the browser playground at /playground.
    """
    if admin_token is None and not _is_loopback(host):
        raise ValueError(f"refusing to serve on non-loopback host {host!r} without an admin token")
    app = TenantflowApp(
        supervisor,
        admin_token=admin_token,
        max_body_bytes=max_body_bytes,
        heartbeat_interval=heartbeat_interval,
        playground=playground,
    )
    config = HypercornConfig()
    config.bind = [
        f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    ]
    config.accesslog = None
    config.errorlog = logging.getLogger("tenantflow.http.server")
    # hypercorn types the app with its own TypedDict messages; ours are plain dicts.
    framework: Any = app
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(hypercorn_serve, framework, config, mode="asgi")
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
