"""The hook layer on a tiny random Llama: RED/add/LoRA against independent references, exactness,
isolation, positions, folding and removal."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import add_artifact, greedy, left_pad, lora_artifact, padded_logits, red_artifact, tiny_llama
from torch import nn

from steering_vectors import (
    Profile,
    SlotsExhaustedError,
    UnsupportedModelError,
    VectorRef,
    compile_profile,
    find_layout,
    fold_profile,
    install_steering,
    steering,
)

SEQS = [[5, 17, 300, 42, 9, 1000, 77], [8, 9], [100, 200, 300, 400], [7, 7, 7, 7, 7, 7, 7, 7, 7]]


def compiled(model, *pairs):
    """compile_profile for (artifact, VectorRef-kwargs) pairs."""
    entries = [(VectorRef(name=f"v{i}", **kw), art) for i, (art, kw) in enumerate(pairs)]
    return compile_profile(
        entries, num_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size
    )


class _RedRef(nn.Module):
    """The paper's RED edit written out by hand: h' = s ⊙ h + b on the FFN's last projection."""

    def __init__(self, inner: nn.Module, s: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.s, self.b = inner, s, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * self.inner(x) + self.b


def test_red_hooks_equal_hand_written_reference_exactly():
    model = tiny_llama()
    art = red_artifact(model)
    with steering(model) as hooks:
        slot = hooks.acquire(compiled(model, (art, {})))
        with hooks.batch([slot] * len(SEQS)):
            steered = padded_logits(model, SEQS)
    ref = copy.deepcopy(model)
    for layer, block in enumerate(ref.model.layers):
        s, b = art.red(layer)
        block.mlp.down_proj = _RedRef(block.mlp.down_proj, s, b)
    expected = padded_logits(ref, SEQS)
    assert torch.equal(steered, expected)
    assert not torch.equal(steered, padded_logits(model, SEQS))


def test_add_hooks_equal_residual_reference():
    model = tiny_llama()
    art = add_artifact(model, layers=[0])
    w = 1.5
    with steering(model) as hooks:
        slot = hooks.acquire(compiled(model, (art, {"strength": w})))
        with hooks.batch([slot]):
            steered = padded_logits(model, SEQS[:1])
    # by hand: add w*v to the output of block 0, i.e. to the input of block 1
    ref = copy.deepcopy(model)
    block0 = ref.model.layers[0]
    orig = block0.forward
    v = w * art.direction(0)
    block0.forward = lambda *a, **k: orig(*a, **k) + v
    assert torch.equal(steered, padded_logits(ref, SEQS[:1]))


def test_red_strength_and_composition_follow_spec():
    model = tiny_llama()
    r1, r2 = red_artifact(model, seed=1), red_artifact(model, seed=2)
    w1, w2 = 0.5, -1.25
    prof = compiled(model, (r1, {"strength": w1}), (r2, {"strength": w2}))
    for layer in range(2):
        s1, b1 = r1.red(layer)
        s2, b2 = r2.red(layer)
        s1w, b1w = 1 + w1 * (s1 - 1), w1 * b1
        s2w, b2w = 1 + w2 * (s2 - 1), w2 * b2
        scale, bias = prof.affine[("ffn", layer)]
        h = torch.randn(64)
        torch.testing.assert_close(scale[0] * h + bias[0], s2w * (s1w * h + b1w) + b2w)
        assert torch.equal(scale[0], scale[1]) and torch.equal(bias[0], bias[1])
    a1, a2 = add_artifact(model, seed=5), add_artifact(model, seed=6)
    prof = compiled(model, (a1, {"strength": 2.0}), (a2, {"strength": -0.5, "layers": [1]}))
    assert torch.equal(prof.affine[("resid", 0)][1][0], 2.0 * a1.direction(0))
    torch.testing.assert_close(prof.affine[("resid", 1)][1][0], 2.0 * a1.direction(1) - 0.5 * a2.direction(1))


def test_strength_zero_and_empty_profile_are_bitwise_unsteered():
    model = tiny_llama()
    base = padded_logits(model, SEQS)
    arts = [red_artifact(model), add_artifact(model), lora_artifact(model)]
    with steering(model) as hooks:
        zero = hooks.acquire(compiled(model, *[(a, {"strength": 0.0}) for a in arts]))
        empty = hooks.acquire(compiled(model))
        assert zero == 0 and empty == 0
        with hooks.batch([zero, empty, 0, zero]):
            assert torch.equal(padded_logits(model, SEQS), base)
        # an unsteered row beside steered rows stays bitwise unsteered
        other = hooks.acquire(compiled(model, *[(a, {}) for a in arts]))
        with hooks.batch([0, other, 0, other]):
            mixed = padded_logits(model, SEQS)
        assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
        assert not torch.equal(mixed[1], base[1])


def test_isolation_solo_and_padding():
    model = tiny_llama()
    arts = [
        red_artifact(model, seed=11),
        add_artifact(model, seed=12),
        lora_artifact(model, seed=13),
        red_artifact(model, seed=14, layers=[1]),
    ]
    with steering(model) as hooks:
        profiles = [
            hooks.acquire(compiled(model, (arts[0], {}), (arts[1], {"strength": 0.7}))),
            hooks.acquire(compiled(model, (arts[2], {}))),
            hooks.acquire(compiled(model, (arts[3], {}), (arts[2], {"strength": -1.0}), (arts[1], {}))),
        ]
        layouts = [
            [profiles[0], 0, profiles[1], profiles[2]],
            [profiles[0], profiles[2], 0, profiles[1]],
            [profiles[0], profiles[1], profiles[2], 0],
        ]
        outs = []
        for slots in layouts:
            with hooks.batch(slots):
                outs.append(padded_logits(model, SEQS))
        # row 0 carries profile 0 throughout while the other rows change profiles: bitwise equal
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][0], outs[2][0])
        # each row against the same row run alone: within 1e-4 and the same greedy tokens
        ids, mask, _ = left_pad(SEQS)
        for slots, out in zip(layouts, outs, strict=False):
            for i, seq in enumerate(SEQS):
                with hooks.batch([slots[i]]):
                    solo = padded_logits(model, [seq])[0]
                n = len(seq)
                torch.testing.assert_close(out[i, -n:], solo, atol=1e-4, rtol=0)
        batched = greedy(model, SEQS, 6, hooks=hooks, slots=layouts[0])
        for i, seq in enumerate(SEQS):
            assert greedy(model, [seq], 6, hooks=hooks, slots=[layouts[0][i]])[0] == batched[i]


