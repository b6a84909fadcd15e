"""Sampling operators against independent references: transformers' logits processors and hand loops."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    ban_tokens,
    filter_probs,
    sample,
    token_logprobs,
)

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def _histories(rows: int, seed: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, V, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 12, (rows,), generator=g)
    ]
    gens = [
        torch.randint(0, V, (int(n),), generator=g).tolist()
        for n in torch.randint(0, 12, (rows,), generator=g)
    ]
    return prompts, gens


def _counts_seen(prompts, gens) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(len(gens), V)
    seen = torch.zeros(len(gens), V, dtype=torch.bool)
    for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        for t in g:
            counts[i, t] += 1
        seen[i, p + g] = True
    return counts, seen


def test_repetition_penalty_equals_transformers_per_row():
    logits = _logits(4)
    prompts, gens = _histories(4)
    counts, seen = _counts_seen(prompts, gens)
    penalties = [1.0, 1.3, 0.7, 2.5]
    zero = torch.zeros(4)
    ours = apply_penalties(logits, counts, seen, zero, zero, torch.tensor(penalties))
    for i, p in enumerate(penalties):
        ids = torch.tensor([prompts[i] + gens[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalty=p)(ids, logits[i : i + 1].clone())
        assert torch.equal(ours[i], ref[0]), i
    assert torch.equal(ours[0], logits[0])  # a neutral row is untouched bitwise


def test_frequency_and_presence_penalties_follow_openai():
    logits = _logits(3, seed=2)
    prompts, gens = _histories(3, seed=3)
    counts, seen = _counts_seen(prompts, gens)
    freq, pres = torch.tensor([0.0, 0.5, -1.5]), torch.tensor([0.0, 1.25, 2.0])
    ours = apply_penalties(logits, counts, seen, pres, freq, torch.ones(3))
    for i in range(3):
        ref = logits[i].clone()
        for t in set(gens[i]):  # only generated tokens count (the prompt does not)
            ref[t] -= float(freq[i]) * gens[i].count(t) + float(pres[i])
        torch.testing.assert_close(ours[i], ref, atol=1e-6, rtol=0)
    assert torch.equal(ours[0], logits[0])


def test_logit_bias_and_min_tokens_ban_equal_transformers():
    logits = _logits(2, seed=4)
    bias = {3: 5.0, 7: -100.0, 11: 0.5}
    ours = apply_logit_bias(
        logits, torch.tensor([1, 1, 1]), torch.tensor(list(bias)), torch.tensor(list(bias.values()))
    )
    ref = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(
        torch.tensor([[1, 2]]), logits[1:].clone()
    )
    assert torch.equal(ours[1], ref[0]) and torch.equal(ours[0], logits[0])
    eos = [2, 9]
    banned = ban_tokens(logits, torch.tensor([0, 0]), torch.tensor(eos))
    proc = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=4, eos_token_id=eos)
    ref = proc(torch.tensor([[1, 2, 3, 4, 5]]), logits[:1].clone())  # 2 new tokens < 4: EOS banned
    assert torch.equal(banned[0], ref[0]) and torch.equal(banned[1], logits[1])


def _kept_reference(logits: torch.Tensor, t: float, k: int, p: float, m: float) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, min-p."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    s = TemperatureLogitsWarper(t)(ids, logits[None].clone())
    if k:
        s = TopKLogitsWarper(k)(ids, s)
    if p < 1:
        s = TopPLogitsWarper(p)(ids, s)
    if m > 0:
        s = MinPLogitsWarper(m)(ids, s)
    return torch.isfinite(s[0])


@pytest.mark.parametrize(
    "settings",
    [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 10, 0.6, 0.0), (0.9, 0, 1.0, 0.1),
     (1.1, 20, 0.9, 0.05), (2.0, 1, 0.5, 0.0)],
)  # fmt: skip
def test_top_k_top_p_min_p_keep_the_same_tokens_as_transformers(settings):
    t, k, p, m = settings
    logits = _logits(6, seed=5)
    R = logits.shape[0]
    probs = filter_probs(
        logits, torch.full((R,), t), torch.full((R,), k), torch.full((R,), p), torch.full((R,), m)
    )
    kept = probs > 0
    for i in range(R):
        assert torch.equal(kept[i], _kept_reference(logits[i], t, k, p, m)), (settings, i)


def test_draws_follow_the_kept_distribution_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, generator=g)
    rows = logits.expand(n, -1)
    ones = torch.ones(n)
    tokens = sample(rows, 0.8 * ones, torch.full((n,), 4), 0.95 * ones, 0.0 * ones, u)
    ref = torch.softmax(logits[0] / 0.8, -1)
    ref[4:] = 0.0  # outside the top 4
    ref = ref / ref.sum()
    freq = torch.bincount(tokens, minlength=6).float() / n
    torch.testing.assert_close(freq, ref, atol=0.01, rtol=0)
    two = logits.expand(2, -1)
    no_k = torch.zeros(2, dtype=torch.long)
    mixed = sample(
        two, torch.tensor([0.0, 1.0]), no_k, torch.ones(2), torch.zeros(2), torch.tensor([0.5, 0.999])
    )
    assert int(mixed[0]) == 0 and int(mixed[1]) == 5  # greedy; u near 1 takes the last token


def test_draw_of_a_row_depends_only_on_its_own_logits_and_uniform():
    logits = _logits(5, seed=6)
    args = (torch.full((5,), 0.9), torch.tensor([0, 3, 0, 7, 2]), torch.tensor([1.0, 0.9, 0.5, 1.0, 1.0]),
            torch.tensor([0.0, 0.0, 0.1, 0.0, 0.2]))  # fmt: skip
    u = torch.rand(5, generator=torch.Generator().manual_seed(1))
    batch = sample(logits, *args, u)
    for i in range(5):
        one = sample(logits[i : i + 1], *(a[i : i + 1] for a in args), u[i : i + 1])
        assert int(one[0]) == int(batch[i])


def test_token_logprobs_are_log_softmax_and_top_k():
    logits = _logits(3, seed=7)
    tokens = torch.tensor([4, 0, 49])
    chosen, top_ids, top_lp = token_logprobs(logits, tokens, 5)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(chosen, ref[torch.arange(3), tokens])
    assert torch.equal(top_lp, ref.sort(-1, descending=True).values[:, :5])
    assert torch.equal(ref.gather(1, top_ids), top_lp)
