"""Attention over the paged KV cache for a packed batch, registered with transformers' AttentionInterface.

A step's tokens are packed into one sequence ``[1, N]``: first one token per decoding row, then the
prompt chunks of rows being prefilled. Linear layers, hooks and the LM head see exactly N tokens (no
padding); only attention needs to know the rows apart, and does it in two groups:

- decode rows, all at once, page by page (flash-decoding): every page p below the cache's high-water
  mark is attended by the query of the row that owns it, giving a partial output o_p and its
  log-sum-exp l_p; a row's output is  ``sum_p exp(l_p - m) o_p / sum_p exp(l_p - m)``  over its pages
  (m = the row's max l_p). Keys and values are read in place: nothing is gathered or copied.
- each prompt chunk on its own: its row's pages are gathered (that row only) and attended causally.
  A step with a single decode row whose context is short (< ``LONE_ROW_GATHER_MAX`` tokens) attends it
  this way too, as a chunk of one token: there the gather costs less than the per-page partials and
  their merge (measured per layer, SmolLM2, one thread: 29 vs 95 us at 128 tokens, 221 vs 252 at 1,024,
  658 vs 569 at 2,048, 6,575 vs 1,426 at 8,000).

Grouped-query attention never repeats keys: the ``g = H_q / H_kv`` query heads that share a key head
are folded into the query length, ``[.., H_q, T, D] -> [.., H_kv, g*T, D]``.

Without a plan in the call (anyone else running the model) the original implementation runs unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv_cache import PagedKVCache

__all__ = [
    "LONE_ROW_GATHER_MAX",
    "PLAN_KWARG",
    "AttentionPlan",
    "ChunkSpan",
    "PagedAttention",
    "attend_pages",
    "combine_pages",
    "install_paged_attention",
    "paged_attention",
]

PLAN_KWARG = "steer_plan"  # the forward keyword argument that carries the plan down to attention
LONE_ROW_GATHER_MAX = 1024  # a lone decode row with fewer cached tokens is attended as a 1-token chunk
_PREFIX = "steerserve_paged_"


@dataclass
class ChunkSpan:
    """A prompt chunk: packed tokens ``[start, stop)`` at row positions ``[pos0, pos0 + stop - start)``."""

    start: int
    stop: int
    pages: torch.Tensor  # [n_p] the row's pages covering positions [0, pos0 + stop - start)
    bias: torch.Tensor  # [1, 1, g*T, n_p * page_size] 0 where key position <= query position, else -inf
    # ^ rows g-major like the folded query: row i*T + t is query head i of the group at token t


@dataclass
class AttentionPlan:
    """Where one forward pass writes its keys/values and which cache entries each query reads."""

    cache: PagedKVCache
    write_page: torch.Tensor  # [N] page of each packed token
    write_off: torch.Tensor  # [N] offset in that page
    num_decode: int = 0  # packed tokens [0, num_decode) are decode rows, one token each
    scan_pages: int = 0  # decode attention reads pages [0, scan_pages)
    page_owner: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    # ^ [scan_pages] decode row per page; num_decode = nobody
    page_bias: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    # ^ [scan_pages, 1, 1, page_size] 0 where the owner may attend, -inf elsewhere
    chunks: list[ChunkSpan] = field(default_factory=list)


def _cpu_flash(q, k, v, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )


def attend_pages(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each page on its own: q [P, H, G, D], k/v [P, H, bs, D], bias [P, 1, 1, bs].

    Returns o [P, H, G, D] = softmax(q k^T * scale + bias) v and lse [P, H, G] = logsumexp of the scores.
    """
    if q.device.type == "cpu":
        o, lse = _cpu_flash(q, k, v, bias.to(q.dtype), scale)
        return o, lse.float()
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale + bias.float()  # [P, H, G, bs]
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


