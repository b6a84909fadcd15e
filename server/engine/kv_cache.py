"""Paged KV cache: one preallocated pool of pages per layer, budgeted in tokens.

The pool holds ``num_pages`` pages of ``page_size`` tokens for every layer, keys and values:

    k, v: [L, H_kv, P, page_size, D]      (L layers, H_kv key/value heads, P pages, D head dim)

A row owns a list of pages; token t of the row lives in page ``pages[t // page_size]`` at offset
``t % page_size``. Nothing is copied per step: a forward pass writes the new tokens' keys and values at
their fixed places, and attention reads the pages in place (see :mod:`server.engine.attention`).
Because writes go to fixed places, a step can be retried: it rewrites the same slots. Heads come before
pages so that a row's pages, gathered, are already its keys in order: ``k[l].index_select(1, pages)`` is
``[H_kv, n_p, page_size, D]``, a view of ``[H_kv, n_p * page_size, D]`` (no second copy).

Pages are handed out lowest index first, so the pages in use stay packed at the start of the pool and
the decode attention, which reads the prefix ``[0, high_water)``, touches little beyond them.

Memory: ``bytes = 2 * L * P * page_size * H_kv * D * itemsize`` (keys and values), i.e.
``bytes_per_token * kv_cache_tokens`` with ``bytes_per_token = 2 * L * H_kv * D * itemsize``
(SmolLM2-135M in float32: 2 * 30 * 3 * 64 * 4 = 46,080 bytes per token).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

__all__ = ["KVCacheFullError", "PagedKVCache"]


class KVCacheFullError(RuntimeError):
    """Not enough free pages (the scheduler's reservations make this an internal error)."""


class PagedKVCache:
    """The page pool and its allocator. Not thread-safe: the engine thread owns it."""

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        page_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if page_size < 1 or capacity_tokens < page_size:
            raise ValueError(
                f"kv_cache_tokens ({capacity_tokens}) must be at least one page of {page_size} tokens"
            )
        self.page_size = page_size
        self.num_pages = math.ceil(capacity_tokens / page_size)
        shape = (num_layers, kv_heads, self.num_pages, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, H_kv, P, bs, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(self.num_pages))  # a min-heap: lowest pages first
        self._used: set[int] = set()

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of keys and values one token occupies over all layers."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def high_water(self) -> int:
        """One past the highest page in use (0 when none is): decode attention reads pages below it."""
        return max(self._used) + 1 if self._used else 0

    def pages_for(self, tokens: int) -> int:
        """Pages needed to hold ``tokens`` tokens."""
        return math.ceil(tokens / self.page_size)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages (lowest first); nothing is taken when there are fewer."""
        if n > len(self._free):
            raise KVCacheFullError(f"{n} pages wanted, {len(self._free)} free")
        pages = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Return pages to the pool (their contents are left as they are and overwritten on reuse)."""
        for p in pages:
            if p not in self._used:
                raise ValueError(f"page {p} is not in use")
            self._used.discard(p)
            heapq.heappush(self._free, p)

    def slots(self, pages: Sequence[int], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset) of tokens ``start..stop-1`` of a row owning ``pages``: [stop - start] each."""
        t = torch.arange(start, stop)
        page_of = torch.tensor(pages, dtype=torch.long)[t // self.page_size]
        return page_of, t % self.page_size

    def copy_prefix(self, src: Sequence[int], dst: Sequence[int], tokens: int) -> None:
        """Copy the first ``tokens`` tokens of a row (pages ``src``) into another row's pages ``dst``."""
        n = self.pages_for(tokens)
        if n == 0:
            return
        s = torch.tensor(src[:n], device=self.k.device)
        d = torch.tensor(dst[:n], device=self.k.device)
        self.k[:, :, d] = self.k[:, :, s]
        self.v[:, :, d] = self.v[:, :, s]
