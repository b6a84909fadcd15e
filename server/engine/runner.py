"""The model runner: one packed forward pass per step, with steering, over the paged KV cache.

The step's tokens go in as one sequence ``[1, N]`` (decode tokens first, then prompt chunks), with their
own position ids; attention finds each row's cache through an :class:`AttentionPlan`; the steering hooks
get the per-token slot map; the LM head runs only on the positions whose logits are wanted.

A failing pass is retried one work at a time, so only the rows whose own pass fails are reported as
failed: the cache writes land at fixed places, so running a row's tokens again is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from steering_vectors import SteeringHooks

from .attention import LONE_ROW_GATHER_MAX, PLAN_KWARG, AttentionPlan, ChunkSpan
from .kv_cache import PagedKVCache
from .sequence import Work

__all__ = ["ModelRunner", "StepOutput"]


class StepOutput:
    """Logits [S, V] (float32) of the works that sample, and the works whose pass failed."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}  # work index -> [V]
        self.failed: dict[int, BaseException] = {}  # work index -> error


class ModelRunner:
    """Runs packed forward passes of ``model`` with ``hooks`` (may be None) over ``cache``."""

    def __init__(self, model: nn.Module, hooks: SteeringHooks | None, cache: PagedKVCache) -> None:
        self.model, self.hooks, self.cache = model, hooks, cache
        self.device = next(model.parameters()).device
        self.group = model.config.num_attention_heads // cache.k.shape[1]  # query heads per key/value head
        self._dummy_mask = torch.zeros(1, 1, 1, 1, device=self.device)  # 4-D: transformers builds no mask

    def run(self, works: Sequence[Work]) -> StepOutput:
        """Forward ``works``; on an error, each work alone, to find the ones that fail."""
        out = StepOutput()
        try:
            self._collect(out, works, range(len(works)), self.forward(works))
        except Exception:  # noqa: BLE001 - isolate the culprit below
            if len(works) == 1:
                raise
            for i, w in enumerate(works):
                try:
                    self._collect(out, works, [i], self.forward([w]))
                except Exception as e:  # noqa: BLE001 - reported to that row's caller
                    out.failed[i] = e
        return out

    @staticmethod
    def _collect(
        out: StepOutput, works: Sequence[Work], indices: Sequence[int], logits: torch.Tensor
    ) -> None:
        rows = iter(logits)
        for i in indices:
            if works[i].samples:
                out.logits[i] = next(rows)

    def forward(self, works: Sequence[Work]) -> torch.Tensor:
        """One pass; returns the logits [S, V] (float32) of the works with ``samples``, in order."""
        ids = [t for w in works for t in w.tokens]
        pos = [p for w in works for p in range(w.start, w.start + len(w.tokens))]
        plan = self._plan(works)
        keep, at = [], 0
        for w in works:
            at += len(w.tokens)
            if w.samples:
                keep.append(at - 1)
        dev = self.device
        if self.hooks is not None:
            decode_slots = [w.seq.group.slot for w in works if w.decode]
            chunks = [(w.seq.group.slot, len(w.tokens)) for w in works if not w.decode]
            self.hooks.set_packed(decode_slots, chunks)
        try:
            out = self.model(
                input_ids=torch.tensor([ids], device=dev),
                position_ids=torch.tensor([pos], device=dev),
                attention_mask=self._dummy_mask,
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
                **{PLAN_KWARG: plan},
            )
        finally:
            if self.hooks is not None:
                self.hooks.clear_batch()
        return out.logits[0].float()  # [S, V]

    def _plan(self, works: Sequence[Work]) -> AttentionPlan:
        cache, bs = self.cache, self.cache.page_size
        pages, offs = zip(
            *(cache.slots(w.seq.pages, w.start, w.start + len(w.tokens)) for w in works), strict=True
        )
        plan = AttentionPlan(cache, torch.cat(pages).to(self.device), torch.cat(offs).to(self.device))
        decodes = [w for w in works if w.decode]
        lone = len(decodes) == 1 and decodes[0].start < LONE_ROW_GATHER_MAX  # a 1-token chunk (attention.py)
        paged = [] if lone else decodes
        if paged:
            n, P = len(paged), cache.high_water
            owner = [n] * P
            valid = [bs] * P
            for i, w in enumerate(paged):
                length = w.start + 1  # the row's tokens once this one is written
                for j, page in enumerate(w.seq.pages[: cache.pages_for(length)]):
                    owner[page], valid[page] = i, min(bs, length - j * bs)
            cols = torch.arange(bs)[None, :]  # [1, bs]
            bias = torch.where(cols < torch.tensor(valid)[:, None], 0.0, float("-inf"))  # [P, bs]
            plan.num_decode, plan.scan_pages = n, P
            plan.page_owner = torch.tensor(owner, device=self.device)
            plan.page_bias = bias[:, None, None, :].to(self.device, cache.k.dtype)
        start = len(paged)
        for w in works[len(paged) :]:
            T, stop = len(w.tokens), w.start + len(w.tokens)
            n_p = cache.pages_for(stop)
            q_pos = torch.arange(w.start, stop)[:, None]  # [T, 1]
            bias = torch.where(torch.arange(n_p * bs)[None, :] <= q_pos, 0.0, float("-inf"))  # [T, n_p*bs]
            plan.chunks.append(
                ChunkSpan(
                    start,
                    start + T,
                    torch.tensor(w.seq.pages[:n_p], device=self.device),
                    bias.repeat(self.group, 1)[None, None].to(self.device, cache.k.dtype),  # [1, 1, g*T, S]
                )
            )
            start += T
        return plan


def relayout_for_decode(model: nn.Module) -> int:
    """Store each float ``nn.Linear`` weight [out, in] of a CPU model column-major (as the transpose of a
    contiguous [in, out] tensor). The values do not change; MKL's sgemm reads this layout 1.3-1.9x
    faster for the few rows of a decode step (measured here, 1 thread, [8, 576] x [576, 1536]:
    270 vs 517 us). The model's other CPU parameters are copied as well, so that nothing keeps the
    loaded checkpoint's memory map alive beside the copies. Returns the number of weights relaid out."""
    done = 0
    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():  # first the linear weights (a tied embedding shares the LM head's)
            w = getattr(mod, "weight", None)
            if type(mod) is nn.Linear and w is not None and w.device.type == "cpu" and w.is_floating_point():
                if id(w) not in seen and w.dim() == 2 and w.stride(0) != 1:
                    w.data = w.data.t().contiguous().t()
                    done += 1
                seen.add(id(w))
        for p in model.parameters():  # then the rest
            if id(p) not in seen and p.device.type == "cpu":
                seen.add(id(p))
                p.data = p.data.clone()
    return done
