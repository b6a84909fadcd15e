"""Connection limits that act before a request reaches the app: the uvicorn HTTP protocol, guarded.

uvicorn's own protocol has no header-read timeout, no header size cap on its httptools parser and no cap on
open connections (``limit_concurrency`` answers 503 only once a request's headers are complete, so stalled
sockets still hold their descriptors). :class:`GuardedProtocol` adds, per connection:

- a header timeout: the whole header block (request line and headers) must arrive within
  ``header_timeout`` seconds of the connection opening or of the previous response ending; otherwise 408
  and the connection is closed (an idle keep-alive connection is closed silently);
- a header size cap: more than ``max_header_bytes`` of request line and headers is answered 431 and the
  connection is closed — counted while the bytes arrive, so an endless header is never buffered;
- a connection cap: beyond ``max_connections`` open connections a new one is answered 503 at once and
  closed, before anything is read from it.

Every such answer is a SPEC §6 error body with ``Connection: close`` and an ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .edge import new_request_id

__all__ = ["ConnectionLimits", "GuardedProtocol", "canned_error"]

log = logging.getLogger("steerserve")

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_TYPES = {408: "request_timeout", 431: "request_too_large", 503: "unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection limits (from ``ServerConfig``)."""

    header_timeout: float
    max_header_bytes: int
    max_connections: int


def canned_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response (SPEC §6 body) that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": _TYPES[status], "code": status}}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nx-request-id: {new_request_id()}\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a header size cap and a connection cap."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_bytes = 0  # bytes of the current header block received so far
        self._in_headers = True  # waiting for (the rest of) a header block
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, f"too many open connections (--max-connections {self.limits.max_connections})")
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_headers and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            raise _Refused  # stops the parser; data_received swallows it
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self.cycle.response_complete:
            self._await_headers()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # not the parser reporting our own refusal
            super().send_400_response(msg)

    def _await_headers(self) -> None:
        self._in_headers, self._head_bytes = True, 0
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._in_headers:
            return
        if self._head_bytes == 0:  # an idle connection: nothing to answer
            self.transport.close()
            return
        self._refuse(408, f"request headers not received within {self.limits.header_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._cancel_header_timer()
        log.info("connection %s: %d %s", self.client, status, message)
        if not self.transport.is_closing():
            self.transport.write(canned_error(status, message))
            self.transport.close()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""
