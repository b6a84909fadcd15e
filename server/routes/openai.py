"""The OpenAI-compatible routes: chat completions, completions and the model list (saved profiles are
listed as models too, and ``model`` may name one)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from basemodel import LoadedModel

from ..errors import UnknownProfileError
from ..generation import Generation, compile_steering, encode, encode_chat, run_generation
from ..render import ChatRenderer, CompletionRenderer, steering_info
from ..schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ModelCard,
    ModelList,
    SavedSteering,
)
from ..state import ServerState
from ..store import VectorStore
from .common import State, api, errors, generation_route

__all__ = ["router"]

router = APIRouter(tags=["openai"])


def _profile_of(store: VectorStore, loaded: LoadedModel, model: str | None) -> str | None:
    """The saved profile an OpenAI ``model`` names (None for the served model itself)."""
    if model is None or model == loaded.model_id:
        return None
    if store.has_profile(model):
        return model
    raise UnknownProfileError(
        f"model {model!r} is neither the served model {loaded.model_id!r} nor a saved profile"
    )


def _admit(
    state: ServerState, request: Request, body: ChatCompletionRequest | CompletionRequest
) -> LoadedModel:
    """The access checks, then the one OpenAI parameter value this server does not serve (n > 1)."""
    _, _, loaded = api(state, request)
    if body.n != 1:
        raise ValueError("only n=1 is supported")
    return loaded


async def _complete(
    state: ServerState,
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    route: str,
    ids: list[int],
    renderer: type[ChatRenderer | CompletionRenderer],
    prompt_text: str | None = None,
    **options: str,
) -> BaseModel | StreamingResponse:
    """Resolve the steering (``model`` may name a saved profile), then generate, rendered OpenAI's way."""
    _, store, loaded = state.require_engine()
    compiled = compile_steering(store, body.steering, _profile_of(store, loaded, body.model))
    params = body.sampling(state.config.max_new_tokens)
    model = body.model or loaded.model_id
    render = renderer(
        steering=steering_info(compiled), model=model, include_usage=body.include_usage, **options
    )
    gen = Generation(route, ids, params, compiled, body.stream, prompt_text)
    return await run_generation(state, request, gen, render)


@router.post("/v1/chat/completions", **generation_route(ChatCompletion, ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State
) -> BaseModel | StreamingResponse:
    """OpenAI chat completion; ``steering`` as an extra body field."""
    loaded = _admit(state, request, body)
    ids = await encode_chat(loaded.tokenizer, body.messages)
    return await _complete(state, request, body, "/v1/chat/completions", ids, ChatRenderer)


@router.post("/v1/completions", **generation_route(Completion, CompletionChunk))
async def completions(
    body: CompletionRequest, request: Request, state: State
) -> BaseModel | StreamingResponse:
    """OpenAI (legacy) completion of one prompt; ``steering`` as an extra body field."""
    loaded = _admit(state, request, body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ValueError("only a single prompt per request is supported")
        prompt = prompt[0]
    ids = await encode(loaded.tokenizer, prompt)
    echo = prompt if body.echo else ""
    return await _complete(
        state, request, body, "/v1/completions", ids, CompletionRenderer, prompt, echo=echo
    )


@router.get(
    "/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=errors(401, 503)
)
async def models(request: Request, state: State) -> ModelList:
    """The served model and every saved profile (a profile is a model id too)."""
    _, store, loaded = api(state, request)
    created = int(time.time())
    data = [
        ModelCard(
            id=loaded.model_id, created=created, owned_by="steerserve", quantization=loaded.quantization
        )
    ]
    data += [
        ModelCard(
            id=name,
            created=created,
            owned_by="steerserve",
            parent=loaded.model_id,
            steering=SavedSteering.model_validate(p.to_dict()),
        )
        for name, p in store.list_profiles().items()
    ]
    return ModelList(data=data)