def combine_pages(o: torch.Tensor, lse: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    """Merge per-page partial outputs into per-row outputs: o [P, H, G, D], lse [P, H, G], owner [P].

    out[r] = sum_{p: owner[p]=r} exp(lse_p - m_r) o_p / sum_{p: owner[p]=r} exp(lse_p - m_r),
    m_r = max_{p: owner[p]=r} lse_p. Pages owned by ``rows`` (nobody) land in a discarded extra row.
    """
    idx = owner[:, None, None].expand_as(lse)  # [P, H, G]
    m = torch.full((rows + 1, *lse.shape[1:]), float("-inf"), device=lse.device)
    m = m.scatter_reduce(0, idx, lse, reduce="amax")  # [R+1, H, G]
    w = torch.exp(lse - m[owner])  # [P, H, G]
    den = torch.zeros_like(m).index_add_(0, owner, w)  # [R+1, H, G]
    num = torch.zeros(rows + 1, *o.shape[1:], device=o.device).index_add_(0, owner, o.float() * w[..., None])
    return (num[:rows] / den[:rows, ..., None]).to(o.dtype)  # [R, H, G, D]


def _decode(q, plan, k_cache, v_cache, scale) -> torch.Tensor:
    n, h_kv = plan.num_decode, k_cache.shape[0]
    qd = q[0, :, :n].transpose(0, 1)  # [n, H_q, D]
    qd = qd.reshape(n, h_kv, -1, qd.shape[-1])  # [n, H_kv, g, D]: the g query heads of a key head
    P = plan.scan_pages
    qp = qd[plan.page_owner.clamp(max=n - 1)]  # [P, H_kv, g, D]
    k, v = k_cache[:, :P].transpose(0, 1), v_cache[:, :P].transpose(0, 1)  # [P, H_kv, bs, D] views
    o, lse = attend_pages(qp, k, v, plan.page_bias, scale)
    return combine_pages(o, lse, plan.page_owner, n).reshape(n, -1, qd.shape[-1])  # [n, H_q, D]


def _chunk(q, span: ChunkSpan, k_cache, v_cache, scale) -> torch.Tensor:
    h_kv, T = k_cache.shape[0], span.stop - span.start
    g = q.shape[1] // h_kv
    k = k_cache.index_select(1, span.pages).view(1, h_kv, -1, k_cache.shape[-1])  # [1, H_kv, S, D]
    v = v_cache.index_select(1, span.pages).view(1, h_kv, -1, v_cache.shape[-1])  # the row's pages, in order
    qc = q[:, :, span.start : span.stop].reshape(1, h_kv, g * T, -1)  # [1, H_kv, g*T, D]
    o = F.scaled_dot_product_attention(qc, k, v, attn_mask=span.bias, scale=scale)  # [1, H_kv, g*T, D]
    return o.reshape(h_kv * g, T, -1).transpose(0, 1)  # [T, H_q, D]


def paged_forward(module: nn.Module, query, key, value, plan: AttentionPlan, scaling: float | None):
    """Write this step's keys/values into the cache, then attend. query [1, H_q, N, D] -> [1, N, H_q, D]."""
    layer = module.layer_idx
    cache = plan.cache
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [H_kv, P, bs, D]
    k_cache[:, plan.write_page, plan.write_off] = key[0].to(k_cache.dtype)  # [H_kv, N, D]
    v_cache[:, plan.write_page, plan.write_off] = value[0].to(v_cache.dtype)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query.to(k_cache.dtype)
    out = torch.empty(query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    if plan.num_decode:
        out[: plan.num_decode] = _decode(q, plan, k_cache, v_cache, scale)
    for span in plan.chunks:
        out[span.start : span.stop] = _chunk(q, span, k_cache, v_cache, scale)
    return out[None], None


class PagedAttention:
    """Handle of the paged attention registration on one model; ``remove()`` restores the original."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        current: str = model.config._attn_implementation or "eager"
        self.original = current.removeprefix(_PREFIX)  # installing twice wraps the original once
        self.name = f"{_PREFIX}{self.original}"
        fallback = ALL_ATTENTION_FUNCTIONS.get_interface(self.original, None)
        if fallback is None and self.original != "eager":
            raise ValueError(f"unknown attention implementation {self.original!r}")

        def dispatch(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
            plan = kwargs.pop(PLAN_KWARG, None)
            if plan is None:
                fn = fallback or sys.modules[type(module).__module__].eager_attention_forward
                return fn(module, query, key, value, attention_mask, **kwargs)
            return paged_forward(module, query, key, value, plan, kwargs.get("scaling"))

        AttentionInterface.register(self.name, dispatch)
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(self.original)
        if mask_fn is not None:
            AttentionMaskInterface.register(self.name, mask_fn)
        model.config._attn_implementation = self.name

    def remove(self) -> None:
        """Put the model's original attention implementation back."""
        if self.model.config._attn_implementation == self.name:
            self.model.config._attn_implementation = self.original

    def __enter__(self) -> PagedAttention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_paged_attention(model: nn.Module) -> PagedAttention:
    """Route the model's attention through the paged cache when a forward pass carries a plan."""
    return PagedAttention(model)


@contextmanager
def paged_attention(model: nn.Module) -> Iterator[PagedAttention]:
    """Context-manager twin of :func:`install_paged_attention`."""
    handle = install_paged_attention(model)
    try:
        yield handle
    finally:
        handle.remove()
