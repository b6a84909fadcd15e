"""Paged attention: the page-wise kernels against plain softmax attention, and a packed forward pass
(decode rows and prompt chunks together) against transformers' own forward on a tiny Llama."""

from __future__ import annotations

import torch
from helpers import padded_logits, tiny_llama

from server.engine.attention import attend_pages, combine_pages, install_paged_attention, paged_attention
from server.engine.kv_cache import PagedKVCache
from server.engine.params import SamplingParams
from server.engine.runner import ModelRunner
from server.engine.sequence import Group, Sequence, Work


def _softmax_attention(q, k, v, scale):
    """q [G, D], k/v [S, D] -> [G, D], written out."""
    w = torch.softmax((q @ k.T) * scale, dim=-1)
    return w @ v


def test_pages_combine_into_softmax_attention_over_the_row():
    g = torch.Generator().manual_seed(0)
    H, G, D, bs = 2, 3, 8, 4
    lengths = [7, 4, 10]  # rows of 2, 1 and 3 pages (the last ones partly filled)
    owner, valid = [], []
    for r, n in enumerate(lengths):
        for j in range(-(-n // bs)):
            owner.append(r)
            valid.append(min(bs, n - j * bs))
    owner.append(len(lengths))  # a page nobody decodes: discarded
    valid.append(bs)
    P = len(owner)
    q = torch.randn(len(lengths), H, G, D, generator=g)
    k, v = torch.randn(P, H, bs, D, generator=g), torch.randn(P, H, bs, D, generator=g)
    bias = torch.where(torch.arange(bs)[None, :] < torch.tensor(valid)[:, None], 0.0, float("-inf"))
    own = torch.tensor(owner)
    o, lse = attend_pages(q[own.clamp(max=len(lengths) - 1)], k, v, bias[:, None, None, :], 0.3)
    out = combine_pages(o, lse, own, len(lengths))  # [R, H, G, D]
    for r, n in enumerate(lengths):
        pages = [p for p, x in enumerate(owner) if x == r]
        kr = torch.cat([k[p] for p in pages], dim=1)[:, :n]  # [H, n, D]
        vr = torch.cat([v[p] for p in pages], dim=1)[:, :n]
        for h in range(H):
            ref = _softmax_attention(q[r, h], kr[h], vr[h], 0.3)
            torch.testing.assert_close(out[r, h], ref, atol=1e-6, rtol=0)


def test_packed_decode_and_chunks_equal_the_models_own_forward():
    model = tiny_llama()
    cfg = model.config
    prompts = [list(range(5, 45)), [7, 8, 9], list(range(100, 170))]
    with paged_attention(model):
        cache = PagedKVCache(num_layers=2, kv_heads=2, head_dim=16, capacity_tokens=1024, page_size=16)
        runner = ModelRunner(model, None, cache)
        seqs, logged = [], {}
        for p in prompts:
            grp = Group(
                handle=None, prompt=p, params=SamplingParams(), profile=None, arrival=0, pages_per_seq=8
            )
            seqs.append(Sequence(group=grp, index=0, detok=None, generator=None))
            grp.seqs.append(seqs[-1])
        with torch.no_grad():
            for _ in range(12):  # chunks of at most 16 tokens beside the decode tokens
                works = [Work(s, s.cached, [s.out[-1]], True, True) for s in seqs if s.out and len(s.out) < 5]
                works += [
                    Work(
                        s, s.cached, s.prompt[s.cached : s.cached + 16], False, s.cached + 16 >= len(s.prompt)
                    )
                    for s in seqs
                    if s.cached < len(s.prompt)
                ]
                if not works:
                    break
                for w in works:
                    need = cache.pages_for(w.start + len(w.tokens)) - len(w.seq.pages)
                    w.seq.pages += cache.allocate(max(need, 0))
                out = runner.run(works)
                for i, w in enumerate(works):
                    w.seq.cached += len(w.tokens)
                    if i in out.logits:
                        w.seq.out.append(int(out.logits[i].argmax()))
                        logged.setdefault(id(w.seq), []).append(out.logits[i])
    assert cfg._attn_implementation == "sdpa"  # restored
    for s in seqs:
        assert len(s.out) == 5
        ref = padded_logits(model, [s.prompt + s.out])[0, len(s.prompt) - 1 : -1]
        torch.testing.assert_close(torch.stack(logged[id(s)]), ref, atol=1e-5, rtol=0)


def test_without_a_plan_the_model_runs_its_own_attention_bitwise():
    model = tiny_llama()
    seqs = [[5, 17, 300, 42, 9], [8, 9]]
    base = padded_logits(model, seqs)
    handle = install_paged_attention(model)
    assert model.config._attn_implementation == handle.name
    assert torch.equal(padded_logits(model, seqs), base)
    handle.remove()
    assert model.config._attn_implementation == "sdpa"
