"""RAHF (training/rahf/) on a tiny random Llama: the SCIT loss, the step-2 patterns and step-3 targets,
the final model as one served LoRA artifact, the data split and the whole pipeline."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from test_training import HIDDEN, LAYERS, PAIRS, _one_thread, pref_file, tiny_dir, tokenizer  # noqa: F401
from transformers import AutoModelForCausalLM

from steering_vectors import (
    Artifact,
    compile_profile,
    find_layout,
    install_steering,
    load_artifact,
    save_artifact,
)
from steering_vectors.profile import VectorRef
from training.cli import main as train_main
from training.config import TUNE_MODULES, RahfConfig
from training.lora import LoraSet, stack_adapters
from training.rahf import Runner, default_target_layers, extract_differences
from training.rahf.distill import Distiller
from training.rahf.extract import collect, examples
from training.rahf.instruct import Contrast, LMTuner, ScitTuner, scit_contrast
from training.rahf.pipeline import split_steps
from training.rahf.run import RahfRun, target_layers
from training.records import PreferencePair
from training.runtime import make_accelerator
from training.tokens import Encoded, collate

IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 2, 198]])


def _random_lora(model, targets, rank: int, alpha: float, seed: int, spread: float = 0.2) -> LoraSet:
    lora = LoraSet(find_layout(model), targets, rank=rank, alpha=alpha, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in lora.B.values():
            p.copy_(spread * torch.randn(p.shape, generator=g))
    return lora


def _merged(model, *loras: LoraSet, scale: float = 1.0):
    """An independent model with the LoRA deltas merged into the weights by hand:
    W + scale * (alpha/r) B A for each adapter."""
    m = copy.deepcopy(model)
    layout = find_layout(m)
    for lora in loras:
        for layer, mod in lora.targets:
            k = lora._key(layer, mod)
            delta = scale * lora.scaling * lora.B[k].data @ lora.A[k].data
            layout.linear(layer, mod).weight.data += delta
    return m


def _hidden(model, ids: list[int], layer: int) -> torch.Tensor:
    """``output_hidden_states[layer]`` of one sequence (the paper's layer numbering)."""
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]


# ---- step 1: the SCIT loss -------------------------------------------------------------------------


def _reference_logprobs(model, enc: Encoded) -> torch.Tensor:
    """log p(y_t | y_<t) of each response token, from the full logits (an independent path)."""
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = range(enc.n_prompt, len(enc.input_ids))
    return torch.stack([logp[t - 1, enc.input_ids[t]] for t in pos])


