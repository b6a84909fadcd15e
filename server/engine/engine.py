"""The generation engine: continuous batching with per-row steering over a paged KV cache.

One background thread runs :meth:`Engine.step` in a loop:  schedule -> forward -> sample -> postprocess.

- schedule (:mod:`.scheduler`): drop cancelled rows, admit waiting requests by rows, KV capacity and
  steering slots, and plan the pass: one token per decoding row plus prompt chunks within
  ``max_batched_tokens``;
- forward (:mod:`.runner`): one packed pass over the paged cache, steering applied per token;
- sample (:mod:`.sampler`): penalties, bias, temperature, min-p, top-k, top-p, draws and log-probs,
  vectorised over the rows;
- postprocess: incremental detokenisation (:mod:`.detokenizer`), stop strings, EOS, length; finished
  rows leave at once and free their pages and slot.

Faults stay in their row: settings are validated before queueing; a failing forward pass is retried
row by row and only the rows that fail alone are failed; a failing draw fails its row only; a failed
steering-slot allocation fails its request and changes nothing else. The engine imports nothing from
the web layer: results go to a :class:`RequestHandle`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from steering_vectors import CompiledProfile, SlotsExhaustedError, SteeringHooks

from ..observer import NULL_OBSERVER, EngineObserver
from .attention import install_paged_attention
from .detokenizer import IncrementalDetokenizer
from .kv_cache import PagedKVCache
from .params import SamplingParams, generation_defaults
from .request import (
    ContextLengthError,
    DrainingError,
    EngineEvent,
    GenerationResult,
    QueueFullError,
    RequestHandle,
)
from .runner import ModelRunner, relayout_for_decode
from .sampler import RowSampler
from .scheduler import Scheduler
from .sequence import Group
from .sequence import Sequence as Seq

__all__ = ["Engine"]

log = logging.getLogger("steerserve.engine")


class Engine:
    """Continuous-batching generation over one model with per-row steering.

    ``hooks`` is the model's installed :class:`SteeringHooks` (``None`` serves unsteered only).
    ``kv_cache_tokens`` (default: the context length, at least 1,024 per row) is the KV cache's
    capacity over all rows, in tokens; ``max_batched_tokens`` bounds the tokens of one forward pass
    (decode tokens plus prompt chunks; default 2,048, at least ``max_batch_size``; beside decoding rows
    the scheduler's pacer takes fewer prompt tokens, see :mod:`.scheduler`);
    ``page_size`` is the KV page size in tokens.
    ``relayout_weights`` stores linear weights column-major on CPU, which MKL multiplies faster for
    decode-sized batches.
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
        kv_cache_tokens: int | None = None,
        max_batched_tokens: int | None = None,
        page_size: int = 64,
        relayout_weights: bool = True,
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
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.defaults = generation_defaults(getattr(model, "generation_config", None))
        heads = cfg.num_attention_heads
        self.cache = PagedKVCache(
            num_layers=cfg.num_hidden_layers,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            capacity_tokens=kv_cache_tokens or max(self.context_length, 1024 * max_batch_size),
            page_size=page_size,
            dtype=next(model.parameters()).dtype
            if next(model.parameters()).is_floating_point()
            else torch.float32,
            device=self.device,
        )
        max_batched_tokens = max_batched_tokens or max(2048, max_batch_size)
        self.scheduler = Scheduler(self.cache, max_rows=max_batch_size, max_batched_tokens=max_batched_tokens)
        self.sampler = RowSampler(max_batch_size, self.vocab_size, self.eos_ids, self.device)
        if relayout_weights:
            relayout_for_decode(model)
        self.attention = install_paged_attention(model)
        self.runner = ModelRunner(model, hooks, self.cache)
        self._observer = observer or NULL_OBSERVER
        self._texts: dict[int, str] = {}
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
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
            return not self.scheduler.running and not self.scheduler.waiting

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
        """Requests with rows in the batch."""
        return len({id(s.group) for s in self.scheduler.running})

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

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
        """Queue a request; raises :class:`DrainingError`, :class:`QueueFullError` or ``ValueError``
        (:class:`ContextLengthError` when it can never fit) before anything is queued."""
        if self.draining or self._stopping:
            raise DrainingError("server is draining; not accepting new requests")
        params = params.resolved(self.defaults)
        prompt = self._check(prompt_ids, params, profile)
        pages = self.scheduler.check(len(prompt), params.max_new_tokens, params.n)
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", loop, n=params.n)
        group = Group(handle, prompt, params, profile, time.monotonic(), pages)
        for i in range(params.n):
            gen = torch.Generator().manual_seed(params.seed + i) if params.seed is not None else None
            group.seqs.append(Seq(group, i, IncrementalDetokenizer(self.tokenizer, params.stop), gen))
        with self._cv:
            if len(self.scheduler.waiting) >= self.max_queue:
                raise QueueFullError(
                    f"queue full ({self.max_queue} waiting)", retry_after=self._retry_after()
                )
            self.scheduler.waiting.append(group)
            self._notify_queue()
            self._cv.notify_all()
        return handle

    def _check(self, prompt_ids: Sequence[int], params: SamplingParams, profile: CompiledProfile | None):
        if not prompt_ids:
            raise ValueError("prompt is empty")
        if params.max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"max_new_tokens {params.max_new_tokens} exceeds the cap of {self.max_new_tokens_cap}"
            )
        if len(prompt_ids) + params.max_new_tokens > self.context_length:  # before touching the ids
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens {params.max_new_tokens} exceeds "
                f"the context length of {self.context_length}"
            )
        prompt = [int(t) for t in prompt_ids]
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is not in the vocabulary of {self.vocab_size}")
        if profile is not None and not profile.is_identity:
            if self.hooks is None:
                raise ValueError("steering is disabled on this engine")
            self.hooks.check(profile)
        return prompt

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, profile: CompiledProfile | None = None
    ) -> GenerationResult:
        """Blocking convenience for in-process callers (the engine must be started): the result of
        sample 0 (use ``submit(...).wait_all()`` for n > 1)."""
        return self.submit(prompt_ids, params, profile).wait()

    def _retry_after(self) -> int:
        return max(1, min(60, len(self.scheduler.waiting) // max(1, self.max_batch_size)))

    def _notify_queue(self) -> None:
        self._observer.set_queue(running=self.running, waiting=len(self.scheduler.waiting))

    # ---- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            try:
                if not self.step():
                    with self._cv:
                        if not self.scheduler.waiting and not self._stopping:
                            self._cv.wait(timeout=0.05)
            except Exception as e:  # a fault of the engine itself: fail what runs, reset, carry on
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
        with self._cv:
            leftover = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
        for seq in list(self.scheduler.running) + [s for g in leftover for s in g.seqs]:
            self._finish(seq, "cancelled")
        self._notify_queue()

    def step(self) -> bool:
        """One iteration: schedule -> forward -> sample -> postprocess. False when there was nothing to do."""
        self._reap_cancelled()
        self._admit()
        works, failed = self.scheduler.plan()
        for seq, err in failed:
            self._fail(seq, err)
        if not works:
            return False
        t0 = time.perf_counter()
        out = self.runner.run(works)
        n_decode = sum(w.decode for w in works)
        self.scheduler.pacer.observe(
            n_decode, sum(len(w.tokens) for w in works) - n_decode, time.perf_counter() - t0
        )
        self._observer.observe_batch(len(works))
        rows: list[Seq] = []
        logits: list[torch.Tensor] = []
        for i, w in enumerate(works):
            if i in out.failed:
                self._fail(w.seq, out.failed[i])
                continue
            w.seq.cached += len(w.tokens)
            if i in out.logits:
                forking = w.seq.group.params.n > 1 and not w.seq.out  # siblings copy the prompt's cache now
                try:
                    drawn = self.scheduler.fork(w.seq) if forking else [w.seq]
                except Exception as e:  # noqa: BLE001 - that request fails, the others go on
                    self._fail(w.seq, e)
                    continue
                rows += drawn
                logits += [out.logits[i]] * len(drawn)
        if rows:
            self._sample_and_emit(rows, torch.stack(logits))
        return True

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self.scheduler.running if s.group.handle.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._cv:
                waiting = self.scheduler.waiting
                while waiting and waiting[0].handle.cancelled:  # gave up while queued: its place goes
                    for seq in waiting.popleft().seqs:
                        self._finish(seq, "cancelled")
                if not waiting or not self.scheduler.fits(waiting[0]):
                    return
                group = waiting.popleft()
            try:
                if group.profile is not None and self.hooks is not None:
                    group.slot = self.hooks.acquire(group.profile)  # allocates first; rolls back on failure
            except SlotsExhaustedError:  # wait for rows to finish and free their slots
                with self._cv:
                    self.scheduler.waiting.appendleft(group)
                return
            except Exception as e:  # noqa: BLE001 - this request's allocation failed; nothing changed
                log.exception("steering slot allocation failed")
                for seq in group.seqs:
                    self._finish(seq, "error", error=f"steering slot allocation failed: {e}")
                continue
            with self._cv:
                self.scheduler.start(group)
                self._notify_queue()
            group.admitted = time.monotonic()
            self._observer.observe_queue_wait(group.admitted - group.arrival)
            for seq in group.seqs:
                self.sampler.reset(seq)

    # ---- sampling and postprocessing ---------------------------------------------------------------
    def _sample_and_emit(self, rows: list[Seq], logits: torch.Tensor) -> None:
        drawn = self.sampler.draw(rows, logits, self._token_text)
        now = time.monotonic()
        for seq, result in zip(rows, drawn, strict=True):
            if isinstance(result, BaseException):
                self._fail(seq, result)
                continue
            tok, lp = result
            if not seq.out and seq.index == 0:
                seq.group.handle.timings["ttft"] = now - seq.group.arrival
                self._observer.observe_ttft(now - seq.group.arrival)
            elif seq.out:
                self._observer.observe_inter_token(now - seq.last_token_time)
            seq.last_token_time = now
            seq.out.append(tok)
            self._postprocess(seq, tok, lp)

    def _postprocess(self, seq: Seq, tok: int, lp: Any) -> None:
        p = seq.params
        hit_eos = tok in self.eos_ids and not p.ignore_eos
        if lp is not None and not hit_eos:
            seq.pending_logprobs.append(lp)
        check_stop = len(seq.out) >= p.min_tokens
        if hit_eos:
            text, stopped = seq.detok.flush(check_stop=check_stop)
            return self._finish(seq, "stop", text)
        text, stopped = seq.detok.add(tok, check_stop=check_stop)
        if stopped:
            return self._finish(seq, "stop", text)
        if len(seq.out) >= p.max_new_tokens:
            rest, stopped = seq.detok.flush(check_stop=check_stop)
            return self._finish(seq, "stop" if stopped else "length", text + rest)
        if text:
            seq.group.handle._push(EngineEvent(text, index=seq.index, logprobs=tuple(seq.pending_logprobs)))
            seq.pending_logprobs.clear()

    def _token_text(self, ids: list[int]) -> list[str]:
        """Text of single tokens (for log-probs), cached per id (at most the vocabulary)."""
        cache = self._texts
        for i in ids:
            if i not in cache:
                cache[i] = self.tokenizer.decode([i])
        return [cache[i] for i in ids]

    def _fail(self, seq: Seq, err: BaseException) -> None:
        """A row's own fault: it alone ends with an error (a failed prefill fails its siblings too)."""
        log.error("request %s sample %d failed: %r", seq.group.handle.id, seq.index, err)
        targets = seq.group.seqs if seq.index == 0 and not seq.out else [seq]
        for s in targets:
            self._finish(s, "error", error=f"{type(err).__name__}: {err}")

    def _finish(self, seq: Seq, reason: str, text: str = "", error: str | None = None) -> None:
        if seq.finish is not None:
            return
        seq.finish = reason
        group, handle = seq.group, seq.group.handle
        if error is not None:
            handle.timings["error"] = 1.0
        completion = len(seq.out) - (
            1 if seq.out and seq.out[-1] in self.eos_ids and not seq.params.ignore_eos else 0
        )
        with self._cv:
            self.scheduler.remove(seq)
        done = group.done
        if done:
            handle.timings["total"] = time.monotonic() - group.arrival
            if group.slot and self.hooks is not None:  # freed before the caller hears the request ended
                self.hooks.release(group.slot)
                group.slot = 0
        # counted before the caller hears of it: a client that has its response sees its tokens in /metrics
        self._observer.add_tokens(prompt=len(group.prompt) if seq.index == 0 else 0, generated=completion)
        self._notify_queue()
        handle._push(
            EngineEvent(
                text,
                finish_reason=reason,
                prompt_tokens=len(group.prompt),
                completion_tokens=completion,
                index=seq.index,
                logprobs=tuple(seq.pending_logprobs),
                error=error,
            )
        )
        seq.pending_logprobs.clear()
