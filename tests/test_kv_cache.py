"""The page pool: lowest pages first, exact accounting, token slots and prefix copies."""

from __future__ import annotations

import pytest
import torch

from server.engine.kv_cache import KVCacheFullError, PagedKVCache


def _cache(tokens: int = 64, page: int = 16) -> PagedKVCache:
    return PagedKVCache(num_layers=2, kv_heads=3, head_dim=4, capacity_tokens=tokens, page_size=page)


def test_capacity_is_budgeted_in_tokens_and_bytes():
    c = _cache(70, 16)
    assert c.num_pages == 5 and c.capacity_tokens == 80
    assert c.k.shape == (2, 3, 5, 16, 4) and c.v.shape == c.k.shape
    assert PagedKVCache.bytes_per_token(30, 3, 64, torch.float32) == 46_080  # SmolLM2-135M
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        _cache(8, 16)


def test_pages_go_lowest_first_and_come_back():
    c = _cache()
    a, b = c.allocate(2), c.allocate(1)
    assert (a, b, c.high_water, c.free_pages) == ([0, 1], [2], 3, 1)
    c.free(a)
    assert c.high_water == 3 and c.allocate(1) == [0]
    with pytest.raises(KVCacheFullError):
        c.allocate(3)  # two free: nothing is taken
    assert c.free_pages == 2
    with pytest.raises(ValueError, match="not in use"):
        c.free([3])
    c.free([0, 2])
    assert c.high_water == 0 and c.free_pages == 4


def test_token_slots_and_prefix_copy():
    c = _cache()
    pages = [3, 1]
    page_of, off = c.slots(pages, 14, 19)
    assert page_of.tolist() == [3, 3, 1, 1, 1] and off.tolist() == [14, 15, 0, 1, 2]
    c.k[:, :, 3] = 1.0
    c.k[:, :, 1] = 2.0
    c.copy_prefix([3, 1], [0, 2], 20)
    assert torch.equal(c.k[:, :, 0], c.k[:, :, 3]) and torch.equal(c.k[:, :, 2], c.k[:, :, 1])
