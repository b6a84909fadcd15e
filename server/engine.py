"""The generation engine: iteration-level (continuous) batching with per-row steering slots.

One background thread runs the loop  schedule -> forward -> sample -> postprocess:

- schedule: drop cancelled rows, admit waiting requests (up to ``max_batch_size`` rows) between decode
  steps; each admitted request acquires a steering slot for its compiled profile;
- forward: new requests are prefilled together (left padded, their own KV cache), then their cache is
  merged into the running batch's; every step decodes one token for all running rows at once;
- sample: greedy / temperature / top-k / top-p per row, vectorised over the batch;
- postprocess: incremental detokenisation, stop strings, EOS, length; finished rows leave at once.

The engine imports nothing from the web layer: results go to a :class:`RequestHandle` that an asyncio
caller awaits (or a thread blocks on). It never touches the network.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from steering_vectors import CompiledProfile, SlotsExhaustedError, SteeringHooks

from .observer import NULL_OBSERVER, EngineObserver

__all__ = [
    "ContextLengthError",
    "DrainingError",
    "Engine",
    "EngineEvent",
    "GenerationResult",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
]

log = logging.getLogger("steerserve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is full (HTTP 429); ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DrainingError(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class ContextLengthError(ValueError):
    """Prompt plus max_new_tokens do not fit the model's context (HTTP 400)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature == 0`` is greedy; ``top_k == 0`` means no limit."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if len(self.stop) > 8 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop: at most 8 non-empty strings of at most 256 characters")


@dataclass(frozen=True)
class EngineEvent:
    """A streamed piece of output: a text delta, and on the last event the finish reason and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class RequestHandle:
    """The caller's side of one request: stream events, await the result, or cancel."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self._loop = loop
        self._aq: asyncio.Queue[EngineEvent] | None = asyncio.Queue() if loop is not None else None
        self._tq: queue.Queue[EngineEvent] = queue.Queue()
        self.cancelled = False
        self.timings: dict[str, float] = {}

    def cancel(self) -> None:
        """Ask the engine to drop this request; its row is freed before the next decode step."""
        self.cancelled = True

    def _push(self, event: EngineEvent) -> None:
        if self._aq is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._tq.put(event)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Yield events until the one that carries ``finish_reason``."""
        if self._aq is None:
            raise RuntimeError("this handle was submitted without an event loop; use wait()")
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finish_reason is not None:
                return

    async def result(self) -> GenerationResult:
        """Await the whole output."""
        return self._collect([ev async for ev in self.events()])

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block (in a non-async caller) until the request finishes."""
        events = [self._tq.get(timeout=timeout)]
        while events[-1].finish_reason is None:
            events.append(self._tq.get(timeout=timeout))
        return self._collect(events)

    def _collect(self, events: list[EngineEvent]) -> GenerationResult:
        last = events[-1]
        return GenerationResult(
            "".join(ev.text for ev in events),
            last.finish_reason or "cancelled",
            last.prompt_tokens,
            last.completion_tokens,
            dict(self.timings),
        )


