"""The core and the engine on the real default model (SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import add_artifact, lora_artifact, padded_logits, red_artifact
from test_hooks import _RedRef

from server.engine import Engine, SamplingParams
from steering_vectors import VectorRef, compile_profile, fold_profile, install_steering

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about autumn leaves falling.", "2 + 2 ="]


@pytest.fixture(scope="module")
def real():
    from basemodel import load_model

    return load_model(quantization="none", dtype="float32")


def _profile(model, *pairs):
    cfg = model.config
    return compile_profile(
        [(VectorRef(name=f"v{i}", **kw), a) for i, (a, kw) in enumerate(pairs)],
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
    )


def test_red_hooks_equal_reference_on_the_default_model(real):
    model, tok = real.model, real.tokenizer
    seqs = [tok.encode(p) for p in PROMPTS]
    art = red_artifact(model, spread=0.05)
    with install_steering(model) as hooks:
        slot = hooks.acquire(_profile(model, (art, {})))
        with hooks.batch([slot] * len(seqs)):
            steered = padded_logits(model, seqs)
    assert torch.equal(padded_logits(model, seqs), padded_logits(model, seqs))  # deterministic baseline
    ref = copy.deepcopy(model)
    for layer, block in enumerate(ref.model.layers):
        s, b = art.red(layer)
        block.mlp.down_proj = _RedRef(block.mlp.down_proj, s, b)
    assert torch.equal(steered, padded_logits(ref, seqs))


def test_strength_zero_is_bitwise_unsteered_and_fold_matches(real):
    model, tok = real.model, real.tokenizer
    seqs = [tok.encode(p) for p in PROMPTS]
    base = padded_logits(model, seqs)
    arts = [red_artifact(model, spread=0.05), add_artifact(model, norm=1.0), lora_artifact(model, rank=2)]
    zero = _profile(model, *[(a, {"strength": 0.0}) for a in arts])
    full = _profile(model, *[(a, {"strength": 0.3}) for a in arts])
    with install_steering(model) as hooks:
        z, f = hooks.acquire(zero), hooks.acquire(full)
        with hooks.batch([z, f, 0]):
            mixed = padded_logits(model, seqs)
        with hooks.batch([f] * 3):
            steered = padded_logits(model, seqs)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert torch.equal(mixed[1], steered[1])
    with fold_profile(model, full):
        folded = padded_logits(model, seqs)
    torch.testing.assert_close(folded, steered, atol=1e-4, rtol=0)
    assert torch.equal(padded_logits(model, seqs), base)


def test_engine_batched_equals_solo_on_the_default_model(real):
    model, tok = real.model, real.tokenizer
    hooks = install_steering(model)
    try:
        engine = Engine(model, tok, hooks, max_batch_size=4).start()
        profiles = [
            None,
            _profile(model, (add_artifact(model, norm=4.0), {})),
            _profile(model, (red_artifact(model, spread=0.05), {"positions": "generated"})),
        ]
        params = SamplingParams(max_new_tokens=16)
        prompts = [tok.encode(p) for p in PROMPTS]
        solo = [engine.generate(p, params, prof).text for p, prof in zip(prompts, profiles, strict=True)]
        handles = [engine.submit(p, params, prof) for p, prof in zip(prompts, profiles, strict=True)]
        assert [h.wait(timeout=120).text for h in handles] == solo
        assert solo[1] != engine.generate(prompts[1], params).text  # the steering did change the output
        engine.stop()
        assert hooks.slots_in_use == 0
    finally:
        hooks.remove()
