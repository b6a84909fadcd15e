"""The steering workbench behind ``/v1/sweep``, ``/v1/vectors/compute`` and ``/v1/vectors/{name}/norms``.

- A sweep runs one prompt at k strengths of one vector: k engine requests submitted together (one event-loop
  turn, so the engine admits them in the same scheduling step: one prefill, then k rows of every decode
  step). Every row pins the same version of the vector; strength 0 compiles to the identity (slot 0), so
  its row is exactly the unsteered reply.
- A computation reads the served model's hidden states (:mod:`steering_vectors.compute`) in a worker
  thread of its own, through a hook-free view of the model, so it neither blocks the event loop nor
  touches the engine's batches. One runs at a time (another gets 429, also while one whose client went
  away is still running); pairs, tokens per text and texts per forward pass are bounded
  (``--compute-max-tokens``, ``--compute-batch-size``).
- Norms relate an ``add`` vector to the model's own hidden-state norms, measured once per server on
  :data:`REFERENCE_TEXTS`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import Request

from basemodel import LoadedModel
from steering_vectors import CompiledProfile, VectorRef
from steering_vectors.compute import compute_from_texts, last_token_states
from steering_vectors.profile import check_name

from .engine import GenerationResult, QueueFullError, RequestHandle
from .errors import GenerationFailedError
from .generation import compile_steering, encode, encode_chat
from .render import generate_logprobs, steering_info
from .schemas import Usage
from .state import ServerState
from .vector_dir import VectorInfo
from .workbench_schemas import ComputeRequest, SweepRequest, SweepResponse, SweepRow, SweepVector, VectorNorms

__all__ = ["REFERENCE_TEXTS", "compute_and_register", "run_sweep", "vector_norms"]

access_log = logging.getLogger("steerserve.requests")

#: Neutral texts whose last-token hidden states give the model's typical norm per layer (``relative`` norms).
REFERENCE_TEXTS = (
    "The train to the coast leaves every morning at seven.",
    "Water boils at a lower temperature on a high mountain.",
    "Please send me the report by the end of the week.",
    "She planted tomatoes, basil and a row of sunflowers.",
    "How many moons does Jupiter have?",
    "The committee will meet again on Thursday afternoon.",
    "Add the flour slowly and keep stirring until it thickens.",
    "My laptop battery drains faster than it used to.",
    "The museum is closed on Mondays and public holidays.",
    "Write a short poem about the sea.",
    "He fixed the bicycle chain with a pair of pliers.",
    "Which programming language should I learn first?",
)


class _Workbench:
    """Per-server workbench state: one worker thread for computations (one at a time: its job is the one
    running), one for the reference norms, and those norms once measured. A job runs to its end even when
    the request that started it goes away, so ``computing`` always tells whether the model is being read."""

    def __init__(self) -> None:
        self.compute_pool = ThreadPoolExecutor(1, thread_name_prefix="steerserve-compute")
        self.computing: Future[VectorInfo] | None = None
        self.norms_pool = ThreadPoolExecutor(1, thread_name_prefix="steerserve-norms")
        self.measuring: Future[dict[int, float]] | None = None
        self.reference: dict[int, float] | None = None


_BENCHES: weakref.WeakKeyDictionary[ServerState, _Workbench] = weakref.WeakKeyDictionary()


def _bench(state: ServerState) -> _Workbench:
    bench = _BENCHES.get(state)
    if bench is None:
        bench = _BENCHES[state] = _Workbench()
    return bench


async def _outcome(job: Future[Any]) -> Any:
    """Await a worker's job; a caller that goes away leaves the job running."""
    return await asyncio.shield(asyncio.wrap_future(job))


# ---- sweep ------------------------------------------------------------------------------------------------
async def _prompt_ids(tokenizer: Any, body: SweepRequest) -> list[int]:
    if body.prompt is not None and body.messages is None:
        return await encode(tokenizer, body.prompt)
    if body.messages is not None and body.prompt is None:
        return await encode_chat(tokenizer, body.messages)
    raise ValueError("give exactly one of 'prompt' or 'messages'")


async def _all_results(request: Request, handles: list[RequestHandle]) -> list[GenerationResult]:
    """Every row's result; a client that disconnects (or an error here) cancels every row."""
    gathered = asyncio.gather(*(h.result() for h in handles))
    try:
        while not gathered.done():
            await asyncio.wait({gathered}, timeout=0.25)
            if not gathered.done() and await request.is_disconnected():
                for h in handles:
                    h.cancel()
        return gathered.result()
    finally:
        if not gathered.done():
            for h in handles:
                h.cancel()
            gathered.cancel()


