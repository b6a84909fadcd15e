"""The FastAPI layer (SPEC §6): thin routes over the engine, the vector store and the metrics.

Errors are mapped to HTTP once, here: every error body is ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from basemodel import LoadedModel, load_model
from steering_vectors import (
    ArtifactError,
    CompiledProfile,
    IncompatibleArtifactError,
    Profile,
    compile_profile,
    fold_profile,
    install_steering,
)
from steering_vectors.profile import check_name

from .engine import (
    ContextLengthError,
    DrainingError,
    Engine,
    GenerationResult,
    QueueFullError,
    SamplingParams,
)
from .metrics import Metrics
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    Message,
    ProfileBody,
    SteeringBody,
)
from .store import ArtifactTooLargeError, UnknownProfileError, UnknownVectorError, VectorStore

__all__ = ["ServerConfig", "ServerState", "create_app"]

log = logging.getLogger("steerserve")
access_log = logging.getLogger("steerserve.requests")


@dataclass
class ServerConfig:
    """Every ``steerserve serve`` option (each also readable from ``STEERSERVE_<OPTION>``)."""

    model: str | None = None
    quantization: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    vector_dir: Path = field(default_factory=lambda: Path("vectors"))
    max_batch_size: int = 8
    max_queue: int = 64
    max_new_tokens: int = 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 30.0  # seconds a client may leave the request body stalled (408 after that)
    api_key: str | None = None
    admin_key: str | None = None
    drain_timeout: float = 30.0
    fold: str | None = None
    log_prompts: bool = False


class NotReadyError(RuntimeError):
    """The model is still loading (HTTP 503)."""


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLargeError(Exception):
    pass


class BodyTimeoutError(Exception):
    pass


class ServerState:
    """Everything a running server holds: model, hooks, engine, store, metrics, readiness."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.store: VectorStore | None = None
        self.folded: CompiledProfile | None = None
        self.load_error: str | None = None
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def load(self, loaded: LoadedModel | None = None) -> None:
        """Load the model (unless given), install the hooks, open the store, start the engine."""
        self.engine = self._build(loaded).start()

    def _build(self, loaded: LoadedModel | None) -> Engine:
        """Everything but starting the engine loop (which must run in a thread that outlives loading)."""
        cfg = self.config
        loaded = loaded or load_model(
            cfg.model, quantization=cfg.quantization, dtype=cfg.dtype, device=cfg.device
        )
        hooks = install_steering(loaded.model, max_slots=max(2 * cfg.max_batch_size + 1, 16))
        layout = hooks.layout
        store = VectorStore(
            cfg.vector_dir,
            hidden_size=layout.hidden_size,
            num_layers=layout.num_layers,
            model_type=layout.model_type,
            linear_shapes=layout.linear_shapes(),
            max_bytes=cfg.max_upload_bytes,
        )
        if cfg.fold:
            self.folded = store.compile(store.get_profile(cfg.fold))
            fold_profile(loaded.model, self.folded)
        self.metrics.set_model_info(
            model=loaded.model_id,
            quantization=loaded.quantization,
            device=str(loaded.device),
            dtype=str(loaded.dtype).replace("torch.", ""),
        )
        self.metrics.set_vectors_loaded(len(store))
        self.loaded, self.store = loaded, store
        return Engine(
            loaded.model,
            loaded.tokenizer,
            hooks,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            max_new_tokens_cap=cfg.max_new_tokens,
            observer=self.metrics,
        )

    async def load_async(self) -> None:
        """Load in a worker thread while /health answers; start the engine from the event loop's thread.

        An engine thread spawned by a short-lived loader thread decodes several times slower (measured
        4-8x on CPU: the OpenMP runtime ties the worker team to the thread that created it), so the
        engine loop is started here, from the long-lived main thread.
        """
        try:
            engine = await asyncio.to_thread(self._build, None)
            self.engine = engine.start()
            log.info("model loaded; ready")
        except Exception as e:  # reported by /ready and the log; the process stays up for /health
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")

    def begin_drain(self) -> None:
        """SIGTERM: stop taking requests (503), let the ones in flight finish."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def require_engine(self) -> tuple[Engine, VectorStore, LoadedModel]:
        if self.draining:
            raise DrainingError("server is draining; not accepting new requests")
        if self.engine is None or self.store is None or self.loaded is None:
            raise NotReadyError(self.load_error or "model is still loading")
        return self.engine, self.store, self.loaded


# ---- errors, once -------------------------------------------------------------------------------------
def _error(status: int, message: str, etype: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": etype, "code": status}}, status_code=status, headers=headers
    )


def _classify(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, error type, reject reason, headers) for an exception raised by a route."""
    if isinstance(exc, AuthError):
        return (
            exc.status,
            "authentication_error" if exc.status == 401 else "permission_error",
            "unauthorized" if exc.status == 401 else "forbidden",
            None,
        )
    if isinstance(exc, (BodyTooLargeError, ArtifactTooLargeError)):
        return 413, "request_too_large", "too_large", None
    if isinstance(exc, QueueFullError):
        return 429, "overloaded", "queue_full", {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, DrainingError):
        return 503, "unavailable", "draining", {"Retry-After": "5"}
    if isinstance(exc, NotReadyError):
        return 503, "unavailable", "not_ready", {"Retry-After": "5"}
    if isinstance(exc, (UnknownVectorError, UnknownProfileError)):
        return 404, "not_found", "not_found", None
    if isinstance(exc, IncompatibleArtifactError):
        return 409, "incompatible_artifact", "invalid", None
    if isinstance(exc, ContextLengthError):
        return 400, "invalid_request_error", "context_length", None
    if isinstance(exc, ValueError):  # ArtifactError included
        return 400, "invalid_request_error", "invalid", None
    return 500, "internal_error", "other", None


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        status, etype, reason, headers = _classify(exc)
        if status == 500:
            log.exception("unhandled error", exc_info=exc)
            return _error(500, "internal server error", etype)
        state.metrics.reject(reason)
        return _error(status, str(exc), etype, headers)

    async def validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.reject("invalid")
        errors = exc.errors()
        # the most specific error: for a union (e.g. steering: str | {vectors}) the deepest branch names
        # the actual problem, where the first one would only say "Input should be a valid string"
        first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(
            exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error"
        )

    app.add_exception_handler(Exception, handle)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    for cls in (
        AuthError,
        BodyTooLargeError,
        ValueError,
        KeyError,
        QueueFullError,
        DrainingError,
        NotReadyError,
    ):
        app.add_exception_handler(cls, handle)


