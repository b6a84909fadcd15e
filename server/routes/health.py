"""Liveness, readiness and the Prometheus metrics (no authentication: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..errors import error_response
from ..schemas import Status
from .common import State, errors

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Status)
async def health() -> Status:
    """The process is alive."""
    return Status(status="ok")


@router.get("/ready", response_model=Status, responses=errors(503))
async def ready(state: State) -> Status | JSONResponse:
    """The model is loaded and the server is not draining."""
    if state.ready:
        return Status(status="ready")
    reason = "draining" if state.draining else ("the model failed to load" if state.load_error else "loading")
    return error_response(503, f"not ready: {reason}", "unavailable", {"Retry-After": "5"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
async def metrics(state: State) -> Response:
    """The SPEC §8 metrics in Prometheus' text format."""
    body, ctype = await state.exposition()
    return Response(body, media_type=ctype)
