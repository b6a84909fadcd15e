"""The edge of every HTTP request (pure ASGI, so it applies before anything parses the body).

- body cap: the body is read up to the route's cap (``max_body_bytes``; an upload gets
  ``max_upload_bytes`` plus room for the multipart framing) and answered 413 beyond it, whether the
  client declared its length or not;
- body timeout: a client that leaves its body stalled for ``body_timeout`` seconds gets 408;
- request metrics: ``steer_requests_total{route,status}`` and ``steer_request_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import ServerConfig
from .errors import BodyTimeoutError, BodyTooLargeError, classify, error_response, is_upload, reject
from .metrics import Metrics

__all__ = ["MULTIPART_OVERHEAD_BYTES", "EdgeMiddleware"]

#: What an upload body may carry on top of ``max_upload_bytes``: the multipart framing and form fields.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class EdgeMiddleware:
    """Buffers the request body up to a per-route cap (413 beyond it) and records request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = is_upload(scope["method"], scope["path"])
        cfg = self.config
        limit = cfg.max_upload_bytes + MULTIPART_OVERHEAD_BYTES if upload else cfg.max_body_bytes
        start = time.monotonic()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            try:
                body = await _read_body(scope, receive, limit, cfg.body_timeout)
            except (BodyTimeoutError, BodyTooLargeError) as e:
                cls = classify(e)
                reject(self.metrics, cls, upload=upload)
                await error_response(cls.status, str(e), cls.type, cls.headers)(scope, receive, send_wrapper)
                return
            await self.app(scope, _replay(body, receive), send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.observe_request(route, status["code"], time.monotonic() - start)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then passes through (e.g. disconnects)."""
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _read_body(scope: Scope, receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole request body; :class:`BodyTooLargeError` beyond ``limit`` bytes, :class:`BodyTimeoutError`
    when no message arrives for ``timeout`` seconds."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    too_large = BodyTooLargeError(f"request body exceeds the {limit}-byte limit")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        try:  # a stalled client must not hold its request open forever
            message = await asyncio.wait_for(receive(), timeout)
        except asyncio.TimeoutError:
            raise BodyTimeoutError(
                f"request body not received: the client sent nothing for {timeout:g} s"
            ) from None
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
