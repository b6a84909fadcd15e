"""``POST /generate``: the native generation route."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..generation import Generation, compile_steering, encode, encode_chat, run_generation
from ..openai_compat import check_messages
from ..render import GenerateRenderer
from ..schemas import GenerateChunk, GenerateRequest, GenerateResponse
from .common import State, api, generation_route

__all__ = ["router"]

router = APIRouter(tags=["generation"])


@router.post("/generate", **generation_route(GenerateResponse, GenerateChunk))
async def generate(
    body: GenerateRequest, request: Request, state: State
) -> GenerateResponse | StreamingResponse:
    """Generate from a prompt or a conversation, optionally steered (greedy unless a temperature is given)."""
    engine, _, loaded = api(state, request)
    if (body.prompt is None) == (body.messages is None):
        raise ValueError("give exactly one of 'prompt' or 'messages'")
    check_messages(body.messages or [])
    params = body.sampling(state.config.max_new_tokens, engine.defaults)
    tok = loaded.tokenizer
    ids = (
        await encode(tok, body.prompt)
        if body.prompt is not None
        else await encode_chat(tok, body.messages or [])
    )
    compiled, info = await compile_steering(state, body.steering)
    gen = Generation("/generate", ids, params, compiled, body.stream, body.prompt)
    return await run_generation(state, request, gen, GenerateRenderer(info, logprobs=params.logprobs))
