"""The generation path every generation route shares: prompt encoding, steering resolution, submission to
the engine, the whole response or its SSE stream, and the request log (one JSON line per request)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from steering_vectors import CompiledProfile, Profile

from .engine import GenerationResult, RequestHandle, SamplingParams
from .render import Renderer
from .schemas import Message, SteeringBody
from .state import ServerState
from .store import VectorStore

__all__ = ["SSE_MEDIA_TYPE", "Generation", "compile_steering", "encode", "encode_chat", "run_generation"]

access_log = logging.getLogger("steerserve.requests")

SSE_MEDIA_TYPE = "text/event-stream"
_INLINE_TOKENIZE_CHARS = 16_384


def compile_steering(
    store: VectorStore, steering: str | SteeringBody | None, profile_from_model: str | None = None
) -> CompiledProfile:
    """The request's steering compiled for the served model: a saved profile's name, an inline profile,
    else the profile an OpenAI ``model`` names, else none (the identity)."""
    if isinstance(steering, str):
        profile = store.get_profile(steering)
    elif steering is not None:
        profile = Profile.from_dict(steering.model_dump(exclude_none=True))
    elif profile_from_model is not None:
        profile = store.get_profile(profile_from_model)
    else:
        profile = Profile()
    return store.compile(profile)


def _chat_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


async def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt. A long one (up to the body limit: ~1 s of tokenizer time) is tokenized in a
    worker thread (the tokenizer releases the GIL), so it never stalls the event loop and other requests."""
    if len(text) <= _INLINE_TOKENIZE_CHARS:
        return tokenizer.encode(text, add_special_tokens=False)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)


async def encode_chat(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a conversation through the model's chat template (long ones in a worker thread)."""
    if sum(len(m.text()) for m in messages) <= _INLINE_TOKENIZE_CHARS:
        return _chat_ids(tokenizer, messages)
    return await asyncio.to_thread(_chat_ids, tokenizer, messages)


@dataclass
class Generation:
    """One generation request, ready for the engine."""

    route: str
    prompt_ids: list[int]
    params: SamplingParams
    compiled: CompiledProfile
    stream: bool
    prompt_text: str | None = None  # written to the request log with --log-prompts only


async def run_generation(
    state: ServerState, request: Request, gen: Generation, renderer: Renderer
) -> BaseModel | StreamingResponse:
    """Submit ``gen``; the whole response, or an SSE stream of chunks ending in ``data: [DONE]``.

    A client that disconnects cancels its request, which frees its row.
    """
    engine, _, _ = state.require_engine()
    handle = engine.submit(
        gen.prompt_ids,
        gen.params,
        gen.compiled,
        loop=asyncio.get_running_loop(),
        request_id=f"req-{uuid.uuid4().hex[:16]}",
    )
    state.metrics.steered(r["name"] for r in gen.compiled.resolved)
    if not gen.stream:
        result = await _until_done(request, handle)
        _log_request(state, gen, handle.id, result)
        return renderer.response(result)

    async def events() -> AsyncIterator[bytes]:
        parts: list[str] = []
        try:
            async for ev in handle.events():
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    result = GenerationResult(
                        "".join(parts),
                        ev.finish_reason,
                        ev.prompt_tokens,
                        ev.completion_tokens,
                        dict(handle.timings),
                    )
                    _log_request(state, gen, handle.id, result)
                for chunk in renderer.chunks(ev):
                    yield _sse(chunk)
            yield _sse("[DONE]")
        finally:
            handle.cancel()  # no-op when finished; frees the row when the client went away

    return StreamingResponse(
        events(),
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _until_done(request: Request, handle: RequestHandle) -> GenerationResult:
    """Await the result; a client that disconnects cancels its request (frees its row)."""
    task = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                handle.cancel()
    finally:
        if not task.done():
            handle.cancel()


def _sse(data: BaseModel | str) -> bytes:
    """One SSE event; a chunk holds the fields it was given (OpenAI's explicit nulls included)."""
    payload = data if isinstance(data, str) else json.dumps(data.model_dump(mode="json", exclude_unset=True))
    return f"data: {payload}\n\n".encode()


def _log_request(state: ServerState, gen: Generation, request_id: str, result: GenerationResult) -> None:
    record: dict[str, Any] = {
        "event": "request",
        "id": request_id,
        "route": gen.route,
        "fingerprint": gen.compiled.fingerprint,
        "vectors": [r["name"] for r in gen.compiled.resolved],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "ttft_s": round(result.timings.get("ttft", 0.0), 6),
        "total_s": round(result.timings.get("total", 0.0), 6),
    }
    if state.config.log_prompts and gen.prompt_text is not None:
        record["prompt"] = gen.prompt_text
    access_log.info(json.dumps(record))
