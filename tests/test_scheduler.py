"""The scheduler: admission by rows and KV pages, decode first, prompt chunks shortest first, forks."""

from __future__ import annotations

import pytest

from server.engine.kv_cache import PagedKVCache
from server.engine.params import SamplingParams
from server.engine.request import ContextLengthError
from server.engine.scheduler import PrefillPacer, Scheduler
from server.engine.sequence import Group, Sequence


def _sched(pages: int = 8, rows: int = 3, budget: int = 10) -> Scheduler:
    cache = PagedKVCache(num_layers=1, kv_heads=1, head_dim=2, capacity_tokens=pages * 4, page_size=4)
    return Scheduler(cache, max_rows=rows, max_batched_tokens=budget)


def _group(s: Scheduler, prompt_len: int, new: int = 4, n: int = 1, arrival: float = 0.0) -> Group:
    params = SamplingParams(max_new_tokens=new, n=n)
    g = Group(None, list(range(1, prompt_len + 1)), params, None, arrival, s.check(prompt_len, new, n))
    g.seqs = [Sequence(g, i, None, None) for i in range(n)]
    return g


def test_check_refuses_what_can_never_fit():
    s = _sched()
    assert s.check(10, 6, 1) == 4
    with pytest.raises(ContextLengthError, match="kv_cache_tokens is 32"):
        s.check(30, 6, 1)
    with pytest.raises(ContextLengthError, match="x2 samples"):
        s.check(10, 10, 2)
    with pytest.raises(ContextLengthError, match="rows"):
        s.check(1, 1, 4)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        _sched(rows=4, budget=3)


def test_admission_by_rows_and_reserved_pages():
    s = _sched(pages=8, rows=3)
    a, b, c = _group(s, 10, 6), _group(s, 10, 6), _group(s, 2, 2, n=2)
    assert s.fits(a)
    s.start(a)
    assert s.fits(b)
    s.start(b)
    assert s.reserved == 8 and not s.fits(c)  # one row left, but no page unreserved
    s.remove(a.seqs[0])
    assert s.reserved == 4 and s.fits(c) and s.free_rows == 2
    s.start(c)
    assert not s.fits(_group(s, 1, 1))  # no row left


def test_plan_decodes_first_then_shortest_prompt_chunks_within_the_budget():
    s = _sched(pages=16, rows=3, budget=10)
    long, short, dec = _group(s, 20, arrival=0.0), _group(s, 3, arrival=1.0), _group(s, 2, arrival=2.0)
    for g in (long, short, dec):
        s.start(g)
    d = dec.seqs[0]
    d.cached, d.out = 2, [9]  # prefilled, one sampled token to feed
    works, failed = s.plan()
    assert not failed
    assert [(w.seq.group, w.decode, len(w.tokens), w.samples) for w in works] == [
        (dec, True, 1, True),
        (short, False, 3, True),  # the short prompt first: its first token is not stuck behind the long one
        (long, False, 6, False),
    ]
    assert len(long.seqs[0].pages) == 2 and len(short.seqs[0].pages) == 1 and len(d.pages) == 1


def test_fork_copies_the_prompt_cache_to_the_siblings():
    s = _sched(pages=16, rows=3)
    g = _group(s, 6, 2, n=3)
    s.start(g)
    parent = g.seqs[0]
    works, _ = s.plan()
    assert [w.seq for w in works] == [parent]  # only the parent prefills
    s.cache.k[:, parent.pages] = 5.0
    parent.cached = 6
    drawn = s.fork(parent)
    assert drawn == g.seqs and all(x.cached == 6 and len(x.pages) == 2 for x in g.seqs)
    assert all(bool((s.cache.k[:, x.pages] == 5.0).all()) for x in g.seqs[1:])


def test_pacer_keeps_a_pass_beside_decoding_rows_within_its_factor():
    pacer = PrefillPacer(factor=2.5, cold=32, floor=8, window=2)
    assert pacer.allowance(0, 500) == 500  # nobody decodes: the whole budget
    assert pacer.allowance(3, 500) == 32 and pacer.allowance(3, 10) == 10  # not measured yet
    pacer.observe(3, 0, 0.2)  # decode-only pass: 0.2 s
    pacer.observe(3, 20, 0.4)  # 20 prompt tokens added 0.2 s: 10 ms each
    assert pacer.allowance(3, 500) == 30  # (2.5 - 1) * 0.2 / 0.01: such a pass takes 0.5 s = 2.5 x 0.2 s
    pacer.observe(3, 10, 2.2)  # prompt tokens got expensive (200 ms each): the floor still makes progress
    assert pacer.allowance(3, 500) == 8
    pacer.observe(3, 10, 0.2001)  # a lucky fast pass: the largest recent cost still rules...
    assert pacer.allowance(3, 500) == 8
    pacer.observe(3, 10, 0.21)
    pacer.observe(3, 10, 0.21)  # ...until it leaves the window; then the allowance grows at most 2x a pass
    assert [pacer.allowance(3, 500) for _ in range(3)] == [16, 32, 64]
    fresh = PrefillPacer()  # the default factor: a paced pass takes about 2 decode-only passes
    fresh.observe(0, 100, 1.0)  # a prompt-only pass bounds the per-token cost from above
    fresh.observe(2, 0, 0.1)
    assert fresh.allowance(2, 500) == 10
