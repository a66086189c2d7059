"""ASGI plumbing of the HTTP API: one request in, one response out, errors as SPEC 8 JSON.

Nothing here knows a route. ``HttpRequest`` reads the request (the body only on demand,
never more than the size limit) and ``Responder`` writes the response, remembering
whether it has started so an error after the first byte is never sent as a second one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from ._runner import RunnerError
from .errors import BadRequest, PayloadTooLarge, RateLimited, StorageBusy, TenantflowError

__all__ = [
    "ClientDisconnected",
    "HttpRequest",
    "Message",
    "Receive",
    "Responder",
    "Scope",
    "Send",
    "describe_error",
    "error_body",
    "json_bytes",
    "tenant_headers",
]

Message = dict[str, Any]
Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_TYPE: Final = "application/json"
#: Headers the server sets itself: a tenant's value for them is dropped.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "content-length",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class ClientDisconnected(Exception):
    """The client went away before its request body arrived: nobody to answer."""


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """SPEC 8's error JSON for a code that has no ``TenantflowError`` class."""
    return {"error": {"code": code, "message": message}}


class HttpRequest:
    """One HTTP request: method, path, query and headers at once; the body on demand."""

    def __init__(self, scope: Scope, receive: Receive, max_body_bytes: int) -> None:
        self.method: str = str(scope["method"]).upper()
        self.path: str = str(scope["path"]) or "/"
        raw_query = bytes(scope.get("query_string", b"")).decode("latin-1")
        #: Query parameters; a repeated name keeps its last value.
        self.query: dict[str, str] = dict(
            parse_qsl(raw_query, keep_blank_values=True, encoding="utf-8", errors="replace")
        )
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = bytes(raw_name).decode("latin-1").lower()
            value = bytes(raw_value).decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        #: Lower-case names; repeated headers joined with ", " (RFC 9110 5.3).
        self.headers = headers
        self._receive = receive
        self._max_body = max_body_bytes
        #: The body was refused part-way: the connection cannot carry another request.
        self.abandoned = False

    async def body(self) -> bytes:
        """The whole body, or PayloadTooLarge as soon as it is known to exceed the limit."""
        declared = self.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise BadRequest(f"invalid Content-Length {declared!r:.40}") from None
            if size > self._max_body:
                raise self._too_large(f"{size} bytes")
        buffer = bytearray()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if len(buffer) + len(chunk) > self._max_body:
                raise self._too_large(f"more than {self._max_body} bytes")
            buffer += chunk
            if not message.get("more_body", False):
                return bytes(buffer)

    async def json(self, *, empty: Any = None) -> Any:
        """The body parsed as JSON (``empty`` when there is no body); 400 when malformed."""
        raw = await self.body()
        if not raw.strip():
            return empty
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None

    async def wait_disconnect(self) -> None:
        """Return when the client closes the connection (use after the body was read)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def _too_large(self, size: str) -> PayloadTooLarge:
        self.abandoned = True
        return PayloadTooLarge(
            f"request body is {size}, more than the limit of {self._max_body} bytes"
        )


class Responder:
    """Writes one response; ``started`` tells whether the status line has gone out."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        self.started = True
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )

    async def write(self, chunk: bytes, *, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: str | None = JSON_TYPE,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A complete response with a Content-Length."""
        fixed = [("content-length", str(len(body)))]
        if content_type is not None:
            fixed.append(("content-type", content_type))
        await self.start(status, [*fixed, *headers])
        await self.write(body, more=False)

    async def json(self, status: int, value: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.respond(status, json_bytes(value), JSON_TYPE, headers)

    async def error(self, exc: BaseException, *, close: bool = False) -> None:
        """The response for ``exc``: its own status and code when it has them, else 500.

        ``close`` asks the server to close the connection after it (the rest of the
        request body was never read).
        """
        status, body, headers = describe_error(exc)
        if close:
            headers.append(("connection", "close"))
        await self.json(status, body, headers)


def describe_error(exc: BaseException) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """Status, JSON body and extra headers for an exception raised while serving."""
    headers: list[tuple[str, str]] = []
    if isinstance(exc, TenantflowError):
        if isinstance(exc, RateLimited | StorageBusy):
            headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
        return exc.http_status, exc.to_dict(), headers
    if isinstance(exc, RunnerError):
        return 502, error_body("sandbox.error", str(exc)), headers
    return 500, error_body("internal", "internal server error"), headers


def tenant_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """A tenant's response headers that are safe to send (valid, not hop-by-hop)."""
    safe: list[tuple[str, str]] = []
    for name, value in headers.items():
        key = str(name).lower()
        text = str(value)
        if key in _HOP_BY_HOP or not _TOKEN.match(key) or _BAD_VALUE.search(text):
            continue
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            continue
        safe.append((key, text))
    return safe
