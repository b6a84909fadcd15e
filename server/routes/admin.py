"""The vectors and profiles routes: uploads, listing, deletion, saved profiles. Mutating routes need the
admin key (or a loopback bind); reading needs the API key like any route."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request

from steering_vectors import Profile
from steering_vectors.profile import check_name

from ..errors import BodyTimeoutError, BodyTooLargeError
from ..schemas import Deleted, ProfileBody, ProfileInfo, ProfileList, VectorList
from ..store import SavedProfile
from ..vector_dir import VectorInfo
from .common import State, admin, api, errors

__all__ = ["router"]

router = APIRouter(tags=["admin"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".safetensors or .gguf",
                        },
                        "name": {"type": "string", "description": "the vector's name"},
                        "description": {"type": "string"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/vectors",
    status_code=201,
    response_model=VectorInfo,
    responses=errors(400, 401, 403, 408, 409, 413, 415, 503),
    openapi_extra=_UPLOAD_BODY,
)
async def upload_vector(request: Request, state: State) -> VectorInfo:
    """Register an artifact as the new current version of ``name``; usable by the very next request.

    The body streams in under the upload cap and deadline (the file part spools to a temporary file)."""
    _, store, _ = admin(state, request)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except (BodyTooLargeError, BodyTimeoutError):
        raise
    except Exception as e:  # the multipart parser's own errors
        raise ValueError(f"invalid multipart body: {e}") from None
    try:
        upload, name, description = form.get("file"), form.get("name"), form.get("description")
        if upload is None or isinstance(upload, str):
            raise ValueError("multipart field 'file' (the artifact) is required")
        if not isinstance(name, str) or not name:
            raise ValueError("multipart field 'name' is required")
        data = await upload.read()
    finally:
        await form.close()  # the spooled temporary file
    info = await asyncio.to_thread(
        store.add,
        name,
        data,
        filename=upload.filename or "",
        description=description if isinstance(description, str) else None,
    )
    state.metrics.upload("created")
    return info


@router.get("/v1/vectors", response_model=VectorList, responses=errors(401, 422, 503))
async def list_vectors(
    request: Request,
    state: State,
    limit: int = Query(100, ge=1, le=1000, description="vectors per page"),
    after: str | None = Query(None, max_length=64, description="list the names after this one"),
) -> VectorList:
    """Registered vectors sorted by name, one page at a time (``after`` = the previous page's last_id)."""
    _, store, _ = api(state, request)
    page, more = store.page(limit=limit, after=after)
    first, last = (page[0].name, page[-1].name) if page else (None, None)
    return VectorList(data=page, first_id=first, last_id=last, has_more=more)


@router.get("/v1/vectors/{name}", response_model=VectorInfo, responses=errors(401, 404, 422, 503))
async def get_vector(name: str, request: Request, state: State) -> VectorInfo:
    """One registered vector: its current version and the history of versions."""
    _, store, _ = api(state, request)
    return store.get(name)


@router.delete(
    "/v1/vectors/{name}", response_model=Deleted, responses=errors(400, 401, 403, 404, 409, 422, 503)
)
async def delete_vector(
    name: str,
    request: Request,
    state: State,
    force: bool = Query(False, description="delete even while saved profiles use it"),
) -> Deleted:
    """Remove a vector and all its versions, or one version (``name@<sha256 prefix>``); 409 naming the
    saved profiles that use it unless ``force``. Requests in flight keep what they hold."""
    _, store, _ = admin(state, request)
    versions = await asyncio.to_thread(store.delete, name, force=force)
    base = name.partition("@")[0]
    if base not in store:
        state.metrics.forget_vector(base)
    return Deleted(deleted=name, versions=versions)


def _profile_info(name: str, saved: SavedProfile) -> ProfileInfo:
    return ProfileInfo.model_validate({"name": name, **saved.to_dict()})


@router.put(
    "/v1/profiles/{name}",
    response_model=ProfileInfo,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 408, 409, 413, 415, 422, 503),
)
async def put_profile(name: str, body: ProfileBody, request: Request, state: State) -> ProfileInfo:
    """Save (or replace) a profile: every entry is pinned to the version it resolves to now (409 for the
    served model's name or the folded profile)."""
    _, store, _ = admin(state, request)
    check_name(name)
    profile = Profile.from_dict(body.model_dump(exclude_none=True, exclude={"description"}))
    saved = await asyncio.to_thread(store.put_profile, name, profile, body.description)
    return _profile_info(name, saved)


@router.get(
    "/v1/profiles", response_model=ProfileList, response_model_exclude_none=True, responses=errors(401, 503)
)
async def list_profiles(request: Request, state: State) -> ProfileList:
    """Every saved profile, by name."""
    _, store, _ = api(state, request)
    return ProfileList(data=[_profile_info(n, p) for n, p in store.list_profiles().items()])


@router.get(
    "/v1/profiles/{name}",
    response_model=ProfileInfo,
    response_model_exclude_none=True,
    responses=errors(401, 404, 422, 503),
)
async def get_profile(name: str, request: Request, state: State) -> ProfileInfo:
    """One saved profile."""
    _, store, _ = api(state, request)
    return _profile_info(name, store.saved_profile(name))


@router.delete(
    "/v1/profiles/{name}",
    response_model=Deleted,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 409, 422, 503),
)
async def delete_profile(name: str, request: Request, state: State) -> Deleted:
    """Remove a saved profile (409 for the folded one)."""
    _, store, _ = admin(state, request)
    await asyncio.to_thread(store.delete_profile, name)
    return Deleted(deleted=name)
