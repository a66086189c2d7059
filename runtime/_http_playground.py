"""The browser playground (``serve --playground``): a page, its assets and three routes.

::

    GET  /playground                 the page (admin: bearer, session cookie, or ?token=)
    POST /playground/login           form field ``token`` -> session cookie, 303 to the page
    GET  /playground/{app.js,app.css}  static assets (open: they hold nothing secret)
    GET  /v1/playground              the playground tenant, its current source, the example
    POST /v1/playground/code         {"source"} -> store + check a code version (200)
    POST /v1/playground/runs         {"source", "params"?, "id"?} -> store, check, create (201)

Everything else the page does goes through the ordinary admin API (instances, events,
pause/resume/terminate/restart, the ``/logs`` event stream), so the page can show any
tenant's instance, not only the playground's.

A browser cannot put a bearer header on a page load or on an ``EventSource``, so when
an admin token is configured the page trades it, once, for a session cookie: either
``/playground?token=...`` (then a 303 to the bare URL, so the token leaves the address
bar) or the login form that a 401 page shows. The cookie holds an HMAC of the token,
not the token, is ``HttpOnly`` (page scripts cannot read it) and ``SameSite=Strict``
(no other site's page can make the browser send it). As a second guard against
cross-site requests, a state-changing request authenticated by the cookie alone must
also carry ``x-tenantflow-playground: 1``, a header no cross-site form can set.
Changing the token invalidates every cookie; the value is the same for every browser.

The playground tenant's code lives only in the database (``TenantRegistry.put_source``):
each Run stores its source as a code version; new instances pin it, older ones keep
theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import importlib.resources
import re
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final
from urllib.parse import parse_qsl

import trio

from ._http_io import HttpRequest, Responder, error_body
from ._models import InstanceStatus
from ._supervisor import Supervisor
from .errors import BadRequest

__all__ = [
    "CSRF_HEADER",
    "PLAYGROUND_TENANT",
    "SESSION_COOKIE",
    "Playground",
    "is_page_path",
    "session_value",
]

PLAYGROUND_TENANT: Final = "playground"
SESSION_COOKIE: Final = "tenantflow_session"
CSRF_HEADER: Final = "x-tenantflow-playground"
PAGE_PATH: Final = "/playground"
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
_ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
#: What the page may load and talk to: only this origin; no inline script or style.
_PAGE_HEADERS: Final = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),  # the first URL may carry ?token=
    ("cache-control", "no-store"),
)
#: Where the sandbox's loader says an error is: "main.py:3: SyntaxError: ..." for a
#: compile error, "main.py raised NameError: ... (at main.py:7)" for one raised at import.
_COMPILE_ERROR: Final = re.compile(r"^(?P<file>[A-Za-z0-9_.]+):(?P<line>\d+): ", re.ASCII)
_LOAD_ERROR: Final = re.compile(r" \(at (?P<file>[A-Za-z0-9_.]+):(?P<line>\d+)\)$", re.ASCII)
EXAMPLE_PARAMS: Final = {"item": "book", "amount": 12}
EXAMPLE_EVENT: Final = {"type": "approval", "payload": {"by": "alice"}}


def is_page_path(path: str) -> bool:
    """Whether ``path`` is the page, its login route or one of its assets."""
    return path == PAGE_PATH or path.startswith(PAGE_PATH + "/")


def session_value(token: bytes) -> str:
    """The session cookie's value for ``token``: an HMAC, so the cookie is not the token."""
    return hmac.new(token, b"tenantflow playground session v1", hashlib.sha256).hexdigest()


def located_error(message: str) -> dict[str, Any]:
    """A load error as JSON: the message, and its file and line when it names them."""
    match = _COMPILE_ERROR.match(message) or _LOAD_ERROR.search(message)
    return {
        "code": "tenant.load_failed",
        "message": message,
        "file": match["file"] if match else None,
        "line": int(match["line"]) if match else None,
    }


def _asset(name: str) -> bytes:
    return importlib.resources.files("runtime").joinpath("playground", name).read_bytes()


@dataclass(frozen=True, slots=True)
class _RunRequest:
    source: str
    params: Any
    instance_id: str | None


