"""The engine on a tiny random Llama: scheduling, budgets, cancellation, faults in their row, sampling
features and the SPEC §7 invariants."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import add_artifact, fail_once, lora_artifact, padded_logits, red_artifact, tiny_llama

import server.engine.sampler as sampler_mod
from server.engine import ContextLengthError, Engine, QueueFullError, SamplingParams
from steering_vectors import VectorRef, compile_profile, install_steering

PROMPTS = ["The capital of France is", "Write a haiku about autumn leaves falling.", "2 + 2 ="]


@pytest.fixture
def make(tokenizer):
    """make(**engine options) -> (engine, model, hooks); every engine is stopped at teardown."""
    engines = []

    def build(steer: bool = False, model=None, **kw):
        model = model or tiny_llama()
        hooks = install_steering(model) if steer else None
        opts = {"max_batch_size": 4, "kv_cache_tokens": 2048, "page_size": 16, "max_batched_tokens": 64, **kw}
        engine = Engine(model, tokenizer, hooks, **opts)
        engines.append(engine)
        return engine, model, hooks

    yield build
    for e in engines:
        e.stop(timeout=10)


def _spy_forward(engine) -> list[list[tuple[str, bool, int]]]:
    """Record each forward pass as [(request id, decode?, tokens)]."""
    calls: list[list[tuple[str, bool, int]]] = []
    forward = engine.runner.forward

    def spy(works):
        calls.append([(w.seq.group.handle.id, w.decode, len(w.tokens)) for w in works])
        return forward(works)

    engine.runner.forward = spy
    return calls


def _spy_logits(engine) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Record the logits each sample drew from, by (request id, sample index)."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    draw = engine.sampler.draw

    def spy(rows, logits, token_text):
        for r, lg in zip(rows, logits, strict=True):
            seen.setdefault((r.group.handle.id, r.index), []).append(lg.clone())
        return draw(rows, logits, token_text)

    engine.sampler.draw = spy
    return seen


def _profile(model, *pairs):
    cfg = model.config
    entries = [(VectorRef(name=f"v{i}", **kw), art) for i, (art, kw) in enumerate(pairs)]
    return compile_profile(entries, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size)


def _ids(tokenizer, i=0):
    return tokenizer.encode(PROMPTS[i])


GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


# ---- batching invariants --------------------------------------------------------------------------------
def test_batched_equals_solo_and_logits_match_a_full_forward(make, tokenizer):
    engine, model, _ = make()
    engine.start()
    prompts = [_ids(tokenizer, i) for i in range(3)]
    logits = _spy_logits(engine)
    solo = [engine.submit(p, GREEDY) for p in prompts]
    solo = [h.wait(60) for h in solo]
    handles = [engine.submit(p, GREEDY) for p in prompts]
    batched = [h.wait(60) for h in handles]
    assert [r.text for r in batched] == [r.text for r in solo]
    for p, h in zip(prompts, handles, strict=True):
        mine = torch.stack(logits[(h.id, 0)])  # [8, V]
        out = mine.argmax(-1).tolist()
        ref = padded_logits(model, [p + out])[0, len(p) - 1 : -1]  # the same positions, no cache
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_chunked_prefill_equals_one_pass(make, tokenizer):
    prompt = tokenizer.encode(" ".join(PROMPTS) * 3)
    assert len(prompt) > 40
    runs = []
    for budget in (256, 7):
        engine, _, _ = make(model=tiny_llama(seed=5), max_batched_tokens=budget)
        calls, logits = _spy_forward(engine), _spy_logits(engine)
        h = engine.submit(prompt, GREEDY)
        engine.start()
        runs.append((h.wait(60).text, torch.stack(logits[(h.id, 0)]), calls))
    (text_a, logits_a, calls_a), (text_b, logits_b, calls_b) = runs
    assert text_a == text_b
    torch.testing.assert_close(logits_a, logits_b, atol=1e-4, rtol=0)
    assert sum(not d for c in calls_a for _, d, _ in c) == 1  # one prefill pass
    assert max(n for c in calls_b for _, d, n in c if not d) <= 7  # chunks within the budget
    assert sum(n for c in calls_b for _, d, n in c if not d) == len(prompt)


def test_isolation_and_strength_zero_are_bitwise(make, tokenizer):
    prompts = [_ids(tokenizer, i) for i in range(3)]
    model = tiny_llama()
    x = _profile(model, (red_artifact(model, spread=0.2), {}), (lora_artifact(model, rank=2), {}))
    y = _profile(model, (add_artifact(model, norm=3.0), {}))
    zero = _profile(model, (red_artifact(model), {"strength": 0.0}))
    runs = []
    for profiles in ([None, x, y], [zero, y, x]):
        engine, _, _ = make(steer=True, model=tiny_llama())  # the same weights each time
        logits = _spy_logits(engine)
        hs = [engine.submit(p, GREEDY, prof) for p, prof in zip(prompts, profiles, strict=True)]
        engine.start()  # submitted before the start: one batch of the same shape both times
        for h in hs:
            h.wait(60)
        runs.append([torch.stack(logits[(h.id, 0)]) for h in hs])
    a, b = runs
    assert torch.equal(a[0], b[0])  # no profile vs strength 0, beside other profiles: bitwise equal
    assert not torch.equal(a[1], b[1]) and not torch.equal(a[2], b[2])  # x vs y does change a row


# ---- admission, budgets, cancellation ----------------------------------------------------------------
def test_rows_bound_the_batch_and_every_request_finishes(make, tokenizer):
    engine, _, _ = make(max_batch_size=2, max_batched_tokens=16)
    calls = _spy_forward(engine)
    handles = [engine.submit(_ids(tokenizer, i % 3), GREEDY) for i in range(5)]
    engine.start()
    assert all(h.wait(60).finish_reason == "length" for h in handles)
    assert max(len({rid for rid, _, _ in c}) for c in calls) <= 2


def test_kv_capacity_admits_waits_and_refuses(make, tokenizer):
    engine, _, _ = make(kv_cache_tokens=64, page_size=16, max_queue=3)
    prompt = tokenizer.encode("a b c d e f g h i j")  # 10 tokens + 30 new: 3 of the 4 pages
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    with pytest.raises(ContextLengthError, match="kv_cache_tokens"):
        engine.submit(prompt, SamplingParams(max_new_tokens=60))
    with pytest.raises(ContextLengthError, match="rows"):
        engine.submit(prompt, SamplingParams(max_new_tokens=2, n=5))
    calls = _spy_forward(engine)
    handles = [engine.submit(prompt, params) for _ in range(3)]
    with pytest.raises(QueueFullError):
        engine.submit(prompt, params)
    engine.start()
    assert all(h.wait(60).completion_tokens == 30 for h in handles)
    assert max(len({rid for rid, _, _ in c}) for c in calls) == 1  # never two in the cache at once
    assert engine.cache.free_pages == engine.cache.num_pages and engine.scheduler.reserved == 0


def test_cancel_frees_the_row_and_its_pages(make, tokenizer):
    engine, _, _ = make()
    engine.start()
    h = engine.submit(_ids(tokenizer), SamplingParams(max_new_tokens=400, ignore_eos=True))
    h.cancel()
    r = h.wait(60)
    assert r.finish_reason == "cancelled" and r.completion_tokens < 400
    assert engine.idle() and engine.cache.free_pages == engine.cache.num_pages
    assert engine.generate(_ids(tokenizer), GREEDY).finish_reason == "length"


def test_pages_are_reused_and_the_cache_shrinks_back(make, tokenizer):
    engine, _, _ = make()
    pages = []
    grab = engine.scheduler.remove

    def spy(seq):
        pages.append(list(seq.pages))
        grab(seq)

    engine.scheduler.remove = spy
    engine.start()
    for i in range(3):
        engine.generate(_ids(tokenizer, i), GREEDY)
        assert engine.cache.high_water == 0 and engine.cache.free_pages == engine.cache.num_pages
    assert all(p[0] == 0 for p in pages)  # every request started again at the lowest page


def test_stop_strings_end_the_text_before_them(make, tokenizer):
    engine, _, _ = make()
    engine.start()
    free = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=20, ignore_eos=True)).text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip()
    r = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(stop,)))
    assert r.finish_reason == "stop" and r.text == free[: free.index(stop)]


# ---- faults stay in their row --------------------------------------------------------------------------
def test_huge_top_k_is_refused_before_queueing_while_the_batch_runs_on(make, tokenizer):
    engine, _, _ = make()
    engine.start()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    solo = engine.generate(_ids(tokenizer, 1), params).text
    handles = [engine.submit(_ids(tokenizer, 1), params) for _ in range(3)]
    with pytest.raises(ValueError, match="top_k"):
        engine.submit(_ids(tokenizer), SamplingParams(temperature=1.0, top_k=2**63))
    results = [h.wait(60) for h in handles]
    assert [(r.finish_reason, r.text) for r in results] == [("length", solo)] * 3


def test_a_failing_forward_fails_only_its_row(make, tokenizer):
    engine, model, _ = make()
    marker = 31337

    def poison(_mod, args):
        if (args[0] == marker).any():
            raise RuntimeError("poisoned token")

    hook = model.model.embed_tokens.register_forward_pre_hook(poison)
    good = [_ids(tokenizer, i) for i in range(2)]
    handles = [engine.submit(good[0], GREEDY), engine.submit([*good[1], marker], GREEDY)]
    handles.append(engine.submit(good[1], GREEDY))
    engine.start()
    ok0, bad, ok1 = (h.wait(60) for h in handles)
    assert bad.finish_reason == "error" and "poisoned token" in (bad.error or "")
    assert ok0.finish_reason == ok1.finish_reason == "length"
    hook.remove()
    assert ok0.text == engine.generate(good[0], GREEDY).text  # the next requests succeed, unchanged
    assert ok1.text == engine.generate(good[1], GREEDY).text


def test_a_failing_draw_fails_only_its_row(make, tokenizer, monkeypatch):
    engine, _, _ = make()
    real = sampler_mod.sample

    def flaky(logits, temperature, *args):
        if bool((temperature == 0.5).any()):
            raise FloatingPointError("bad row")
        return real(logits, temperature, *args)

    monkeypatch.setattr(sampler_mod, "sample", flaky)
    handles = [
        engine.submit(_ids(tokenizer), GREEDY),
        engine.submit(_ids(tokenizer), SamplingParams(temperature=0.5)),
    ]
    engine.start()
    good, bad = (h.wait(60) for h in handles)
    assert good.finish_reason == "length" and bad.finish_reason == "error" and "bad row" in (bad.error or "")


def test_a_failed_slot_allocation_rolls_back_and_the_next_request_runs(make, tokenizer, monkeypatch):
    engine, model, hooks = make(steer=True)
    prof = _profile(model, (lora_artifact(model, rank=4), {}))
    before = {k: v.shape for k, v in vars(hooks.tables).items() if isinstance(v, torch.Tensor)}
    failing = fail_once(hooks.tables.stage, MemoryError("no memory for the LoRA tables"))
    monkeypatch.setattr(hooks.tables, "stage", failing)
    engine.start()
    r = engine.submit(_ids(tokenizer), GREEDY, prof).wait(60)
    assert r.finish_reason == "error" and "allocation" in (r.error or "")
    assert hooks.slots_in_use == 0 and not hooks.tables.lora and engine.idle()
    assert before == {k: v.shape for k, v in vars(hooks.tables).items() if isinstance(v, torch.Tensor)}
    assert engine.generate(_ids(tokenizer), GREEDY, prof).finish_reason == "length"
    assert hooks.slots_in_use == 0


def test_a_failed_page_allocation_fails_only_that_request(make, tokenizer, monkeypatch):
    engine, _, _ = make()
    monkeypatch.setattr(engine.cache, "allocate", fail_once(engine.cache.allocate, MemoryError("no pages")))
    engine.start()
    assert engine.generate(_ids(tokenizer), GREEDY).finish_reason == "error"
    assert engine.cache.free_pages == engine.cache.num_pages and engine.scheduler.free_rows == 4
    assert engine.generate(_ids(tokenizer), GREEDY).finish_reason == "length"


# ---- sampling features ------------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_the_logits_and_follow_steering(make, tokenizer):
    engine, model, hooks = make(steer=True)
    prof = _profile(model, (red_artifact(model, spread=0.3), {}))
    engine.start()
    prompt = _ids(tokenizer)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    results = {}
    for name, p in (("plain", None), ("steered", prof)):
        r = engine.generate(prompt, params, p)
        ids = [lp.token_id for lp in r.logprobs]
        assert len(ids) == 6 and all(len(lp.top) == 3 for lp in r.logprobs)
        with contextlib.ExitStack() as stack:
            if p is not None:
                slot = hooks.acquire(p)
                stack.callback(hooks.release, slot)
                stack.enter_context(hooks.batch([slot]))
            ref = torch.log_softmax(padded_logits(model, [prompt + ids])[0, len(prompt) - 1 : -1], -1)
        got = torch.tensor([lp.logprob for lp in r.logprobs])
        torch.testing.assert_close(got, ref[torch.arange(6), torch.tensor(ids)], atol=1e-5, rtol=0)
        top = torch.tensor([[x[2] for x in lp.top] for lp in r.logprobs])
        torch.testing.assert_close(top, ref.topk(3, -1).values, atol=1e-5, rtol=0)
        assert r.logprobs[0].token == tokenizer.decode([ids[0]])
        results[name] = got
    assert not torch.allclose(results["plain"], results["steered"])  # steering moved them
    assert hooks.slots_in_use == 0


def test_n_samples_share_one_prefill_and_a_seed_reproduces_them(make, tokenizer):
    engine, _, _ = make(max_batch_size=4)
    calls = _spy_forward(engine)
    engine.start()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, n=4, ignore_eos=True)
    first = engine.submit(_ids(tokenizer), params)
    a = first.wait_all(60)
    b = engine.submit(_ids(tokenizer), params).wait_all(60)
    assert [r.text for r in a] == [r.text for r in b] and [r.index for r in a] == [0, 1, 2, 3]
    assert len({r.text for r in a}) > 1 and all(r.completion_tokens == 10 for r in a)
    prefill = [n for c in calls for rid, d, n in c if rid == first.id and not d]
    assert prefill == [len(_ids(tokenizer))]  # the prompt went through the model once for all four
    one = engine.submit(
        _ids(tokenizer), SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    )
    assert one.wait(60).text == a[0].text  # sample 0 draws like a single request with that seed


def test_logit_bias_min_tokens_and_ignore_eos(make, tokenizer):
    engine, _, _ = make()
    engine.start()
    eos = tokenizer.eos_token_id
    force = {eos: 100.0}
    r = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=10, logit_bias=force))
    assert (r.finish_reason, r.completion_tokens, r.text) == ("stop", 0, "")
    r = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=10, logit_bias=force, min_tokens=3))
    assert (r.finish_reason, r.completion_tokens) == ("stop", 3)
    r = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=5, logit_bias=force, ignore_eos=True))
    assert (r.finish_reason, r.completion_tokens) == ("length", 5)


def test_generation_config_sampling_values_are_the_defaults(make, tokenizer):
    model = tiny_llama()
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_k = 5
    engine, _, _ = make(model=model)
    assert engine.defaults == {"temperature": 0.6, "top_k": 5}
    engine.start()
    implicit = engine.generate(_ids(tokenizer), SamplingParams(max_new_tokens=12, seed=3, ignore_eos=True))
    explicit = SamplingParams(max_new_tokens=12, seed=3, temperature=0.6, top_k=5, ignore_eos=True)
    assert implicit.text == engine.generate(_ids(tokenizer), explicit).text
    greedy = engine.generate(
        _ids(tokenizer), SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert greedy.text != implicit.text


def test_steering_slots_are_released_when_requests_end(make, tokenizer):
    engine, model, hooks = make(steer=True)
    profs = [_profile(model, (add_artifact(model, seed=s), {})) for s in range(3)]
    engine.start()
    hs = [engine.submit(_ids(tokenizer, i), GREEDY, p) for i, p in enumerate(profs)]
    hs.append(engine.submit(_ids(tokenizer), SamplingParams(max_new_tokens=300, ignore_eos=True), profs[0]))
    for h in hs[:3]:
        h.wait(60)
    hs[3].cancel()
    hs[3].wait(60)
    assert hooks.slots_in_use == 0


def test_a_requests_slot_is_free_before_its_caller_hears_it_ended(make, tokenizer):
    engine, model, hooks = make(steer=True)
    prof = _profile(model, (add_artifact(model, seed=1), {}))
    h = engine.submit(_ids(tokenizer), GREEDY, prof)
    in_use_at_end = []
    push = h._push

    def spy(event):
        if event.finish_reason is not None:
            in_use_at_end.append(hooks.slots_in_use)
        push(event)

    h._push = spy
    engine.start()
    assert h.wait(60).finish_reason == "length" and in_use_at_end == [0]


def test_packed_steering_equals_the_padded_reference_with_position_classes(make, tokenizer):
    engine, model, hooks = make(steer=True, max_batched_tokens=9)  # prompts prefilled in chunks
    prof = _profile(
        model,
        (red_artifact(model, spread=0.2), {"positions": "generated"}),
        (add_artifact(model, norm=2.0), {"positions": "prompt"}),
        (lora_artifact(model, rank=3), {}),
    )
    logits = _spy_logits(engine)
    prompts = [tokenizer.encode(" ".join(PROMPTS)), _ids(tokenizer, 2)]
    handles = [engine.submit(prompts[0], GREEDY, prof), engine.submit(prompts[1], GREEDY)]
    engine.start()
    assert all(h.wait(60).finish_reason == "length" for h in handles)
    for p, h, steer in zip(prompts, handles, (True, False), strict=True):
        mine = torch.stack(logits[(h.id, 0)])
        full = p + mine.argmax(-1).tolist()
        gen = torch.zeros(1, len(full), dtype=torch.bool)
        gen[0, len(p) :] = True
        with contextlib.ExitStack() as stack:
            if steer:
                slot = hooks.acquire(prof)
                stack.callback(hooks.release, slot)
                stack.enter_context(hooks.batch([slot], generated=gen))
            ref = padded_logits(model, [full])[0, len(p) - 1 : -1]
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
