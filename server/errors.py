"""Every error the server raises and its one mapping to HTTP (SPEC §6).

:func:`classify` turns an exception into (status, error type, reject reason, headers); the exception
handlers (:func:`install_error_handlers`), the edge middleware and the upload metric all derive what they
answer and count from it. Every error body is ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steering_vectors import ArtifactError, IncompatibleArtifactError

from .engine import ContextLengthError, DrainingError, QueueFullError
from .metrics import Metrics

__all__ = [
    "UPLOAD_ROUTE",
    "ArtifactTooLargeError",
    "AuthError",
    "BodyTimeoutError",
    "BodyTooLargeError",
    "ConflictError",
    "ErrorClass",
    "NotReadyError",
    "UnknownProfileError",
    "UnknownVectorError",
    "UnsupportedMediaTypeError",
    "classify",
    "error_response",
    "install_error_handlers",
    "is_upload",
    "reject",
]

log = logging.getLogger("steerserve")

#: (method, path) of the vector upload, whose outcomes are also counted in steer_vector_uploads_total.
UPLOAD_ROUTE = ("POST", "/v1/vectors")


class NotReadyError(RuntimeError):
    """The model is still loading, or failed to load (HTTP 503)."""


class AuthError(Exception):
    """A missing or wrong key (``status`` 401) or a route the key may not use (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLargeError(Exception):
    """The request body exceeds the route's cap; raised while reading it, before parsing (HTTP 413)."""


class BodyTimeoutError(Exception):
    """The client left the request body stalled for longer than ``--body-timeout`` (HTTP 408)."""


class UnsupportedMediaTypeError(Exception):
    """The body's declared Content-Type is not one the route takes (HTTP 415)."""


class ConflictError(Exception):
    """The request conflicts with the server's state: a vector still used by saved profiles, a full store,
    a profile named like the served model, steering a folded server with something else (HTTP 409)."""


class UnknownVectorError(KeyError):
    """No vector (or no version of it) by that name (HTTP 404)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "unknown vector"


class UnknownProfileError(KeyError):
    """No saved profile by that name (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown profile"


class ArtifactTooLargeError(ArtifactError):
    """The upload exceeds the size cap; raised before anything is parsed (HTTP 413)."""


@dataclass(frozen=True)
class ErrorClass:
    """How one exception is answered and counted."""

    status: int
    type: str  # the body's error.type
    reason: str  # the steer_rejected_requests_total{reason} label
    headers: dict[str, str] | None = None

    @property
    def upload_result(self) -> str | None:
        """The steer_vector_uploads_total{result} label of a failed upload (None: not counted)."""
        return _UPLOAD_RESULTS.get(self.status)


_UPLOAD_RESULTS = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    409: "incompatible",
    413: "too_large",
}
_RETRY = {"Retry-After": "5"}

# most specific first: ArtifactTooLargeError and ContextLengthError are ValueErrors too
_CLASSES: list[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorClass]] = [
    (BodyTooLargeError, ErrorClass(413, "request_too_large", "too_large", {"Connection": "close"})),
    (ArtifactTooLargeError, ErrorClass(413, "request_too_large", "too_large")),
    (UnsupportedMediaTypeError, ErrorClass(415, "unsupported_media_type", "invalid")),
    (ConflictError, ErrorClass(409, "conflict", "conflict")),
    (BodyTimeoutError, ErrorClass(408, "request_timeout", "timeout", {"Connection": "close"})),
    (DrainingError, ErrorClass(503, "unavailable", "draining", _RETRY)),
    (NotReadyError, ErrorClass(503, "unavailable", "not_ready", _RETRY)),
    ((UnknownVectorError, UnknownProfileError), ErrorClass(404, "not_found", "not_found")),
    (IncompatibleArtifactError, ErrorClass(409, "incompatible_artifact", "invalid")),
    (ContextLengthError, ErrorClass(400, "invalid_request_error", "context_length")),
    (ValueError, ErrorClass(400, "invalid_request_error", "invalid")),  # ArtifactError included
]


def classify(exc: BaseException) -> ErrorClass:
    """The status, error type, reject reason and headers of an exception (500 for anything unknown)."""
    if isinstance(exc, AuthError):
        if exc.status == 401:
            return ErrorClass(401, "authentication_error", "unauthorized")
        return ErrorClass(exc.status, "permission_error", "forbidden")
    if isinstance(exc, QueueFullError):
        return ErrorClass(429, "overloaded", "queue_full", {"Retry-After": str(exc.retry_after)})
    for types, cls in _CLASSES:
        if isinstance(exc, types):
            return cls
    return ErrorClass(500, "internal_error", "other")


def error_response(
    status: int, message: str, etype: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The SPEC §6 error body ``{"error": {"message", "type", "code"}}`` with ``status``."""
    # a message may quote the input: a lone surrogate there must not make the answer unencodable
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": etype, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def is_upload(method: str, path: str) -> bool:
    """Whether a request is the vector upload."""
    return (method, path) == UPLOAD_ROUTE


def reject(metrics: Metrics, cls: ErrorClass, *, upload: bool) -> None:
    """Count a rejected request (and, for an upload, its result)."""
    metrics.reject(cls.reason)
    if upload and cls.upload_result is not None:
        metrics.upload(cls.upload_result)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer every exception a route raises with the SPEC §6 error body, through :func:`classify`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        cls = classify(exc)
        if cls.status == 500:
            log.exception("unhandled error", exc_info=exc)
            return error_response(500, "internal server error", cls.type)
        reject(metrics, cls, upload=is_upload(request.method, request.url.path))
        return error_response(cls.status, str(exc), cls.type, cls.headers)

    async def validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid")
        errors = exc.errors()
        # the most specific error: for a union (e.g. steering: str | {vectors}) the deepest branch names
        # the actual problem, where the first one would only say "Input should be a valid string"
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), etype)

    app.add_exception_handler(Exception, handle)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    for cls in (
        AuthError,
        BodyTooLargeError,
        BodyTimeoutError,
        ConflictError,
        ValueError,
        KeyError,
        QueueFullError,
        DrainingError,
        NotReadyError,
    ):
        app.add_exception_handler(cls, handle)
