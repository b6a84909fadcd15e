"""The workbench routes: ``POST /v1/sweep`` (a strength sweep in one batch), ``POST /v1/vectors/compute``
(admin: a vector from contrastive pairs, registered like an upload) and ``GET /v1/vectors/{name}/norms``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..vector_dir import VectorInfo
from ..workbench import compute_and_register, run_sweep, vector_norms
from ..workbench_schemas import ComputeRequest, SweepRequest, SweepResponse, VectorNorms
from .common import State, admin, api, errors

__all__ = ["router"]

router = APIRouter(tags=["workbench"])


@router.post(
    "/v1/sweep",
    response_model=SweepResponse,
    responses=errors(400, 401, 404, 408, 409, 413, 422, 429, 503),
)
async def sweep(body: SweepRequest, request: Request, state: State) -> SweepResponse:
    """One prompt at k strengths of one vector, as k rows of one batch (strength 0: the unsteered reply)."""
    api(state, request)
    return await run_sweep(state, request, body)


@router.post(
    "/v1/vectors/compute",
    status_code=201,
    response_model=VectorInfo,
    responses=errors(400, 401, 403, 408, 409, 413, 422, 429, 503),
)
async def compute(body: ComputeRequest, request: Request, state: State) -> VectorInfo:
    """Compute an ``add`` vector from contrastive pairs on the served model (mean-diff or PCA at the last
    token) and register it as ``name``; usable by the very next request."""
    admin(state, request)
    return await compute_and_register(state, body)


@router.get(
    "/v1/vectors/{name}/norms",
    response_model=VectorNorms,
    responses=errors(400, 401, 404, 422, 503),
)
async def norms(name: str, request: Request, state: State) -> VectorNorms:
    """A vector's norms per tensor, and for an ``add`` vector per layer relative to the served model's mean
    hidden-state norm there."""
    api(state, request)
    return await vector_norms(state, name)