# ---- body size cap and request metrics (pure ASGI: the cap applies before anything parses) ----------
class _EdgeMiddleware:
    """Buffers the request body up to a per-route cap (413 beyond it) and records request metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self.state.config
        upload = scope["path"] == "/v1/vectors" and scope["method"] == "POST"
        limit = cfg.max_upload_bytes + 1024 * 1024 if upload else cfg.max_body_bytes
        start = time.monotonic()
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive, limit, cfg.body_timeout)
        except BodyTimeoutError:
            self.state.metrics.reject("timeout")
            resp = _error(
                408,
                f"request body not received: the client sent nothing for {cfg.body_timeout:g} s",
                "request_timeout",
                {"Connection": "close"},
            )
            await resp(scope, receive, send_wrapper)
            self._record(scope, status["code"], start)
            return
        except BodyTooLargeError:
            self.state.metrics.reject("too_large")
            if upload:
                self.state.metrics.upload("too_large")
            resp = _error(413, f"request body exceeds the {limit}-byte limit", "request_too_large")
            await resp(scope, receive, send_wrapper)
            self._record(scope, status["code"], start)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send_wrapper)
        finally:
            self._record(scope, status["code"], start)

    @staticmethod
    async def _read_body(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        limit: int,
        timeout: float,
    ) -> bytes:
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLargeError
        chunks, size = [], 0
        while True:
            try:  # a stalled client must not hold its request open forever
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise BodyTimeoutError from None
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _record(self, scope: dict[str, Any], status: int, start: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "other"
        self.state.metrics.observe_request(template, status, time.monotonic() - start)


# ---- auth ---------------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str | None) -> bool:
    return token is not None and key is not None and hmac.compare_digest(token.encode(), key.encode())


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_api_key(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    token = _bearer(request)
    if token is None:
        raise AuthError(401, "missing API key: send Authorization: Bearer <key>")
    if not (_matches(token, key) or _matches(token, state.config.admin_key)):
        raise AuthError(401, "invalid API key")


def _check_admin(state: ServerState, request: Request) -> None:
    admin = state.config.admin_key
    if admin is None:
        _check_api_key(state, request)
        if not _is_loopback(state.config.host):
            raise AuthError(403, "mutating routes are disabled: set STEERSERVE_ADMIN_KEY or bind to loopback")
        return
    token = _bearer(request)
    if token is None:
        raise AuthError(401, "missing admin key: send Authorization: Bearer <admin key>")
    if _matches(token, admin):
        return
    if _matches(token, state.config.api_key):
        raise AuthError(403, "this route needs the admin key")
    raise AuthError(401, "invalid admin key")


# ---- steering and generation helpers --------------------------------------------------------------------
def _resolve_steering(
    store: VectorStore, steering: str | SteeringBody | None, profile_from_model: str | None = None
) -> Profile | None:
    if isinstance(steering, str):
        return store.get_profile(steering)
    if steering is not None:
        return Profile.from_dict(steering.model_dump(exclude_none=True))
    if profile_from_model is not None:
        return store.get_profile(profile_from_model)
    return None


def _compile(state: ServerState, store: VectorStore, profile: Profile | None) -> CompiledProfile:
    layout = state.engine.hooks.layout if state.engine and state.engine.hooks else None
    if profile is None or not profile.vectors:
        return compile_profile(
            [], num_layers=layout.num_layers if layout else 0, hidden_size=layout.hidden_size if layout else 0
        )
    return store.compile(profile)


def _steering_block(compiled: CompiledProfile) -> dict[str, Any]:
    return {
        "fingerprint": compiled.fingerprint,
        "vectors": [
            {"name": r["name"], "sha256": r["sha256"], "strength": r["strength"]} for r in compiled.resolved
        ],
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _openai_chunks(
    base: dict[str, Any],
    choice: dict[str, Any],
    finish: str | None,
    usage: dict[str, Any] | None,
    compiled: CompiledProfile,
    include_usage: bool,
) -> list[Any]:
    """One OpenAI stream chunk; the last one carries the steering block (and a usage chunk if asked)."""
    out: list[Any] = [
        {**base, "choices": [{"index": 0, **choice, "finish_reason": finish, "logprobs": None}]}
    ]
    if finish is not None:
        out[0]["steering"] = _steering_block(compiled)
        if include_usage:
            out.append({**base, "choices": [], "usage": usage})
    return out


def _sampling(body: Any, max_new_tokens: int, default_temperature: float) -> SamplingParams:
    stop = body.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        stop=stops,
    )


def _chat_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


_INLINE_TOKENIZE_CHARS = 16_384


async def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt. A long one (up to the body limit: ~1 s of tokenizer time) is tokenized in a
    worker thread (the tokenizer releases the GIL), so it never stalls the event loop and other requests."""
    if len(text) <= _INLINE_TOKENIZE_CHARS:
        return tokenizer.encode(text, add_special_tokens=False)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)


