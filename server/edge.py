"""The edge of every HTTP request (pure ASGI: it runs before anything reads or parses the body).

In order, from the request line and headers alone:

- request id: the client's ``X-Request-Id`` when it is a plain token (``[A-Za-z0-9._:-]``, at most 128
  characters), else a fresh one; it goes back on every response, is the OpenAI ``id`` and the request
  log's ``id`` (``scope["state"]["request_id"]``);
- authentication (:func:`server.auth.authorize`): a request without the right key is answered 401/403
  without reading a byte of its body, and its connection is closed;
- media type: a JSON route given a body of another declared type (``text/plain``…) gets 415; the upload
  takes ``multipart/form-data`` only;
- body cap and body timeout: the body is read up to the route's cap (``max_body_bytes``; an upload gets
  ``max_upload_bytes`` plus room for the multipart framing) and answered 413 beyond it, whether the
  client declared its length or not; the whole body must arrive within ``body_timeout`` seconds of the
  headers (408 otherwise, however it is dripped). JSON bodies are buffered here; an upload is streamed to
  its route (which spools it to a temporary file) under the same cap and deadline;
- request metrics: ``steer_requests_total{route,status}`` and ``steer_request_duration_seconds``.

Header timeouts, the header size cap and the connection cap act earlier, in the connection protocol
(:mod:`server.connection`).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import authorize
from .config import ServerConfig
from .errors import (
    AuthError,
    BodyTimeoutError,
    BodyTooLargeError,
    UnsupportedMediaTypeError,
    classify,
    error_response,
    is_upload,
    reject,
)
from .metrics import Metrics

__all__ = ["MULTIPART_OVERHEAD_BYTES", "REQUEST_ID_HEADER", "EdgeMiddleware", "new_request_id"]

#: What an upload body may carry on top of ``max_upload_bytes``: the multipart framing and form fields.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024
REQUEST_ID_HEADER = "x-request-id"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
#: the id prefix of each route, as OpenAI names its objects
_ID_PREFIX = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl"}
_EDGE_ERRORS = (AuthError, BodyTimeoutError, BodyTooLargeError, UnsupportedMediaTypeError)


def new_request_id(path: str = "") -> str:
    """A fresh request id, prefixed like OpenAI's ids on the OpenAI routes (``chatcmpl-…``, ``cmpl-…``)."""
    return f"{_ID_PREFIX.get(path, 'req')}-{uuid.uuid4().hex}"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def _request_id(scope: Scope) -> str:
    given = _header(scope, REQUEST_ID_HEADER.encode())
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given.decode()
    return new_request_id(scope["path"])


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")


def _check_media_type(scope: Scope, upload: bool) -> None:
    """415 for a body whose declared type the route does not take (no declared type counts as JSON)."""
    if scope["method"] not in ("POST", "PUT", "PATCH") or not _has_body(scope):
        return
    raw = _header(scope, b"content-type")
    media = (raw or b"").split(b";")[0].strip().lower().decode("latin-1")
    if upload:
        if media != "multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"Content-Type {media or '(none)'} is not supported: upload a vector as multipart/form-data"
            )
    elif media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type {media} is not supported: send application/json")


class EdgeMiddleware:
    """Request id, authentication, media type, body cap and deadline, request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: ServerConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        upload = is_upload(scope["method"], scope["path"])
        start = time.monotonic()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            try:
                receive = await self._admit(scope, receive, upload)
            except _EDGE_ERRORS as e:
                await self._refuse(e, scope, receive, send_wrapper, upload)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.observe_request(route, status["code"], time.monotonic() - start)

    async def _admit(self, scope: Scope, receive: Receive, upload: bool) -> Receive:
        """Check the key and media type, then buffer a JSON body (or guard an upload's stream)."""
        cfg = self.config
        authorize(cfg, scope["method"], scope["path"], scope.get("headers") or ())
        _check_media_type(scope, upload)
        limit = cfg.max_upload_bytes + MULTIPART_OVERHEAD_BYTES if upload else cfg.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise BodyTooLargeError(f"request body exceeds the {limit}-byte limit")
        guarded = _guarded(receive, limit, cfg.body_timeout)
        if upload:
            return guarded
        chunks = []
        while True:
            message = await guarded()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        return _replay(b"".join(chunks), receive)

    async def _refuse(self, e: Exception, scope: Scope, receive: Receive, send: Send, upload: bool) -> None:
        """Answer an edge error; a body left unread closes the connection (nothing more is read)."""
        cls = classify(e)
        reject(self.metrics, cls, upload=upload)
        headers = dict(cls.headers or {})
        if _has_body(scope):
            headers["Connection"] = "close"
        await error_response(cls.status, str(e), cls.type, headers)(scope, receive, send)


def _guarded(receive: Receive, limit: int, timeout: float) -> Receive:
    """``receive`` under the body cap (:class:`BodyTooLargeError`) and a deadline for the whole body,
    ``timeout`` seconds from the first call (:class:`BodyTimeoutError`); after the body it passes through."""
    size, deadline, done = 0, 0.0, False

    async def guarded() -> dict[str, Any]:
        nonlocal size, deadline, done
        if done:
            return await receive()
        deadline = deadline or time.monotonic() + timeout
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise BodyTimeoutError(
                f"request body not received: the whole body must arrive within {timeout:g} s"
            ) from None
        if message["type"] != "http.request":
            done = True
            return message
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyTooLargeError(f"request body exceeds the {limit}-byte limit")
        done = not message.get("more_body", False)
        return message

    return guarded


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