def _submit_rows(
    state: ServerState, sweep_id: str, ids: list[int], body: SweepRequest, compiled: list[CompiledProfile]
) -> list[RequestHandle]:
    """Submit the k rows back to back (no await between them); if one is refused, none stays queued."""
    engine, _, _ = state.require_engine()
    params = body.sampling(state.config.max_new_tokens)
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
        for i, profile in enumerate(compiled):
            handles.append(engine.submit(ids, params, profile, loop=loop, request_id=f"{sweep_id}-{i}"))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def run_sweep(state: ServerState, request: Request, body: SweepRequest) -> SweepResponse:
    """Run ``body``'s k strengths as k rows of one batch; the rows in the order of the strengths."""
    engine, store, loaded = state.require_engine()
    k = len(body.strengths)
    if k > engine.max_batch_size:
        raise ValueError(
            f"strengths: {k} rows do not fit one batch of --max-batch-size {engine.max_batch_size}"
        )
    ref = VectorRef(body.vector, layers=tuple(body.layers) if body.layers is not None else None)
    art = await asyncio.to_thread(store.resolve, ref)  # may read and parse the file: off the event loop
    pinned = f"{ref.base_name}@{art.sha256}"  # every row uses this version, whatever is uploaded meanwhile
    compiled = [(await compile_steering(state, body.steering(pinned, w)))[0] for w in body.strengths]
    ids = await _prompt_ids(loaded.tokenizer, body)
    sweep_id = f"sweep-{uuid.uuid4().hex[:16]}"
    handles = _submit_rows(state, sweep_id, ids, body, compiled)
    state.metrics.steered([ref.base_name])
    results = await _all_results(request, handles)
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        raise GenerationFailedError(sweep_id, failed.error)
    rows = [
        SweepRow(
            strength=w,
            text=r.text,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
            steering=steering_info(c),
            logprobs=generate_logprobs(r.logprobs) if body.logprobs else None,
        )
        for w, r, c in zip(body.strengths, results, compiled, strict=True)
    ]
    applied = [x for x in art.layers if ref.layers is None or x in ref.layers]
    vector = SweepVector(
        name=ref.base_name, sha256=art.sha256, kind=art.kind, layers=applied, positions=body.positions
    )
    _log_sweep(sweep_id, vector, rows)
    return SweepResponse(results=rows, steering=vector)


def _log_sweep(sweep_id: str, vector: SweepVector, rows: list[SweepRow]) -> None:
    record = {
        "event": "request",
        "id": sweep_id,
        "route": "/v1/sweep",
        "vectors": [vector.name],
        "sha256": vector.sha256,
        "strengths": [r.strength for r in rows],
        "fingerprints": [r.steering.fingerprint for r in rows],
        "prompt_tokens": rows[0].usage.prompt_tokens,
        "completion_tokens": sum(r.usage.completion_tokens for r in rows),
        "finish_reasons": [r.finish_reason for r in rows],
    }
    access_log.info(json.dumps(record))


# ---- compute ----------------------------------------------------------------------------------------------
async def compute_and_register(state: ServerState, body: ComputeRequest) -> VectorInfo:
    """Compute ``body``'s vector from the served model and register it under ``body.name`` (201)."""
    _, store, loaded = state.require_engine()
    check_name(body.name)
    bench, cfg = _bench(state), state.config
    if bench.computing is not None and not bench.computing.done():
        raise QueueFullError("a vector computation is already running; retry when it has finished", 5)

    def work() -> VectorInfo:
        art = compute_from_texts(
            loaded.model,
            loaded.tokenizer,
            [(p.positive, p.negative) for p in body.pairs],
            method=body.method,
            layers=body.layers,
            batch_size=cfg.compute_batch_size,
            max_tokens=cfg.compute_max_tokens,
            limit="--compute-max-tokens",
            extra={"base_model": loaded.model_id},
        )
        return store.add(
            body.name, art.to_bytes(), filename="computed.safetensors", description=body.description
        )

    bench.computing = bench.compute_pool.submit(work)
    info = await _outcome(bench.computing)
    state.metrics.upload("created")
    return info


# ---- norms ------------------------------------------------------------------------------------------------
def _measure_reference(loaded: LoadedModel) -> dict[int, float]:
    """{layer: mean ‖h_l‖} of the model at the last token of :data:`REFERENCE_TEXTS`."""
    tok, layers = loaded.tokenizer, list(range(loaded.num_layers))
    seqs = [tok.encode(t, add_special_tokens=False) for t in REFERENCE_TEXTS]
    states = last_token_states(loaded.model, seqs, layers)
    return {layer: float(h.norm(dim=-1).mean()) for layer, h in states.items()}


async def _reference_norms(state: ServerState) -> dict[int, float]:
    """The served model's reference norms, measured once (a failed measurement is tried again)."""
    bench = _bench(state)
    if bench.reference is None:
        job = bench.measuring
        if job is None or (job.done() and job.exception() is not None):
            _, _, loaded = state.require_engine()
            job = bench.measuring = bench.norms_pool.submit(_measure_reference, loaded)
        bench.reference = await _outcome(job)
    return bench.reference


async def vector_norms(state: ServerState, name: str) -> VectorNorms:
    """Norms of ``name`` (``name@sha-prefix`` for a version), relative ones for an ``add`` vector."""
    _, store, _ = state.require_engine()
    ref = VectorRef(name)
    art = await asyncio.to_thread(store.resolve, ref)  # may read and parse the file: off the event loop
    relative = None
    if art.kind == "add":
        hidden = await _reference_norms(state)
        relative = {str(x): float(art.direction(x).float().norm()) / hidden[x] for x in art.layers}
    return VectorNorms(
        name=ref.base_name,
        sha256=art.sha256,
        kind=art.kind,
        method=art.method,
        layers=art.layers,
        norms=art.norms(),
        relative=relative,
    )
