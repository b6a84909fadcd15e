"""Profile bounds of SPEC §9.1 and shared compilation."""

from __future__ import annotations

import pytest
from helpers import add_artifact, lora_artifact, red_artifact, tiny_llama

from steering_vectors import Profile, VectorRef, compile_profile


def _compile(model, entries, **kw):
    cfg = model.config
    return compile_profile(entries, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, **kw)


def test_strength_is_bounded():
    VectorRef(name="x", strength=-100.0)
    with pytest.raises(ValueError, match="strength of 'x' must be within"):
        VectorRef(name="x", strength=100.5)


def test_a_vector_appears_once_per_profile():
    with pytest.raises(ValueError, match="'calm' appears more than once"):
        Profile.from_dict({"vectors": [{"name": "calm"}, {"name": "calm", "strength": 2}]})
    Profile.from_dict({"vectors": [{"name": "calm"}, {"name": "calm@abcd"}]})  # two versions: two vectors
    model = tiny_llama()
    art = add_artifact(model)
    with pytest.raises(ValueError, match="appears more than once"):
        _compile(model, [(VectorRef("calm"), art), (VectorRef(f"calm@{art.sha256[:8]}"), art)])


def test_lora_ranks_are_bounded_per_artifact_and_per_profile():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoRA rank 65 exceeds max_lora_rank 64"):
        _compile(model, [(VectorRef("big"), lora_artifact(model, rank=65))])
    loras = [(VectorRef(f"l{i}"), lora_artifact(model, rank=48, seed=i)) for i in range(3)]
    with pytest.raises(ValueError, match="sum to 144, more than max_profile_rank 128"):
        _compile(model, loras)
    ok = _compile(model, loras[:2])
    assert ok.lora_rank == 96
    _compile(model, [(VectorRef("big"), lora_artifact(model, rank=65))], max_lora_rank=80)


def test_compiling_the_same_composition_shares_one_object():
    model = tiny_llama()
    art = red_artifact(model)
    a = _compile(model, [(VectorRef("r", strength=0.5), art)])
    b = _compile(model, [(VectorRef("r", strength=0.5), art)])
    c = _compile(model, [(VectorRef("r", strength=0.25), art)])
    assert a is b and a is not c and a.fingerprint != c.fingerprint