@pytest.mark.parametrize("weight,eps", [(1.0, 0.2), (0.7, 0.2), (1.0, 0.0)])
def test_scit_loss_is_nll_plus_weighted_contrastive_term(weight, eps):
    """NLL + weight * contrast, with the contrastive term re-derived here from the probabilities of the
    official code (p = exp(mean token log-prob), -log of each reply's share) rather than softplus;
    the defaults are weight 1 and smoothing 0.2, as the official ``compute_loss``."""
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    # handcrafted: two examples (own instruction first, then the same reply under the opposite one);
    # the instructions differ in length, the replies in length too
    rows = [
        Encoded([5, 6, 7, 8, 30, 31, 32], 4),  # reply A under its own instruction
        Encoded([9, 10, 8, 30, 31, 32], 3),  # reply A under the opposite instruction
        Encoded([9, 10, 8, 40, 41, 42, 43, 44], 3),  # reply B under its own instruction
        Encoded([5, 6, 7, 8, 40, 41, 42, 43, 44], 4),  # reply B under the opposite instruction
    ]
    batch = collate(rows, pad_id=0)
    loss_sum, count = ScitTuner(model, None, weight, eps)(**batch)
    lps = [_reference_logprobs(model, e) for e in rows]
    nll = -(lps[0].sum() + lps[2].sum()) / (len(lps[0]) + len(lps[2]))

    def contrast(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        p_own, p_other = math.exp(own.mean()), math.exp(other.mean())  # p = exp(mean token log-prob)
        share = p_own / (p_own + p_other)
        return -(1 - eps) * math.log(share) - eps * math.log(1 - share)

    want = nll + weight * (contrast(lps[0], lps[1]) + contrast(lps[2], lps[3])) / 2
    assert int(count) == len(lps[0]) + len(lps[2])
    torch.testing.assert_close(loss_sum / count, torch.tensor(float(want)), atol=1e-6, rtol=1e-6)
    # weight 0 is the plain response NLL of the examples
    plain_sum, plain_n = LMTuner(model, None)(**collate([rows[0], rows[2]], pad_id=0))
    zero_sum, zero_n = ScitTuner(model, None, 0.0, eps)(**batch)
    torch.testing.assert_close(zero_sum / zero_n, plain_sum / plain_n, atol=1e-6, rtol=1e-6)
    # the term prefers a reply that is likelier under its own instruction, smoothing aside
    hi, lo = torch.tensor([-1.0]), torch.tensor([-3.0])
    assert scit_contrast(hi, lo, 0.2) < scit_contrast(lo, hi, 0.2)
    assert scit_contrast(hi, lo, 0.0) < scit_contrast(hi, lo, 0.2)  # smoothing keeps a floor under it


# ---- step 2: patterns from the step-1 model, in the paper's layer numbering --------------------------


def test_default_target_layers_and_range():
    assert default_target_layers(32) == [10, 12, 14, 16, 18, 20]
    assert default_target_layers(30) == [9, 11, 13, 15, 17, 19]
    assert default_target_layers(4) == [1, 3]
    assert target_layers([3, 1, 3], 4) == [1, 3]
    for bad in ([0, 2], [1, 4]):  # the embeddings and the post-norm entry are not block outputs
        with pytest.raises(ValueError, match="out of range"):
            target_layers(bad, 4)


def test_extraction_equals_independent_computation():
    base = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    layout = find_layout(base)
    targets = [(layer, m) for layer in range(LAYERS) for m in ("q_proj", "v_proj", "down_proj")]
    lora = _random_lora(base, targets, rank=4, alpha=8.0, seed=5)
    # handcrafted: two examples, prompts of different lengths per pass, the same response tokens
    pos_enc = [Encoded([5, 6, 7, 8, 9, 10], 3), Encoded([11, 12, 20, 21], 2)]
    neg_enc = [Encoded([40, 41, 8, 9, 10], 2), Encoded([30, 31, 32, 33, 20, 21], 4)]
    blocks = [0, 2]
    other = tiny_llama(seed=1, layers=LAYERS, hidden=HIDDEN)
    tuned = Runner(base, layout.blocks, lora)  # SCIT: one tuned model (base + LoRA) under two prompts
    got = extract_differences(tuned, tuned, pos_enc, neg_enc, blocks, pad_id=0, batch_size=2)
    merged = _merged(base, lora)
    dual = extract_differences(  # Dual: two different models on the same input
        Runner(merged, find_layout(merged).blocks),
        Runner(other, find_layout(other).blocks),
        pos_enc,
        pos_enc,
        blocks,
        pad_id=0,
        batch_size=2,
    )
    for i, (pe, ne) in enumerate(zip(pos_enc, neg_enc, strict=True)):
        for b in blocks:  # block b's output is output_hidden_states[b + 1]
            want = (
                _hidden(merged, pe.input_ids, b + 1)[pe.n_prompt :]
                - _hidden(merged, ne.input_ids, b + 1)[ne.n_prompt :]
            )
            assert got[i][b].shape == (pe.n_response, HIDDEN)
            torch.testing.assert_close(got[i][b], want, atol=1e-5, rtol=1e-5)
            want = (
                _hidden(merged, pe.input_ids, b + 1)[pe.n_prompt :]
                - _hidden(other, pe.input_ids, b + 1)[pe.n_prompt :]
            )
            torch.testing.assert_close(dual[i][b], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same response tokens"):
        extract_differences(tuned, tuned, pos_enc, list(reversed(neg_enc)), blocks, pad_id=0)


@pytest.mark.parametrize("variant", ["scit", "dual"])
def test_step3_targets_come_from_the_step1_model(tmp_path, tiny_dir, variant):  # noqa: F811 (fixture)
    """Step 2 reads the targets' base h from the step-1 model (SCIT's tuned model, Dual's preferred
    model), not from the untuned base, and step 3 trains on top of that model."""
    cfg = RahfConfig(
        variant=variant,
        data=str(tmp_path / "unused.jsonl"),
        out_dir=str(tmp_path / "out"),
        model=str(tiny_dir),
        device="cpu",
        target_layers=[1, 3],
    )
    assert (cfg.scit_weight, cfg.scit_smoothing, cfg.alpha) == (1.0, 0.2, 5.0)  # the official values
    run = RahfRun.open(cfg, make_accelerator("cpu"))
    assert (run.layers, run.blocks) == ([1, 3], [0, 2])
    targets = [(layer, m) for layer in range(LAYERS) for m in TUNE_MODULES]
    step1 = _random_lora(run.base, targets, rank=4, alpha=8.0, seed=3)
    tuned = Runner(run.base, run.layout.blocks, step1)
    if variant == "scit":  # one model under two instructions
        contrast = Contrast(tuned, tuned, cfg.good_instruction, cfg.bad_instruction)
        other, systems = _merged(run.base, step1), (cfg.good_instruction, cfg.bad_instruction)
    else:  # the preferred model (step1) against a dispreferred one, on the same input
        dispreferred = _random_lora(run.base, targets, rank=4, alpha=8.0, seed=4)
        contrast = Contrast(tuned, Runner(run.base, run.layout.blocks, dispreferred))
        other, systems = _merged(run.base, dispreferred), (None, None)
    assert contrast.tuned is tuned
    pairs = [PreferencePair([{"role": "user", "content": p}], c, r) for p, c, r in PAIRS[:3]]
    items = examples(pairs, "both", seed=0)
    pat = collect(run, contrast, items)
    merged = _merged(run.base, step1)  # the step-1 model, merged by hand
    for i, (pair, which) in enumerate(items):
        plain, pos, neg = (run.encode(pair, which, s) for s in (None, *systems))
        assert pat.plain[i] == plain
        for layer, b in zip(run.layers, run.blocks, strict=True):
            h_tuned = _hidden(merged, plain.input_ids, layer)[plain.n_prompt :]
            torch.testing.assert_close(pat.base[i][b], h_tuned, atol=1e-5, rtol=1e-5)
            h_base = _hidden(run.base, plain.input_ids, layer)[plain.n_prompt :]
            assert not torch.allclose(pat.base[i][b], h_base, atol=1e-3)  # not the untuned base's
            h_other = _hidden(other, plain.input_ids, layer)[plain.n_prompt :]
            if variant == "dual":
                assert not torch.allclose(pat.base[i][b], h_other, atol=1e-3)  # not the dispreferred's
            v = (
                _hidden(merged, pos.input_ids, layer)[pos.n_prompt :]
                - _hidden(other, neg.input_ids, layer)[neg.n_prompt :]
            )
            torch.testing.assert_close(pat.diffs[i][b], v, atol=1e-5, rtol=1e-5)
    # step 3 starts from the step-1 model: with a zero step-3 adapter its loss is |alpha v| per token
    step3 = LoraSet(run.layout, [(b, m) for b in range(3) for m in ("q_proj", "v_proj")], rank=2, alpha=4.0)
    batch = collate(pat.plain, run.pad_id)
    batch["target"] = torch.cat(
        [
            torch.stack([pat.base[i][b] + 5.0 * pat.diffs[i][b] for b in run.blocks], 1)
            for i in range(len(items))
        ]
    )
    loss_sum, n = Distiller(tuned, step3, run.blocks)(**batch)
    want = (
        torch.cat([torch.stack([5.0 * d[b].norm(dim=-1) for b in run.blocks], 1) for d in pat.diffs])
        .mean(1)
        .sum()
    )
    torch.testing.assert_close(loss_sum, want, atol=1e-4, rtol=1e-5)
    assert int(n) == sum(e.n_response for e in pat.plain)
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # nothing written outside tmp_path


def test_examples_and_disjoint_splits():
    pairs = [
        PreferencePair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i}") for i in range(40)
    ]
    first, later = split_steps(pairs, 0.5, seed=3)
    assert len(first) + len(later) == 40 and abs(len(first) - 20) <= 1
    assert not {p.prompt[0]["content"] for p in first} & {p.prompt[0]["content"] for p in later}
    assert split_steps(pairs, 0.5, seed=3) == (first, later) and split_steps(pairs, 0.5, seed=4) != (
        first,
        later,
    )
    assert split_steps(pairs, 1.0, seed=3) == (pairs, pairs)
    both = examples(pairs[:3], "both", seed=0)
    assert [w for _, w in both] == ["chosen"] * 3 + ["rejected"] * 3
    drawn = examples(pairs, "random", seed=0)
    assert [p for p, _ in drawn] == pairs and {w for _, w in drawn} == {"chosen", "rejected"}
    assert drawn == examples(pairs, "random", seed=0)


# ---- the final model as one served artifact --------------------------------------------------------


def _served(model, art: Artifact, weights: list[float], ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` (one row per weight) through the serving hooks: row i steered by ``art`` at
    ``weights[i]`` (0: the identity slot, the base model), all rows in one batch."""
    hooks = install_steering(model)
    try:
        slots = [
            hooks.acquire(compile_profile([(VectorRef("v", w), art)], num_layers=LAYERS, hidden_size=HIDDEN))
            for w in weights
        ]
        with torch.no_grad(), hooks.batch(slots):
            return model(ids).logits
    finally:
        hooks.remove()


def test_served_artifact_is_base_plus_step1_plus_step3(tmp_path):
    """Step 1 (every linear) and step 3 (q/v below the top target) stacked into one lora artifact,
    written and read back, give through the serving hooks the forward pass of base + step-1 adapter +
    step-3 adapter merged into the weights by hand (float32, 1e-5); strength w scales both deltas; a
    base-model row in the same batch stays the base model exactly."""
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    step1 = _random_lora(model, [(layer, m) for layer in range(LAYERS) for m in TUNE_MODULES], 4, 8.0, seed=1)
    step3 = _random_lora(model, [(b, m) for b in range(3) for m in ("q_proj", "v_proj")], 2, 16.0, seed=2)
    tensors, alpha = stack_adapters([step1, step3])
    assert alpha == 6.0 and tensors["layers.0.q_proj.lora_A"].shape == (6, HIDDEN)
    assert tensors["layers.3.q_proj.lora_A"].shape == (4, HIDDEN)  # above the step-3 blocks: step 1 only
    art = Artifact(
        kind="lora",
        tensors=tensors,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=alpha,
    )
    save_artifact(art, tmp_path / "lora.safetensors")
    art = load_artifact(tmp_path / "lora.safetensors")
    ids = IDS.repeat(4, 1)
    got = _served(model, art, [1.0, 0.0, 0.5, 1.0], ids)
    with torch.no_grad():
        base = model(IDS).logits[0]
        full = _merged(model, step1, step3)(IDS).logits[0]
        half = _merged(model, step1, step3, scale=0.5)(IDS).logits[0]
    assert model.dtype == torch.float32 and not torch.allclose(full, base, atol=1e-3)
    torch.testing.assert_close(got[0], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], half, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], base)  # the neighbour without steering: the base model, bit for bit


def _trained_adapter(ckpt: Path, rank: int, alpha: float) -> LoraSet:
    """The LoRA adapter a phase of the pipeline trained, read back from its last checkpoint."""
    state = torch.load(ckpt, weights_only=True)["module"]
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    keys = {k.split(".", 2)[2] for k in state if k.startswith("lora.A.")}
    targets = [(int(k.split("__")[0][1:]), k.split("__")[1]) for k in sorted(keys)]
    lora = LoraSet(find_layout(model), targets, rank=rank, alpha=alpha)
    lora.load_state_dict({k[len("lora.") :]: v for k, v in state.items()})
    return lora


# ---- the whole pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,finetune,normalize",
    [("scit", "lora", "none"), ("dual", "lora", "relative"), ("dual", "full", "none")],
)
def test_rahf_end_to_end(tmp_path, tiny_dir, pref_file, variant, finetune, normalize):  # noqa: F811 (fixtures)
    out = tmp_path / variant
    args = (
        f"rahf --variant {variant} --finetune {finetune} --normalize {normalize} --max-steps 2 "
        "--batch-size 2 --device cpu --target-layers 2,3 --eval-limit 2 --tune-rank 4"
    ).split()
    rc = train_main([*args, "--data", str(pref_file), "--out-dir", str(out), "--model", str(tiny_dir)])
    assert rc == 0
    add = load_artifact(out / "add.safetensors")
    assert add.kind == "add" and add.method == f"rahf-{variant}"
    assert add.layers == [1, 2]  # layers 2, 3 are the outputs of blocks 1, 2
    training, metrics = json.loads(add.extra["training"]), json.loads(add.extra["metrics"])
    assert training["variant"] == variant and training["target_layers"] == [2, 3]
    assert metrics["train_pairs"]["step1"] + metrics["train_pairs"]["steps23"] == len(PAIRS) - 1
    assert "phases" in metrics and metrics["phases"]["distill"]["steps"] == 2
    ratio, factor = metrics["diff_to_hidden_ratio_raw"], metrics["normalize_factor"]
    for layer in ("2", "3"):
        want = 0.05 / ratio[layer] if normalize == "relative" else 1.0
        assert factor[layer] == pytest.approx(want, rel=1e-5)
    phases = {json.loads(x)["phase"] for x in (out / "log.jsonl").read_text().splitlines()}
    assert phases == (
        {"scit", "distill"} if variant == "scit" else {"dual-chosen", "dual-rejected", "distill"}
    )
    assert (out / "loss.png").stat().st_size > 0
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    if finetune == "full":  # the final model is a model folder, not an adapter
        assert not (out / "lora.safetensors").exists()
        final = AutoModelForCausalLM.from_pretrained(out / "model")
        assert final.config.num_hidden_layers == LAYERS and torch.isfinite(final(IDS).logits).all()
        arts = [add]
    else:
        lora = load_artifact(out / "lora.safetensors")
        assert lora.kind == "lora" and lora.method == f"rahf-{variant}"
        assert lora.layers == list(range(LAYERS)) and lora.lora_alpha == 4.0 + 8.0
        for layer in lora.layers:
            mods = lora.lora_modules(layer)
            assert sorted(mods) == sorted(TUNE_MODULES)
            stacked = 4 + (8 if layer <= 2 else 0)  # step 1 everywhere, step 3 on q/v of blocks 0..2
            assert mods["q_proj"][0].shape == (stacked, HIDDEN) and mods["k_proj"][0].shape[0] == 4
        arts = [add, lora]
        # the served artifact is the final model the run trained: base + step-1 + step-3 adapters
        step1 = _trained_adapter(
            out / "ckpt" / f"{'scit' if variant == 'scit' else 'dual-chosen'}.pt", 4, 8.0
        )
        step3 = _trained_adapter(out / "ckpt" / "distill.pt", 8, 16.0)
        assert len(step1.targets) == LAYERS * len(TUNE_MODULES) and len(step3.targets) == 3 * 2
        with torch.no_grad():
            want = _merged(model, step1, step3)(IDS).logits
            without_step3 = _merged(model, step1)(IDS).logits
        assert not torch.allclose(want, without_step3, atol=1e-4)  # step 3 moved the model
        torch.testing.assert_close(_served(model, lora, [1.0], IDS), want, atol=1e-5, rtol=1e-5)
    ref = model(IDS).logits
    hooks = install_steering(model)
    for art in arts:  # the artifacts apply through the serving hooks and change the output
        slot = hooks.acquire(
            compile_profile([(VectorRef("v", 1.0), art)], num_layers=LAYERS, hidden_size=HIDDEN)
        )
        with torch.no_grad(), hooks.batch([slot]):
            steered = model(IDS).logits
        hooks.release(slot)
        assert not torch.equal(steered, ref) and torch.isfinite(steered).all()
    hooks.remove()