@dataclass
class _Seq:
    """Engine-side state of one request."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    profile: CompiledProfile | None
    arrival: float
    generator: torch.Generator | None
    slot: int = 0
    out: list[int] = field(default_factory=list)
    pos: int = 0  # position id of the next token
    sent: int = 0  # characters of text already streamed
    last_token_time: float = 0.0
    finish: str | None = None


class Engine:
    """Continuous-batching generation over one model with per-row steering.

    ``hooks`` is the model's installed :class:`SteeringHooks` (``None`` serves unsteered only).
    ``observer`` (an :class:`~server.observer.EngineObserver`, e.g. :class:`server.metrics.Metrics`) gets
    the loop's callbacks: queue sizes, queue wait, rows per step, time to first token, inter-token time,
    token counts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        hooks: SteeringHooks | None = None,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_new_tokens_cap: int = 2048,
        context_length: int | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer, self.hooks = model, tokenizer, hooks
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_new_tokens_cap = max_new_tokens_cap
        cfg = model.config
        self.context_length = context_length or int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        )
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._observer = observer or NULL_OBSERVER
        self._waiting: deque[_Seq] = deque()
        self._rows: list[_Seq] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, S] 1 = real token, 0 = padding
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._rng = torch.Generator().manual_seed(torch.seed())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="steerserve-engine", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Refuse new requests from now on; the ones already accepted run to completion."""
        self.draining = True
        with self._cv:
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return not self._rows and not self._waiting

    def stop(self, timeout: float = 5.0) -> None:
        """Drain, wait up to ``timeout`` for in-flight requests, then stop the loop."""
        self.drain()
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping = True
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- submission ----------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        profile: CompiledProfile | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request; raises :class:`DrainingError`, :class:`QueueFullError` or ``ValueError``."""
        if self.draining or self._stopping:
            raise DrainingError("server is draining; not accepting new requests")
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if params.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens {params.max_new_tokens} exceeds the cap of {self.max_new_tokens_cap}"
            )
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens {params.max_new_tokens} exceeds "
                f"the context length of {self.context_length}"
            )
        if profile is not None and not profile.is_identity and self.hooks is None:
            raise ValueError("steering is disabled on this engine")
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", loop)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = _Seq(
            handle=handle,
            prompt=list(prompt_ids),
            params=params,
            profile=profile,
            arrival=time.monotonic(),
            generator=gen,
        )
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"queue full ({self.max_queue} waiting)", retry_after=self._retry_after()
                )
            self._waiting.append(seq)
            self._notify_queue()
            self._cv.notify_all()
        return handle

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, profile: CompiledProfile | None = None
    ) -> GenerationResult:
        """Blocking convenience for in-process callers (the engine must be started)."""
        return self.submit(prompt_ids, params, profile).wait()

    def _retry_after(self) -> int:
        return max(1, min(60, len(self._waiting) // max(1, self.max_batch_size)))

    def _notify_queue(self) -> None:
        self._observer.set_queue(running=len(self._rows), waiting=len(self._waiting))

    # ---- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            try:
                self._schedule()
                if not self._rows:
                    with self._cv:
                        if not self._waiting and not self._stopping:
                            self._cv.wait(timeout=0.05)
                    continue
                self._decode_step()
            except Exception as e:  # one bad batch must not kill the server: fail its requests
                log.exception("engine step failed")
                for seq in self._rows:
                    self._finish(seq, "error", error=str(e))
                self._rows, self._cache, self._mask = [], None, None
                self._notify_queue()
        with self._cv:
            leftover = list(self._waiting) + self._rows
            self._waiting.clear()
            self._rows, self._cache, self._mask = [], None, None  # idle() is true once stopped
        for seq in leftover:
            self._finish(seq, "cancelled")
        self._notify_queue()

    def _schedule(self) -> None:
        # free cancelled rows first (a client that disconnected frees its row)
        if any(s.handle.cancelled for s in self._rows):
            keep = [i for i, s in enumerate(self._rows) if not s.handle.cancelled]
            for s in self._rows:
                if s.handle.cancelled:
                    self._finish(s, "cancelled")
            self._select_rows(keep)
        new: list[_Seq] = []
        with self._cv:
            dropped = [s for s in self._waiting if s.handle.cancelled]
            if dropped:  # a client that gave up while queued frees its place at once
                self._waiting = deque(s for s in self._waiting if not s.handle.cancelled)
            while self._waiting and len(self._rows) + len(new) < self.max_batch_size:
                seq = self._waiting[0]
                if seq.profile is not None and self.hooks is not None:
                    try:
                        seq.slot = self.hooks.acquire(seq.profile)
                    except SlotsExhaustedError:
                        break  # wait for rows to finish and free their slots
                self._waiting.popleft()
                new.append(seq)
            if dropped or new:
                self._observer.set_queue(running=len(self._rows) + len(new), waiting=len(self._waiting))
        for seq in dropped:
            self._finish(seq, "cancelled")
        if new:
            now = time.monotonic()
            for seq in new:
                self._observer.observe_queue_wait(now - seq.arrival)
            self._prefill(new)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache,
        slots: list[int],
        generated: bool,
    ) -> torch.Tensor:
        """One model call; returns the last position's logits [B, V] in float32."""
        kwargs = {self._cache_kw: cache}
        if self.hooks is not None:
            self.hooks.set_batch(slots, generated=generated)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        finally:
            if self.hooks is not None:
                self.hooks.clear_batch()
        self._observer.observe_batch(ids.shape[0])
        return out.logits[:, -1].float()

    def _prefill(self, new: list[_Seq]) -> None:
        T = max(len(s.prompt) for s in new)
        ids = torch.full((len(new), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(new), T, dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, T - len(s.prompt) :] = torch.tensor(s.prompt)
            mask[i, T - len(s.prompt) :] = 1
            s.pos = len(s.prompt)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = DynamicCache()
        logits = self._forward(
            ids.to(self.device),
            mask.to(self.device),
            pos.to(self.device),
            cache,
            [s.slot for s in new],
            generated=False,
        )
        self._merge(new, cache, mask.to(self.device))
        self._sample_and_emit(new, logits)

    def _decode_step(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.out[-1]] for s in rows], dtype=torch.long, device=self.device)  # [B, 1]
        pos = torch.tensor([[s.pos] for s in rows], dtype=torch.long, device=self.device)  # [B, 1]
        assert self._mask is not None and self._cache is not None  # noqa: S101 - internal invariant
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)  # [B, S+1]
        logits = self._forward(ids, self._mask, pos, self._cache, [s.slot for s in rows], generated=True)
        self._sample_and_emit(rows, logits)

    # ---- KV cache bookkeeping ----------------------------------------------------------------------
    @staticmethod
    def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    def _merge(self, new: list[_Seq], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache [b, H, T, D], mask [b, T]) to the running batch."""
        if not self._rows or self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = list(new), cache, mask
            return
        s_old, s_new = self._mask.shape[1], mask.shape[1]
        S = max(s_old, s_new)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a = self._pad_left(getattr(old_layer, name), S - s_old, dim=-2)
                b = self._pad_left(getattr(new_layer, name), S - s_new, dim=-2)
                setattr(old_layer, name, torch.cat([a, b], dim=0))
        self._mask = torch.cat([self._pad_left(self._mask, S - s_old, 1), self._pad_left(mask, S - s_new, 1)])
        self._rows = self._rows + list(new)

    def _select_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim cache columns that are padding in every remaining row."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = [], None, None
            self._notify_queue()
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)
        first = int(mask.any(0).nonzero()[0])  # leading all-padding columns can go
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        self._notify_queue()

    # ---- sampling and postprocessing ---------------------------------------------------------------
    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Pick one token per row from ``logits`` [B, V] (float32), vectorised across rows."""
        greedy = logits.argmax(-1)  # [B]
        temps = torch.tensor([s.params.temperature for s in seqs])
        if bool((temps == 0).all()):
            return greedy.tolist()
        t = temps.clamp(min=1e-5).to(logits.device)[:, None]  # [B, 1]
        probs_sorted, order = torch.sort(torch.softmax(logits / t, dim=-1), dim=-1, descending=True)  # [B, V]
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # [1, V]
        top_k = torch.tensor([s.params.top_k or logits.shape[-1] for s in seqs], device=logits.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        cum = probs_sorted.cumsum(-1)
        keep = (rank < top_k[:, None]) & ((cum - probs_sorted) < top_p[:, None])  # the first always stays
        probs_sorted = probs_sorted * keep
        cdf = probs_sorted.cumsum(-1)  # [B, V]
        u = torch.stack([torch.rand((), generator=s.generator or self._rng) for s in seqs])  # [B]
        u = u.to(logits.device)[:, None] * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)  # [B, 1]
        sampled = order.gather(-1, choice)[:, 0]
        return torch.where(temps.to(logits.device) == 0, greedy, sampled).tolist()

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        tokens = self._sample(seqs, logits)
        now = time.monotonic()
        for s, tok in zip(seqs, tokens, strict=True):
            if not s.out:
                s.handle.timings["ttft"] = now - s.arrival
                self._observer.observe_ttft(now - s.arrival)
            else:
                self._observer.observe_inter_token(now - s.last_token_time)
            s.last_token_time = now
            s.out.append(tok)
            s.pos += 1
            self._postprocess(s, tok)
        done = [i for i, s in enumerate(self._rows) if s.finish is not None]
        if done:
            self._select_rows([i for i, s in enumerate(self._rows) if s.finish is None])

    def _postprocess(self, s: _Seq, tok: int) -> None:
        hit_eos = tok in self.eos_ids
        text = self.tokenizer.decode(s.out[:-1] if hit_eos else s.out, skip_special_tokens=True)
        reason = "stop" if hit_eos else None
        cut = len(text)
        for stop in s.params.stop:
            i = text.find(stop, max(0, s.sent - len(stop)))
            if i != -1 and i < cut:
                cut, reason = i, "stop"
        if reason is None and len(s.out) >= s.params.max_new_tokens:
            reason = "length"
        if reason is None:
            # hold back a partial UTF-8 character and any tail that could begin a stop string
            safe = len(text) - (1 if text.endswith("\ufffd") else 0)
            for stop in s.params.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        safe = min(safe, len(text) - k)
                        break
            if safe > s.sent:
                s.handle._push(EngineEvent(text[s.sent : safe]))
                s.sent = safe
            return
        self._finish(s, reason, final_text=text[:cut])

    def _finish(self, s: _Seq, reason: str, final_text: str | None = None, error: str | None = None) -> None:
        if s.finish is not None:
            return
        s.finish = reason
        delta = final_text[s.sent :] if final_text is not None and len(final_text) > s.sent else ""
        if error is not None:
            s.handle.timings["error"] = 1.0
        s.handle.timings["total"] = time.monotonic() - s.arrival
        completion = len(s.out) - (1 if s.out and s.out[-1] in self.eos_ids else 0)
        # counted before the caller hears of it: a client that has its response sees its tokens in /metrics
        self._observer.add_tokens(prompt=len(s.prompt), generated=completion)
        self._observer.set_queue(
            running=sum(r.finish is None for r in self._rows), waiting=len(self._waiting)
        )
        s.handle._push(
            EngineEvent(
                delta, finish_reason=reason, prompt_tokens=len(s.prompt), completion_tokens=completion
            )
        )
        if s.slot and self.hooks is not None:
            self.hooks.release(s.slot)
            s.slot = 0
