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
    s.cache.k[:, :, parent.pages] = 5.0
    parent.cached = 6
    drawn = s.fork(parent)
    assert drawn == g.seqs and all(x.cached == 6 and len(x.pages) == 2 for x in g.seqs)
    assert all(bool((s.cache.k[:, :, x.pages] == 5.0).all()) for x in g.seqs[1:])


def _cost(d: int, p: int) -> float:
    """A machine where a pass costs 0.1 s + 2 ms per decode row + 4 ms per prompt token."""
    return 0.1 + 0.002 * d + 0.004 * p


def test_pacer_fits_the_cost_of_a_pass_and_keeps_it_within_its_factor():
    pacer = PrefillPacer(factor=2.0, cold=32, floor=8, window=8, first_token_weight=2.0)
    assert pacer.allowance(0, 500, 1) == 500  # nobody decodes: the whole budget
    assert pacer.allowance(4, 500, 1) == 32 and pacer.allowance(4, 10, 1) == 10  # nothing measured yet
    assert pacer.allowance(4, 500, 6) == 96  # 6 wait beside 4 streams: 2 x 6 / 4 = 3 x longer
    for d, p in [(2, 0), (6, 0)]:
        pacer.observe(d, p, _cost(d, p))
    assert pacer.fit() is None and pacer.allowance(4, 500, 1) == 32  # no prompt pass yet: the last allowance
    for d, p in [(4, 0), (4, 20), (2, 40), (6, 20)]:
        pacer.observe(d, p, _cost(d, p))
    a, b, c = pacer.fit()
    assert (a, b, c) == (pytest.approx(0.1), pytest.approx(0.002), pytest.approx(0.004))
    # a decode-only pass of 4 rows takes 0.108 s: 27 prompt tokens make a pass of 2 x that
    assert pacer.allowance(4, 500, 1) == 27
    assert _cost(4, 27) <= 2 * _cost(4, 0) < _cost(4, 28)
    assert pacer.allowance(4, 500, 2) == 27  # k w = d: still one decode pass's worth
    assert pacer.allowance(4, 500, 6) == 81  # a burst of 6 beside 4 streams: 3 x
    assert pacer.allowance(4, 50, 6) == 50  # within the room left


def test_pacer_reads_the_prompt_tokens_cost_on_the_safe_side_and_grows_slowly():
    pacer = PrefillPacer(factor=2.0, cold=32, floor=8, window=8)
    for d, p in [(2, 0), (6, 0), (4, 0), (4, 20), (2, 40), (6, 20)]:
        pacer.observe(d, p, _cost(d, p))
    assert pacer.allowance(4, 500, 1) == 27
    for _ in range(2):  # a chunk deep in a long prompt: 40 ms a token, not 4
        pacer.observe(4, 10, _cost(4, 0) + 0.04 * 10)
    assert pacer.allowance(4, 500, 1) == 8  # the dearest recent pass rules; the floor still makes progress
    for d, p in [(4, 20), (2, 20), (4, 30), (6, 20)] * 2:  # cheap again, once the dear passes left
        pacer.observe(d, p, _cost(d, p))
    # back up by at most a quarter (+1) a pass (no overshoot after a cheap pass), to the 27 tokens of a
    # pass of 2 x 0.108 s (26 where the least-squares fit lands a hair below 27.0)
    grown = [pacer.allowance(4, 500, 1) for _ in range(6)]
    assert grown[:4] == [11, 14, 18, 23] and grown[4] == grown[5] in (26, 27)


def test_pacer_needs_a_window_to_fit():
    with pytest.raises(ValueError, match="window"):
        PrefillPacer(window=2)
