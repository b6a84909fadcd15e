"""What every router uses: the server state, access checks, and the OpenAPI description of error bodies
and event streams."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from basemodel import LoadedModel

from ..engine import Engine
from ..generation import SSE_MEDIA_TYPE
from ..schemas import ErrorBody
from ..state import ServerState
from ..store import VectorStore

__all__ = ["State", "admin", "api", "errors", "generation_route"]

Ready = tuple[Engine, VectorStore, LoadedModel]

_MEANING = {
    400: "invalid input",
    401: "missing or wrong key",
    403: "forbidden",
    404: "unknown vector, profile or model",
    408: "request body not received in time",
    409: "artifact incompatible with the served model, or a conflict with saved state",
    413: "request body too large",
    415: "unsupported Content-Type",
    422: "body does not match the schema",
    429: "overloaded (see Retry-After)",
    503: "not ready or draining (see Retry-After)",
}


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request``."""
    return request.app.state.steerserve


State = Annotated[ServerState, Depends(server_state)]


def api(state: ServerState, request: Request) -> Ready:
    """Readiness of a route the API key opens (the edge checked the key): the engine, store and model."""
    return state.require_engine()


#: the same for a mutating route (the edge checked the admin key)
admin = api


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: each a SPEC §6 error body."""
    return {s: {"model": ErrorBody, "description": _MEANING[s]} for s in statuses}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions (self-contained)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def event_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entry of a streamed 200: SSE events whose ``data`` is a ``chunk`` as JSON,
    the last one ``[DONE]``."""
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {
            "contentMediaType": "application/json",
            "contentSchema": _inline(chunk.model_json_schema(mode="serialization")),
        },
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {
        200: {
            "content": {SSE_MEDIA_TYPE: {"schema": event}},
            "description": "the response, or with stream: true its event stream",
        }
    }


def generation_route(response: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    """Route arguments of a generation route: its JSON ``response``, its stream of ``chunk`` events and
    the errors it can answer."""
    return {
        "response_model": response,
        "responses": {**event_stream(chunk), **errors(400, 401, 404, 408, 409, 413, 415, 422, 429, 503)},
    }