def test_positions_masks():
    model = tiny_llama()
    art = red_artifact(model)
    seq = SEQS[0]
    base = padded_logits(model, [seq])
    with steering(model) as hooks:
        every = hooks.acquire(compiled(model, (art, {})))
        prompt = hooks.acquire(compiled(model, (art, {"positions": "prompt"})))
        gen = hooks.acquire(compiled(model, (art, {"positions": "generated"})))
        with hooks.batch([every]):
            all_out = padded_logits(model, [seq])
        with hooks.batch([prompt], generated=False):
            assert torch.equal(padded_logits(model, [seq]), all_out)
        with hooks.batch([prompt], generated=True):
            assert torch.equal(padded_logits(model, [seq]), base)
        with hooks.batch([gen], generated=False):
            assert torch.equal(padded_logits(model, [seq]), base)
        with hooks.batch([gen], generated=True):
            assert torch.equal(padded_logits(model, [seq]), all_out)
        # per-token mask: the last 3 tokens are generated; tokens before them see no edit (causal)
        mask = torch.zeros(1, len(seq), dtype=torch.bool)
        mask[0, -3:] = True
        with hooks.batch([gen], generated=mask):
            out = padded_logits(model, [seq])
        assert torch.equal(out[0, :-3], base[0, :-3])
        assert not torch.equal(out[0, -3:], base[0, -3:])
        # the unsteered and always-on rows in the same batch are untouched by the mask
        base3 = padded_logits(model, [seq] * 3)
        with hooks.batch([every] * 3):
            all3 = padded_logits(model, [seq] * 3)
        with hooks.batch([gen, 0, every], generated=mask.expand(3, -1)):
            out = padded_logits(model, [seq] * 3)
        assert torch.equal(out[1], base3[1]) and torch.equal(out[2], all3[2])
        assert torch.equal(out[0, :-3], base3[0, :-3])


def test_lora_per_row_equals_merged_weights():
    model = tiny_llama()
    art = lora_artifact(model, modules=("q_proj", "v_proj", "down_proj"))
    w = 0.8
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for layer, block in enumerate(merged.model.layers):
            for name, lin in (
                ("q_proj", block.self_attn.q_proj),
                ("v_proj", block.self_attn.v_proj),
                ("down_proj", block.mlp.down_proj),
            ):
                a, b = (
                    art.tensors[f"layers.{layer}.{name}.lora_A"],
                    art.tensors[f"layers.{layer}.{name}.lora_B"],
                )
                lin.weight += w * art.lora_alpha / a.shape[0] * (b @ a)
    expected = padded_logits(merged, SEQS)
    base = padded_logits(model, SEQS)
    with steering(model) as hooks:
        slot = hooks.acquire(compiled(model, (art, {"strength": w})))
        with hooks.batch([slot, 0, slot, 0]):
            out = padded_logits(model, SEQS)
    torch.testing.assert_close(out[0], expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], expected[2], atol=1e-4, rtol=0)
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])


def test_reused_batch_map_follows_slot_contents():
    """The gathered tables of a batch map are reused across steps, never past a change of a slot."""
    model = tiny_llama()
    p_lora = compiled(model, (lora_artifact(model), {}))
    p_red = compiled(model, (red_artifact(model), {}))
    with steering(model) as hooks:
        slot = hooks.acquire(p_red)
        hooks.set_batch([slot, 0, slot, 0])
        first = padded_logits(model, SEQS)
        hooks.set_batch([slot, 0, slot, 0])  # the same map again: reused
        assert torch.equal(padded_logits(model, SEQS), first)
        hooks.release(slot)
        assert hooks.acquire(p_lora) == slot  # the same slot index, other contents
        hooks.set_batch([slot, 0, slot, 0])
        again = padded_logits(model, SEQS)
        hooks.clear_batch()
    with steering(model) as fresh:
        with fresh.batch([fresh.acquire(p_lora), 0, fresh.acquire(p_lora), 0]):
            expected = padded_logits(model, SEQS)
    assert torch.equal(again, expected) and not torch.equal(again, first)


