"""The model runner: weight relayout keeps every value, and a failing pass is narrowed to its row."""

from __future__ import annotations

import pytest
import torch
from helpers import padded_logits, tiny_llama

from server.engine import runner as runner_mod
from server.engine.attention import paged_attention
from server.engine.kv_cache import PagedKVCache
from server.engine.params import SamplingParams
from server.engine.runner import ModelRunner, relayout_for_decode
from server.engine.sequence import Group, Sequence, Work


def test_relayout_keeps_every_weight_value():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = relayout_for_decode(model)
    assert changed == 2 * 7 + 1  # 7 linears per layer and the (tied) LM head, once
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.model.layers[0].mlp.up_proj.weight.stride() == (1, 128)  # [128, 64], column-major
    assert relayout_for_decode(model) == 0  # idempotent


def _work(cache, prompt):
    g = Group(handle=None, prompt=prompt, params=SamplingParams(), profile=None, arrival=0, pages_per_seq=4)
    s = Sequence(group=g, index=0, detok=None, generator=None)
    s.pages = cache.allocate(cache.pages_for(len(prompt)))
    return Work(s, 0, prompt, decode=False, samples=True)


def test_a_failing_pass_is_retried_row_by_row():
    model = tiny_llama()
    cache = PagedKVCache(num_layers=2, kv_heads=2, head_dim=16, capacity_tokens=256, page_size=16)

    def poison(_mod, args):
        if (args[0] == 999).any():
            raise RuntimeError("bad row")

    with paged_attention(model):
        runner = ModelRunner(model, None, cache)
        works = [_work(cache, [1, 2, 3]), _work(cache, [4, 999, 6]), _work(cache, [7, 8])]
        alone = [runner.forward([w]) for w in (works[0], works[2])]
        model.model.embed_tokens.register_forward_pre_hook(poison)
        out = runner.run(works)
        assert set(out.logits) == {0, 2} and set(out.failed) == {1}
        assert "bad row" in str(out.failed[1])
        torch.testing.assert_close(out.logits[0], alone[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(out.logits[2], alone[1][0], atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="bad row"):
            runner.run([works[1]])


@pytest.mark.parametrize("gather_max", [0, 10_000])  # page-wise, then gathered as a 1-token chunk
@torch.no_grad()
def test_a_lone_decode_row_matches_the_models_forward_on_either_attention_path(monkeypatch, gather_max):
    monkeypatch.setattr(runner_mod, "LONE_ROW_GATHER_MAX", gather_max)
    model = tiny_llama()
    cache = PagedKVCache(num_layers=2, kv_heads=2, head_dim=16, capacity_tokens=256, page_size=16)
    prompt = list(range(3, 40))  # 37 tokens: three pages, the last one partly filled
    seen = []
    with paged_attention(model):
        runner = ModelRunner(model, None, cache)
        first = _work(cache, prompt)
        seq = first.seq
        seq.pages += cache.allocate(1)
        runner.run([first])
        plan = runner._plan([Work(seq, len(prompt), [41], decode=True, samples=True)])
        assert (plan.num_decode, len(plan.chunks)) == ((1, 0) if gather_max == 0 else (0, 1))
        for tok in (41, 42):  # decode two tokens, one at a time, alone in their pass
            seen.append(runner.run([Work(seq, len(prompt) + len(seen), [tok], decode=True, samples=True)]))
    ref = padded_logits(model, [prompt + [41, 42]])[0, -2:]
    torch.testing.assert_close(torch.stack([o.logits[0] for o in seen]), ref, atol=1e-5, rtol=0)
