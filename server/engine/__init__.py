"""The generation engine (SPEC §7, §9.1): continuous batching with per-row steering over a paged KV cache.

Modules, one concept each: :mod:`.params` (sampling settings), :mod:`.request` (handles, events, errors),
:mod:`.sequence` (request and row state), :mod:`.scheduler` (admission and token budgets),
:mod:`.kv_cache` (the page pool), :mod:`.attention` (paged attention), :mod:`.runner` (the forward pass),
:mod:`.sampler` (sampling operators), :mod:`.detokenizer` (incremental text and stop strings) and
:mod:`.engine` (the loop).
"""

from .engine import Engine
from .kv_cache import PagedKVCache
from .params import MAX_LOGIT_BIAS, MAX_N, MAX_TOP_LOGPROBS, SamplingParams, generation_defaults
from .request import (
    ContextLengthError,
    DrainingError,
    EngineEvent,
    GenerationResult,
    QueueFullError,
    RequestHandle,
    TokenLogprob,
)

__all__ = [
    "MAX_LOGIT_BIAS",
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "ContextLengthError",
    "DrainingError",
    "Engine",
    "EngineEvent",
    "GenerationResult",
    "PagedKVCache",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenLogprob",
    "generation_defaults",
]
