"""The generation path every generation route shares: prompt encoding, steering resolution, submission to
the engine, the whole response or its SSE stream, and the request log (one JSON line per request)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from steering_vectors import CompiledProfile, Profile

from .engine import GenerationResult, RequestHandle, SamplingParams
from .errors import ConflictError, GenerationFailedError
from .render import Renderer, steering_info
from .schemas import Message, SteeringBody, SteeringInfo
from .state import ServerState

__all__ = [
    "SSE_MEDIA_TYPE",
    "Generation",
    "compile_steering",
    "encode",
    "encode_chat",
    "request_id",
    "run_generation",
]

access_log = logging.getLogger("steerserve.requests")
log = logging.getLogger("steerserve")

SSE_MEDIA_TYPE = "text/event-stream"
_INLINE_TOKENIZE_CHARS = 16_384


def request_id(request: Request) -> str:
    """The request's id (set by the edge middleware; it is also the ``X-Request-Id`` response header)."""
    return request.state.request_id


async def compile_steering(
    state: ServerState, steering: str | SteeringBody | None, profile_from_model: str | None = None
) -> tuple[CompiledProfile, SteeringInfo]:
    """The request's steering compiled for the served model (a saved profile's name, an inline profile,
    else the profile an OpenAI ``model`` names, else none) and the ``steering`` block of its response.
    Compiled in a worker thread: reading, checking and stacking artifacts never stalls the event loop
    (``/health`` and the other streams answer meanwhile); the store is thread-safe."""
    return await asyncio.to_thread(_compile_steering, state, steering, profile_from_model)


def _compile_steering(
    state: ServerState, steering: str | SteeringBody | None, profile_from_model: str | None
) -> tuple[CompiledProfile, SteeringInfo]:
    """:func:`compile_steering`, in the calling thread.

    On a server with a folded profile, that profile is the model: a request naming it, or no steering,
    runs unhooked and is answered with the folded profile's block; any other steering is a
    :class:`ConflictError` (it would apply on top of the folded weights)."""
    _, store, _ = state.require_engine()
    name = steering if isinstance(steering, str) else profile_from_model if steering is None else None
    if store.folded is not None and state.folded is not None:
        inline_empty = isinstance(steering, SteeringBody) and not steering.vectors
        if name in (None, store.folded) and (steering is None or name is not None or inline_empty):
            return store.compile(Profile()), steering_info(state.folded, folded=store.folded)
        raise ConflictError(
            f"this server serves profile {store.folded!r} folded into its weights and applies no other "
            "steering; send no steering (or that profile), or restart without --fold"
        )
    if name is not None:
        profile = store.get_profile(name)
    elif isinstance(steering, SteeringBody):
        profile = Profile.from_dict(steering.model_dump(exclude_none=True))
    else:
        profile = Profile()
    compiled = store.compile(profile)
    return compiled, steering_info(compiled)


def _check_unicode(text: str, what: str) -> None:
    """``ValueError`` for text that is not valid Unicode (a lone UTF-16 surrogate from a JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
            "send valid Unicode"
        ) from None


def _chat_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


async def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt. A long one (up to the body limit: ~1 s of tokenizer time) is tokenized in a
    worker thread (the tokenizer releases the GIL), so it never stalls the event loop and other requests."""
    _check_unicode(text, "prompt")
    if len(text) <= _INLINE_TOKENIZE_CHARS:
        return tokenizer.encode(text, add_special_tokens=False)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)


async def encode_chat(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of a conversation through the model's chat template (long ones in a worker thread)."""
    for i, m in enumerate(messages):
        _check_unicode(m.text(), f"messages[{i}].content")
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

    A client that disconnects cancels its request, which frees its rows. A failure inside the engine
    fails only this request: a 500 answer, or on a stream an event ``{"error": {...}}`` then ``[DONE]``.
    """
    engine, _, _ = state.require_engine()
    handle = engine.submit(
        gen.prompt_ids,
        gen.params,
        gen.compiled,
        loop=asyncio.get_running_loop(),
        request_id=request_id(request),
    )
    state.metrics.steered(r["name"] for r in gen.compiled.resolved)
    if not gen.stream:
        results = await _until_done(request, handle)
        _log_request(state, gen, handle.id, results)
        failed = next((r for r in results if r.finish_reason == "error"), None)
        if failed is not None:
            raise GenerationFailedError(handle.id, failed.error)
        return renderer.response(results)
    return StreamingResponse(
        _stream(state, gen, handle, renderer),
        media_type=SSE_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(
    state: ServerState, gen: Generation, handle: RequestHandle, renderer: Renderer
) -> AsyncIterator[bytes]:
    """The SSE events of a streamed request; a failed sample ends the stream with an error event."""
    parts: dict[int, list[str]] = {}
    finished: list[GenerationResult] = []
    try:
        async for ev in handle.events():
            parts.setdefault(ev.index, []).append(ev.text)
            if ev.finish_reason is not None:
                text = "".join(parts[ev.index])
                finished.append(
                    GenerationResult(
                        text, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, dict(handle.timings)
                    )
                )
            if ev.finish_reason == "error":
                err = GenerationFailedError(handle.id, ev.error)
                log.error("%s", err.detail)
                body = {"error": {"message": str(err), "type": "internal_error", "code": 500}}
                yield _sse(json.dumps(body))
                break
            for chunk in renderer.chunks(ev):
                yield _sse(chunk)
        _log_request(state, gen, handle.id, finished)
        yield _sse("[DONE]")
    finally:
        handle.cancel()  # no-op when finished; frees the rows when the client went away or a sample failed


async def _until_done(request: Request, handle: RequestHandle) -> list[GenerationResult]:
    """Await every sample's result; a client that disconnects cancels its request (frees its rows)."""
    task = asyncio.ensure_future(handle.results())
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


def _log_request(
    state: ServerState, gen: Generation, request_id: str, results: list[GenerationResult]
) -> None:
    if not results:
        return
    result = results[0]
    record: dict[str, Any] = {
        "event": "request",
        "id": request_id,
        "route": gen.route,
        "fingerprint": gen.compiled.fingerprint,
        "vectors": [r["name"] for r in gen.compiled.resolved],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": sum(r.completion_tokens for r in results),
        "finish_reason": result.finish_reason,
        **({"finish_reasons": [r.finish_reason for r in results]} if len(results) > 1 else {}),
        "ttft_s": round(result.timings.get("ttft", 0.0), 6),
        "total_s": round(result.timings.get("total", 0.0), 6),
    }
    if state.config.log_prompts and gen.prompt_text is not None:
        record["prompt"] = gen.prompt_text
    access_log.info(json.dumps(record))
