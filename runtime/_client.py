"""A small client of the admin API (SPEC 8), on the standard library only.

::

    trigger / instances / send-event / tenants ──▶ Client.call() ──HTTP──▶ supervisor
    instances describe --follow ──▶ Client.events() ◀──SSE── /v1/.../instances/{id}/logs

Every failure reaches the CLI as one `ClientError` with a one-line message: an API error
keeps its SPEC 8 code (``instance.not_found``), a transport failure names the URL.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["ApiError", "Client", "ClientError", "ServerEvent", "parse_sse"]

DEFAULT_URL: Final = "http://127.0.0.1:8787"
_REQUEST_TIMEOUT: Final = 30.0
# The server sends a heartbeat comment every 15 s: three missed ones mean the stream is dead.
_STREAM_TIMEOUT: Final = 45.0
_MAX_ERROR_BODY: Final = 64 * 1024


class ClientError(Exception):
    """Raised when a request cannot be made or answered; ``str()`` is the one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiError(ClientError):
    """Raised when the supervisor answers with an error status and SPEC 8's error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.detail = message


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One server-sent event: its ``event:`` name and its ``data:`` lines joined."""

    event: str
    data: str

    def json(self) -> Any:
        """The data parsed as JSON (the raw text if it is not JSON, None if empty)."""
        if not self.data:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return self.data


def parse_sse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Events of a ``text/event-stream``; comments (``: heartbeat``) are skipped."""
    event, data = "message", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data or event != "message":
                yield ServerEvent(event, "\n".join(data))
            event, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value or "message"
        elif field == "data":
            data.append(value)
        # "id:" and "retry:" do not matter to a client that never reconnects.
    if data:
        yield ServerEvent(event, "\n".join(data))


class Client:
    """Calls on one supervisor's admin API: ``base_url`` and its bearer ``token``."""

    def __init__(self, base_url: str = DEFAULT_URL, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None

    def url(self, path: str, query: Mapping[str, object] | None = None) -> str:
        """The absolute URL of ``path`` with the query items that are not None."""
        url = self.base_url + path
        items = {k: str(v) for k, v in (query or {}).items() if v is not None}
        return f"{url}?{urllib.parse.urlencode(items)}" if items else url

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, object] | None = None,
    ) -> Any:
        """One JSON request; the decoded JSON answer (None for an empty one)."""
        data = None if body is None else json.dumps(body).encode()
        request = self._request(method, self.url(path, query), data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with self._open(request, _REQUEST_TIMEOUT) as response:
            raw = response.read()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"the supervisor at {self.base_url} answered with non-JSON") from None

    def events(self, path: str) -> Iterator[ServerEvent]:
        """Follow a server-sent event stream until the server ends it."""
        request = self._request("GET", self.url(path), None)
        request.add_header("Accept", "text/event-stream")
        with self._open(request, _STREAM_TIMEOUT) as response:
            lines = (raw.decode("utf-8", "replace") for raw in response)
            try:
                yield from parse_sse(lines)
            except TimeoutError:
                raise ClientError(
                    f"the event stream from {self.base_url} went silent (no heartbeat)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise ClientError(f"the event stream from {self.base_url} broke: {exc}") from None

    def _request(self, method: str, url: str, data: bytes | None) -> urllib.request.Request:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def _open(self, request: urllib.request.Request, timeout: float) -> Any:
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except urllib.error.URLError as exc:
            raise ClientError(self._unreachable(exc.reason)) from None
        except TimeoutError:
            raise ClientError(
                f"the supervisor at {self.base_url} did not answer within {timeout:.0f} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:  # reset, broken pipe, bad reply
            raise ClientError(self._unreachable(exc)) from None

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"cannot connect to the tenantflow supervisor at {self.base_url}: "
                "connection refused (is `tenantflow serve` running? set --url or TENANTFLOW_URL)"
            )
        if isinstance(reason, TimeoutError):
            return f"the supervisor at {self.base_url} did not answer in time"
        detail = getattr(reason, "strerror", None) or str(reason)
        return f"cannot reach the tenantflow supervisor at {self.base_url}: {detail}"


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    """SPEC 8's ``{"error": {"code", "message"}}`` body, or the HTTP status line."""
    try:
        raw = exc.read(_MAX_ERROR_BODY)
    except OSError:
        raw = b""
    finally:
        exc.close()
    code, message = f"http.{exc.code}", str(exc.reason or "error")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    elif raw.strip() and body is None:
        message = raw.decode("utf-8", "replace").strip().splitlines()[0][:300]
    return ApiError(exc.code, code, message)