async def _encode_chat(tokenizer: Any, messages: list[Message]) -> list[int]:
    if sum(len(m.text()) for m in messages) <= _INLINE_TOKENIZE_CHARS:
        return _chat_ids(tokenizer, messages)
    return await asyncio.to_thread(_chat_ids, tokenizer, messages)


async def _until_done(request: Request, handle: Any) -> GenerationResult:
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


def _sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _log_request(
    state: ServerState,
    route: str,
    handle_id: str,
    compiled: CompiledProfile,
    result: GenerationResult,
    prompt: str | None,
) -> None:
    record: dict[str, Any] = {
        "event": "request",
        "id": handle_id,
        "route": route,
        "fingerprint": compiled.fingerprint,
        "vectors": [r["name"] for r in compiled.resolved],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "ttft_s": round(result.timings.get("ttft", 0.0), 6),
        "total_s": round(result.timings.get("total", 0.0), 6),
    }
    if state.config.log_prompts and prompt is not None:
        record["prompt"] = prompt
    access_log.info(json.dumps(record))


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    """Build the FastAPI app around ``state``; if it holds no model yet, loading starts at startup."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load_async()) if state.engine is None else None
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, state.config.drain_timeout)

    app = FastAPI(
        title="steerserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Inference-time steering server: RED, RAHF vectors and LoRA per request.",
    )
    _install_error_handlers(app, state)
    app.add_middleware(_EdgeMiddleware, state=state)  # type: ignore[arg-type]

    def api(request: Request) -> tuple[Engine, VectorStore, LoadedModel]:
        _check_api_key(state, request)
        return state.require_engine()

    def admin(request: Request) -> tuple[Engine, VectorStore, LoadedModel]:
        _check_admin(state, request)
        return state.require_engine()

    async def generate_common(
        request: Request,
        route: str,
        prompt_ids: list[int],
        params: SamplingParams,
        compiled: CompiledProfile,
        stream: bool,
        prompt_text: str | None,
        render: Callable[[GenerationResult, dict[str, Any]], dict[str, Any]],
        render_chunk: Callable[[str, str | None, dict[str, Any] | None], list[Any]],
    ) -> Response:
        engine, _, _ = state.require_engine()
        handle = engine.submit(
            prompt_ids,
            params,
            compiled,
            loop=asyncio.get_running_loop(),
            request_id=f"req-{uuid.uuid4().hex[:16]}",
        )
        state.metrics.steered(r["name"] for r in compiled.resolved)
        steer = _steering_block(compiled)
        if not stream:
            result = await _until_done(request, handle)
            _log_request(state, route, handle.id, compiled, result, prompt_text)
            return JSONResponse(render(result, steer))

        async def events() -> AsyncIterator[bytes]:
            parts: list[str] = []
            try:
                async for ev in handle.events():
                    parts.append(ev.text)
                    usage = None
                    if ev.finish_reason is not None:
                        usage = _usage(ev.prompt_tokens, ev.completion_tokens)
                        result = GenerationResult(
                            "".join(parts),
                            ev.finish_reason,
                            ev.prompt_tokens,
                            ev.completion_tokens,
                            dict(handle.timings),
                        )
                        _log_request(state, route, handle.id, compiled, result, prompt_text)
                    for chunk in render_chunk(ev.text, ev.finish_reason, usage):
                        yield _sse(chunk)
                yield _sse("[DONE]")
            finally:
                handle.cancel()  # no-op when finished; frees the row when the client went away

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- health ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        reason = "draining" if state.draining else (state.load_error or "loading")
        return _error(503, f"not ready: {reason}", "unavailable", {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.exposition()
        return Response(body, media_type=ctype)

    # -- generation ----------------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        _, store, loaded = api(request)
        if (body.prompt is None) == (body.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        tok = loaded.tokenizer
        ids = (
            await _encode(tok, body.prompt)
            if body.prompt is not None
            else await _encode_chat(tok, body.messages or [])
        )
        compiled = _compile(state, store, _resolve_steering(store, body.steering))
        cap = state.config.max_new_tokens
        asked = "max_new_tokens" in body.model_fields_set  # the default must not exceed the cap
        params = _sampling(body, body.max_new_tokens if asked else min(body.max_new_tokens, cap), 0.0)

        def render(r: GenerationResult, steer: dict[str, Any]) -> dict[str, Any]:
            return {
                "text": r.text,
                "finish_reason": r.finish_reason,
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
                "steering": steer,
            }

        steer = _steering_block(compiled)

        def chunk(text: str, finish: str | None, usage: dict[str, Any] | None) -> list[Any]:
            if finish is None:
                return [{"text": text}]
            usage = {k: v for k, v in (usage or {}).items() if k != "total_tokens"}
            return [{"text": text, "finish_reason": finish, "usage": usage, "steering": steer}]

        return await generate_common(
            request, "/generate", ids, params, compiled, body.stream, body.prompt, render, chunk
        )

    def _openai_profile(store: VectorStore, loaded: LoadedModel, model: str | None) -> str | None:
        if model is None or model == loaded.model_id:
            return None
        if store.has_profile(model):
            return model
        raise UnknownProfileError(
            f"model {model!r} is neither the served model {loaded.model_id!r} nor a saved profile"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _, store, loaded = api(request)
        if body.n != 1:
            raise ValueError("only n=1 is supported")
        ids = await _encode_chat(loaded.tokenizer, body.messages)
        compiled = _compile(
            state, store, _resolve_steering(store, body.steering, _openai_profile(store, loaded, body.model))
        )
        default = min(256, state.config.max_new_tokens)
        params = _sampling(body, body.max_completion_tokens or body.max_tokens or default, 1.0)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or loaded.model_id
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def render(r: GenerationResult, steer: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": r.text},
                        "finish_reason": r.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(r.prompt_tokens, r.completion_tokens),
                "steering": steer,
            }

        first = {"sent": False}

        def chunk(text: str, finish: str | None, usage: dict[str, Any] | None) -> list[Any]:
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if not first["sent"]:
                delta["role"] = "assistant"
                first["sent"] = True
            return _openai_chunks(base, {"delta": delta}, finish, usage, compiled, include_usage)

        return await generate_common(
            request, "/v1/chat/completions", ids, params, compiled, body.stream, None, render, chunk
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _, store, loaded = api(request)
        if body.n != 1:
            raise ValueError("only n=1 is supported")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("only a single prompt per request is supported")
            prompt = prompt[0]
        ids = await _encode(loaded.tokenizer, prompt)
        compiled = _compile(
            state, store, _resolve_steering(store, body.steering, _openai_profile(store, loaded, body.model))
        )
        asked = "max_tokens" in body.model_fields_set and body.max_tokens is not None
        params = _sampling(body, body.max_tokens if asked else min(16, state.config.max_new_tokens), 1.0)
        cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or loaded.model_id
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        echo = prompt if body.echo else ""

        def render(r: GenerationResult, steer: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "text": echo + r.text, "finish_reason": r.finish_reason, "logprobs": None}
                ],
                "usage": _usage(r.prompt_tokens, r.completion_tokens),
                "steering": steer,
            }

        def chunk(text: str, finish: str | None, usage: dict[str, Any] | None) -> list[Any]:
            base = {"id": cid, "object": "text_completion", "created": created, "model": model}
            return _openai_chunks(base, {"text": text}, finish, usage, compiled, include_usage)

        return await generate_common(
            request, "/v1/completions", ids, params, compiled, body.stream, prompt, render, chunk
        )

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _, store, loaded = api(request)
        created = int(time.time())
        data = [
            {
                "id": loaded.model_id,
                "object": "model",
                "created": created,
                "owned_by": "steerserve",
                "quantization": loaded.quantization,
            }
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "steerserve",
                "parent": loaded.model_id,
                "steering": p.to_dict(),
            }
            for name, p in sorted(store.list_profiles().items())
        ]
        return {"object": "list", "data": data}

    # -- vectors ---------------------------------------------------------------------------------------
    @app.post("/v1/vectors", status_code=201)
    async def upload_vector(request: Request) -> JSONResponse:
        try:
            _, store, _ = admin(request)
        except AuthError as e:
            state.metrics.upload("unauthorized" if e.status == 401 else "forbidden")
            raise
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # the multipart parser's own errors
            state.metrics.upload("invalid")
            raise ValueError(f"invalid multipart body: {e}") from None
        upload, name, description = form.get("file"), form.get("name"), form.get("description")
        try:
            if upload is None or isinstance(upload, str):
                raise ValueError("multipart field 'file' (the artifact) is required")
            if not isinstance(name, str) or not name:
                raise ValueError("multipart field 'name' is required")
            check_name(name)
            data = await upload.read()
            info = await asyncio.to_thread(
                store.add,
                name,
                data,
                filename=upload.filename or "",
                description=description if isinstance(description, str) else None,
            )
        except ArtifactTooLargeError:
            state.metrics.upload("too_large")
            raise
        except IncompatibleArtifactError:
            state.metrics.upload("incompatible")
            raise
        except (ArtifactError, ValueError):
            state.metrics.upload("invalid")
            raise
        state.metrics.upload("created")
        state.metrics.set_vectors_loaded(len(store))
        return JSONResponse(info.to_dict(), status_code=201)

    @app.get("/v1/vectors")
    async def list_vectors(request: Request) -> dict[str, Any]:
        _, store, _ = api(request)
        return {"object": "list", "data": [v.to_dict() for v in store.list()]}

    @app.get("/v1/vectors/{name}")
    async def get_vector(name: str, request: Request) -> dict[str, Any]:
        _, store, _ = api(request)
        return store.get(name).to_dict()

    @app.delete("/v1/vectors/{name}")
    async def delete_vector(name: str, request: Request) -> dict[str, Any]:
        _, store, _ = admin(request)
        await asyncio.to_thread(store.delete, name)
        state.metrics.forget_vector(name)
        state.metrics.set_vectors_loaded(len(store))
        return {"deleted": name}

    # -- profiles --------------------------------------------------------------------------------------
    @app.put("/v1/profiles/{name}")
    async def put_profile(name: str, body: ProfileBody, request: Request) -> dict[str, Any]:
        _, store, _ = admin(request)
        check_name(name)
        profile = Profile.from_dict(body.model_dump(exclude_none=True, exclude={"description"}))
        store.compile(profile)  # every vector must resolve and fit the model
        await asyncio.to_thread(store.put_profile, name, profile)
        return {"name": name, **profile.to_dict()}

    @app.get("/v1/profiles")
    async def list_profiles(request: Request) -> dict[str, Any]:
        _, store, _ = api(request)
        return {
            "object": "list",
            "data": [{"name": n, **p.to_dict()} for n, p in sorted(store.list_profiles().items())],
        }

    @app.get("/v1/profiles/{name}")
    async def get_profile(name: str, request: Request) -> dict[str, Any]:
        _, store, _ = api(request)
        return {"name": name, **store.get_profile(name).to_dict()}

    @app.delete("/v1/profiles/{name}")
    async def delete_profile(name: str, request: Request) -> dict[str, Any]:
        _, store, _ = admin(request)
        await asyncio.to_thread(store.delete_profile, name)
        return {"deleted": name}

    return app