def test_fold_equals_hooks_and_removal_restores_bitwise():
    model = tiny_llama()
    arts = [red_artifact(model), add_artifact(model), lora_artifact(model)]
    prof = compiled(model, (arts[0], {"strength": 0.9}), (arts[1], {}), (arts[2], {"strength": 0.5}))
    base = padded_logits(model, SEQS)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with steering(model) as hooks:
        slot = hooks.acquire(prof)
        with hooks.batch([slot] * 4):
            hooked = padded_logits(model, SEQS)
        hooked_tokens = greedy(model, SEQS, 5, hooks=hooks, slots=[slot] * 4)
    assert torch.equal(padded_logits(model, SEQS), base)  # hooks removed: bitwise the original
    handle = fold_profile(model, prof)
    folded_out = padded_logits(model, SEQS)
    torch.testing.assert_close(folded_out, hooked, atol=1e-4, rtol=0)
    assert greedy(model, SEQS, 5) == hooked_tokens
    handle.remove()
    assert torch.equal(padded_logits(model, SEQS), base)
    state = model.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[k], params[k]) for k in params)


def test_fold_refuses_position_dependent_profile():
    model = tiny_llama()
    prof = compiled(model, (red_artifact(model), {"positions": "generated"}))
    with pytest.raises(ValueError, match="positions"):
        fold_profile(model, prof)


def test_hook_removal_leaves_foreign_hooks_and_restores_model():
    model = tiny_llama()
    calls = []
    foreign = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    before = padded_logits(model, SEQS)
    hooks = install_steering(model)
    hooks.acquire(compiled(model, (lora_artifact(model), {})))
    hooks.remove()
    assert all(not m._forward_hooks or m is model.model.layers[0] for m in model.modules())
    assert len(model.model.layers[0]._forward_hooks) == 1
    assert torch.equal(padded_logits(model, SEQS), before)
    assert calls
    foreign.remove()


def test_idle_hooks_are_bitwise_noop_and_slots_are_refcounted():
    model = tiny_llama()
    base = padded_logits(model, SEQS)
    with steering(model, max_slots=3, initial_slots=2) as hooks:
        assert torch.equal(padded_logits(model, SEQS), base)
        p1, p2 = compiled(model, (red_artifact(model), {})), compiled(model, (add_artifact(model), {}))
        s1 = hooks.acquire(p1)
        assert hooks.acquire(p1) == s1 and hooks.slots_in_use == 1
        s2 = hooks.acquire(p2)
        with pytest.raises(SlotsExhaustedError):
            hooks.acquire(compiled(model, (red_artifact(model, seed=9), {})))
        hooks.release(s1)
        hooks.release(s1)
        hooks.release(s2)
        assert hooks.slots_in_use == 0
        with pytest.raises(ValueError, match="not loaded"):
            hooks.set_batch([s1])


def test_profile_validation_messages():
    with pytest.raises(ValueError, match="positions"):
        VectorRef(name="x", positions="middle")
    with pytest.raises(ValueError, match="finite"):
        VectorRef(name="x", strength=float("nan"))
    with pytest.raises(ValueError, match="invalid name"):
        VectorRef(name="../etc/passwd")
    with pytest.raises(ValueError, match="version pin"):
        VectorRef(name="x@XYZ")
    for bad in ("x\n", "x\n@abcd", "x@abcd\n", "", "a" * 65, "x/y", "x\x00"):
        with pytest.raises(ValueError):
            VectorRef(name=bad)
    with pytest.raises(ValueError, match="at most"):
        Profile.from_dict({"vectors": [{"name": f"v{i}"} for i in range(17)]})
    model = tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        compiled(model, (red_artifact(model), {"layers": [5]}))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gpt2"])
def test_layout_found_by_structure(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=128,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if family == "gpt2":
        kw = dict(vocab_size=128, n_layer=2, n_embd=32, n_head=4)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    layout = find_layout(model)
    assert layout.num_layers == 2 and layout.hidden_size == 32
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(ids).logits
        art = red_artifact(model)
        prof = compile_profile([(VectorRef(name="r"), art)], num_layers=2, hidden_size=32)
        with steering(model) as hooks:
            slot = hooks.acquire(prof)
            with hooks.batch([slot]):
                out = model(ids).logits
            with hooks.batch([0]):
                assert torch.equal(model(ids).logits, base)
        assert not torch.equal(out, base)
        with fold_profile(model, prof):
            torch.testing.assert_close(model(ids).logits, out, atol=1e-4, rtol=0)
        assert torch.equal(model(ids).logits, base)


def test_unknown_model_is_rejected_with_its_name():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="Weird"):
        find_layout(Weird())