class Playground:
    """The playground's page and routes for one HTTP app (``admin_token`` as bytes)."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        admin_token: bytes | None,
        tenant_id: str = PLAYGROUND_TENANT,
    ) -> None:
        self.supervisor = supervisor
        self.tenant_id = tenant_id
        self._token = admin_token
        self._session = session_value(admin_token) if admin_token is not None else None
        # Read once at start: a missing asset (a broken install) fails at once, not
        # when a browser first asks.
        self._index = _asset("index.html")
        self._login = _asset("login.html").decode()
        self._assets = {name: _asset(name) for name in _ASSETS}
        self.example = _asset("example.txt").decode()
        # A Run stores a version and creates an instance on "the current version": the
        # lock keeps another Run from changing the current version in between.
        self._lock = trio.Lock()

    # ------------------------------------------------------------------ authentication

    def session_ok(self, request: HttpRequest) -> bool:
        """Whether the request carries the session cookie (and, unless it only reads,
        the anti-forgery header)."""
        if self._session is None:
            return False
        cookie = SimpleCookie()
        try:
            cookie.load(request.headers.get("cookie", ""))
        except CookieError:
            return False
        morsel = cookie.get(SESSION_COOKIE)
        if morsel is None or not hmac.compare_digest(morsel.value, self._session):
            return False
        return request.method in _SAFE_METHODS or request.headers.get(CSRF_HEADER) == "1"

    def _token_ok(self, given: str | None) -> bool:
        if self._token is None or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    def _set_cookie(self) -> tuple[str, str]:
        assert self._session is not None
        # No Max-Age: the cookie ends with the browser session. No Secure: the
        # supervisor serves plain HTTP (put TLS in front of it beyond loopback).
        value = f"{SESSION_COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict"
        return ("set-cookie", value)

    # ------------------------------------------------------------------ the page

    async def page(self, request: HttpRequest, reply: Responder, *, authorized: bool) -> None:
        """Serve ``/playground`` and what hangs under it."""
        path, method = request.path, request.method
        name = path.removeprefix(PAGE_PATH + "/")
        if path in (PAGE_PATH, PAGE_PATH + "/"):
            if method not in _SAFE_METHODS:
                await _not_allowed(reply, method, path, "GET")
            elif authorized:
                await reply.respond(200, self._index, "text/html; charset=utf-8", _PAGE_HEADERS)
            elif "token" in request.query:
                await self._log_in(reply, request.query["token"])
            else:
                await self._login_page(reply, "")
        elif name == "login":
            if method != "POST":
                await _not_allowed(reply, method, path, "POST")
                return
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
            await self._log_in(reply, form.get("token"))
        elif name in self._assets and method in _SAFE_METHODS:
            headers = [("x-content-type-options", "nosniff"), ("cache-control", "no-cache")]
            await reply.respond(200, self._assets[name], _ASSETS[name], headers)
        else:
            await reply.json(404, error_body("not_found", f"no route for {method} {path}"))

    async def _log_in(self, reply: Responder, token: str | None) -> None:
        if self._token is None:  # no token configured: nothing to log in to
            await reply.respond(303, b"", None, [("location", PAGE_PATH)])
        elif self._token_ok(token):
            await reply.respond(303, b"", None, [("location", PAGE_PATH), self._set_cookie()])
        else:
            await self._login_page(reply, "That is not the admin token.")

    async def _login_page(self, reply: Responder, message: str) -> None:
        body = self._login.replace("{{message}}", html.escape(message)).encode()
        headers = [*_PAGE_HEADERS, ("www-authenticate", 'Bearer realm="tenantflow"')]
        await reply.respond(401, body, "text/html; charset=utf-8", headers)

    # ------------------------------------------------------------------ the API

    async def describe(self, request: HttpRequest, reply: Responder) -> None:
        """``GET /v1/playground``: the tenant, its current source (or the example)."""
        version = self.supervisor.registry.current_version(self.tenant_id)
        source = self.example
        if version is not None:
            files = await self.supervisor.code_files(self.tenant_id, version)
            source = files.get("main.py", source)
        await reply.json(
            200,
            {
                "tenant": self.tenant_id,
                "code_version": version,
                "source": source,
                "example": self.example,
                "params": EXAMPLE_PARAMS,
                "event": EXAMPLE_EVENT,
            },
        )

    async def check(self, request: HttpRequest, reply: Responder) -> None:
        """``POST /v1/playground/code``: store and check a version; 200 either way.

        A version that fails to load is still stored (as a folder's would be), so
        checking it succeeded; ``ok`` and ``error`` tell how the code fared.
        """
        source = _source(await request.json())
        async with self._lock:
            version, error = await self._put(source)
        await reply.json(
            200,
            {
                "tenant": self.tenant_id,
                "code_version": version,
                "ok": error is None,
                "error": located_error(error) if error is not None else None,
            },
        )

    async def run(self, request: HttpRequest, reply: Responder) -> None:
        """``POST /v1/playground/runs``: a new instance on the source's code version."""
        run = _run_request(await request.json())
        async with self._lock:
            version, error = await self._put(run.source)
            if error is not None:
                body = located_error(error) | {"code_version": version}
                await reply.json(422, {"error": body})
                return
            binding = self.supervisor.binding(self.tenant_id)
            handle = await binding.create(id=run.instance_id, params=run.params)
        await reply.json(
            201,
            {
                "tenant": self.tenant_id,
                "id": handle.id,
                "status": InstanceStatus.QUEUED.value,
                "code_version": version,
            },
        )

    async def _put(self, source: str) -> tuple[str, str | None]:
        try:
            return await self.supervisor.put_source(self.tenant_id, {"main.py": source})
        except ValueError as exc:
            raise BadRequest(str(exc)) from None


def _source(body: Any) -> str:
    if not isinstance(body, dict) or set(body) != {"source"}:
        raise BadRequest('the body is {"source": "<the main.py of the workflow>"}')
    source = body["source"]
    if not isinstance(source, str):
        raise BadRequest("source is a string")
    return source


def _run_request(body: Any) -> _RunRequest:
    allowed = {"source", "params", "id"}
    if not isinstance(body, dict) or not set(body) <= allowed or "source" not in body:
        raise BadRequest('the body is {"source": str, "params"?: any, "id"?: str}')
    instance_id = body.get("id")
    if instance_id is not None and not isinstance(instance_id, str):
        raise BadRequest("id is a string")
    return _RunRequest(_source({"source": body["source"]}), body.get("params"), instance_id)


async def _not_allowed(reply: Responder, method: str, path: str, allow: str) -> None:
    await reply.json(
        405,
        error_body("method_not_allowed", f"{method} is not allowed on {path}"),
        [("allow", allow)],
    )
