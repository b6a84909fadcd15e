"""The OpenAI-compatible routes: chat completions, completions and the model list (saved profiles are
listed as models too, and ``model`` may name one). Parameters this server does not serve are refused by
name (:mod:`server.openai_compat`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..errors import UnknownProfileError
from ..generation import Generation, compile_steering, encode, encode_chat, request_id, run_generation
from ..openai_compat import check_messages, check_openai_params
from ..openai_schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
)
from ..render import ChatRenderer, CompletionRenderer
from ..schemas import ModelCard, ModelList, SavedSteering
from ..state import ServerState
from .common import State, api, errors, generation_route

__all__ = ["router"]

router = APIRouter(tags=["openai"])


def _profile_of(state: ServerState, model: str | None) -> str | None:
    """The saved profile an OpenAI ``model`` names (None for the served model itself)."""
    _, store, _ = state.require_engine()
    if model is None or model == state.model_id:
        return None
    if store.has_profile(model):
        return model
    raise UnknownProfileError(
        f"model {model!r} is neither the served model {state.model_id!r} nor a saved profile"
    )


def _admit(state: ServerState, request: Request, body: ChatCompletionRequest | CompletionRequest) -> None:
    """Readiness, then the OpenAI parameters this server does not serve (refused by name)."""
    api(state, request)
    check_openai_params(body, request_id(request), body.n)


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
    engine, _, _ = state.require_engine()
    params = body.sampling(state.config.max_new_tokens, engine.defaults)
    compiled, info = await compile_steering(state, body.steering, _profile_of(state, body.model))
    render = renderer(
        id=request_id(request),
        steering=info,
        model=body.model or state.model_id,
        include_usage=body.include_usage,
        n=params.n,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        **options,
    )
    gen = Generation(route, ids, params, compiled, body.stream, prompt_text)
    return await run_generation(state, request, gen, render)


@router.post("/v1/chat/completions", **generation_route(ChatCompletion, ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: State
) -> BaseModel | StreamingResponse:
    """OpenAI chat completion; ``steering`` as an extra body field."""
    _admit(state, request, body)
    check_messages(body.messages)
    ids = await encode_chat(state.require_engine()[2].tokenizer, body.messages)
    return await _complete(state, request, body, "/v1/chat/completions", ids, ChatRenderer)


@router.post("/v1/completions", **generation_route(Completion, CompletionChunk))
async def completions(
    body: CompletionRequest, request: Request, state: State
) -> BaseModel | StreamingResponse:
    """OpenAI (legacy) completion of one prompt; ``steering`` as an extra body field; ``echo`` prefixes
    the prompt (in the first chunk when streaming)."""
    _admit(state, request, body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ValueError("only a single prompt per request is supported")
        prompt = prompt[0]
    if body.echo and body.logprobs is not None:
        raise ValueError("'echo' together with 'logprobs' is not supported (no prompt log-probabilities)")
    ids = await encode(state.require_engine()[2].tokenizer, prompt)
    echo = prompt if body.echo else ""
    return await _complete(
        state, request, body, "/v1/completions", ids, CompletionRenderer, prompt, echo=echo
    )


@router.get(
    "/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=errors(401, 503)
)
async def models(request: Request, state: State) -> ModelList:
    """The served model and every saved profile (a profile is a model id too). With a folded profile, the
    served model says so and that profile is the only other id (no other steering applies)."""
    _, store, loaded = api(state, request)
    created = int(time.time())
    folded = store.folded
    data = [
        ModelCard(
            id=state.model_id,
            created=created,
            owned_by="steerserve",
            quantization=loaded.quantization,
            folded=True if folded else None,
            steering=SavedSteering.model_validate(store.get_profile(folded).to_dict()) if folded else None,
        )
    ]
    data += [
        ModelCard(
            id=name,
            created=created,
            owned_by="steerserve",
            parent=state.model_id,
            steering=SavedSteering.model_validate(saved.profile.to_dict()),
            folded=True if folded else None,
        )
        for name, saved in store.list_profiles().items()
        if name != state.model_id and (folded is None or name == folded)
    ]
    return ModelList(data=data)
