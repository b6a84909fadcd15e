"""steering_vectors.compute: vectors from contrastive pairs, against an independent computation from
``output_hidden_states`` (each text run alone, the statistics in numpy), and the hook-free model view."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import add_artifact, tiny_llama

from steering_vectors import VectorRef, compile_profile, install_steering
from steering_vectors.compute import (
    compute_vector,
    default_compute_layers,
    encode_pairs,
    last_token_states,
    read_pairs,
    unhooked_view,
)

LAYERS = 4
CHECKED = (0.0, 0.125)  # strengths of the README's table the slow test measures again
PAIRS = [
    ([1, 5, 9, 200, 31], [1, 5, 9, 201]),
    ([7, 8, 9], [7, 8, 10, 11, 12, 13]),
    ([300, 301, 302, 303, 304, 305, 306], [300, 301]),
    ([42], [43, 44]),
    ([11, 12, 13, 14], [15, 16, 17, 18]),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS)


def reference_states(model, seqs: list[list[int]]) -> dict[int, np.ndarray]:
    """{l: [n, d]}: each text alone through ``output_hidden_states``; the last layer's entry is read
    before the final norm (``tie_last_hidden_states=False``), where an add vector applies."""
    ref = copy.deepcopy(model)
    ref.config.tie_last_hidden_states = False
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in range(LAYERS)}
    with torch.no_grad():
        for s in seqs:
            hs = ref(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
            for layer in range(LAYERS):
                out[layer].append(hs[layer + 1][0, -1].double().numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


def reference_vectors(model, pairs, method: str) -> dict[int, np.ndarray]:
    states = reference_states(model, [s for p in pairs for s in p])
    out = {}
    for layer, h in states.items():
        d = h[0::2] - h[1::2]  # [N, d]
        if method == "mean-diff":
            out[layer] = d.mean(0)
            continue
        w, v = np.linalg.eigh(d.T @ d)  # uncentred second moment of the differences
        u = v[:, np.argmax(w)]
        proj = (d @ u).mean()
        out[layer] = u * proj if proj > 0 else -u * -proj
    return out


def test_last_token_states_equal_output_hidden_states_of_each_text_alone(model):
    seqs = [s for p in PAIRS for s in p]
    got = last_token_states(model, seqs, list(range(LAYERS)), batch_size=3)
    want = reference_states(model, seqs)
    for layer in range(LAYERS):
        np.testing.assert_allclose(got[layer].numpy(), want[layer], atol=1e-5, rtol=0)
    # the last layer is the block's output, not transformers' default entry (after the final norm)
    with torch.no_grad():
        tied = model(input_ids=torch.tensor([seqs[0]]), output_hidden_states=True).hidden_states[-1][0, -1]
    assert not torch.allclose(tied, got[LAYERS - 1][0], atol=1e-3)


@pytest.mark.parametrize("layers", [[0, 2, 3], [2, 1]])  # the second stops the forward pass after block 2
@pytest.mark.parametrize("method", ["mean-diff", "pca"])
def test_compute_vector_equals_an_independent_computation(model, method, layers):
    art = compute_vector(model, PAIRS, method=method, layers=layers, batch_size=4)
    want = reference_vectors(model, PAIRS, method)
    assert art.kind == "add" and art.method == method and art.layers == sorted(layers)
    for layer in art.layers:
        np.testing.assert_allclose(art.direction(layer).numpy(), want[layer], atol=1e-5, rtol=0)
    meta = art.extra
    assert meta["pairs"] == "5" and json.loads(meta["layers"]) == sorted(layers)
    assert meta["position"] == "last-token"
    states = reference_states(model, [s for p in PAIRS for s in p])
    hidden = json.loads(meta["hidden_norms"])
    relative = json.loads(meta["relative_norms"])
    for layer in art.layers:
        mean_norm = np.linalg.norm(states[layer], axis=1).mean()
        assert hidden[str(layer)] == pytest.approx(mean_norm, rel=1e-5)
        assert relative[str(layer)] == pytest.approx(np.linalg.norm(want[layer]) / mean_norm, rel=1e-5)


def test_pca_points_to_the_positives(model):
    art = compute_vector(model, PAIRS, method="pca", layers=[1])
    flipped = compute_vector(model, [(n, p) for p, n in PAIRS], method="pca", layers=[1])
    torch.testing.assert_close(flipped.direction(1), -art.direction(1), atol=1e-6, rtol=1e-5)
    states = last_token_states(model, [s for p in PAIRS for s in p], [1])[1]
    diffs = states[0::2] - states[1::2]
    assert float((diffs @ art.direction(1)).mean()) > 0


def test_default_layers_are_the_middle_half():
    assert default_compute_layers(30) == list(range(7, 22))
    assert default_compute_layers(4) == [1, 2]
    assert default_compute_layers(1) == [0]
    art = compute_vector(tiny_llama(layers=LAYERS), PAIRS)
    assert art.layers == [1, 2] and art.method == "mean-diff"


def test_the_view_shares_weights_and_runs_without_hooks(model):
    hooks = install_steering(model)
    try:
        art = add_artifact(model, norm=50.0)
        prof = compile_profile([(VectorRef("a"), art)], num_layers=LAYERS, hidden_size=64)
        ids = torch.tensor([PAIRS[0][0]])
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            hooks.set_batch([hooks.acquire(prof)])  # the engine's batch map, left set as between steps
            steered = model(input_ids=ids).logits
            view = unhooked_view(model)
            through_view = view(input_ids=ids).logits
        assert not torch.allclose(steered, plain, atol=1e-2)
        assert torch.equal(through_view, plain)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in view.modules())
        assert any(m._forward_hooks for m in model.modules())  # the model keeps its hooks
        params = dict(model.named_parameters())
        assert all(p.data_ptr() == params[n].data_ptr() for n, p in view.named_parameters())
        hooks.clear_batch()
    finally:
        hooks.remove()


def test_a_forward_wrapper_on_the_instance_is_refused():
    model = tiny_llama()
    model.model.layers[0].forward = model.model.layers[0].forward  # what offloading hooks do
    with pytest.raises(ValueError, match="forward wrapper"):
        unhooked_view(model)


@pytest.mark.parametrize(
    ("pairs", "kwargs", "message"),
    [
        (PAIRS[:1], {}, "between 2 and 1000 pairs"),
        ([PAIRS[0]] * 1001, {}, "between 2 and 1000 pairs"),
        (PAIRS, {"method": "median"}, "choose one of mean-diff, pca"),
        (PAIRS, {"layers": [4]}, r"layers \[4\] out of range"),
        (PAIRS, {"layers": []}, "at least one layer"),
        ([([1, 2], [])] * 2, {}, "at least one token"),
    ],
)
def test_bad_requests_name_the_problem(model, pairs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_vector(model, pairs, **kwargs)


def test_read_pairs_takes_contrast_and_preference_records(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"positive": "I love it.", "negative": "I hate it."}\n\n'
        '{"prompt": "Hi?", "chosen": "Hello, friend!", "rejected": "Go away."}\n'
    )
    pairs = read_pairs(path, tokenizer)
    assert pairs[0] == ("I love it.", "I hate it.")
    prefix = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True
    )
    assert pairs[1] == (prefix + "Hello, friend!", prefix + "Go away.")
    ids = encode_pairs(tokenizer, pairs, max_tokens=256)
    assert ids[0][0] == tokenizer.encode("I love it.", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"pairs\[1\]\.positive: \d+ tokens; each text must have 1 to 5"):
        encode_pairs(tokenizer, pairs, max_tokens=5)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"positive": "a", "negative": "b"}'], "between 2 and 1000 pairs"),
        (['{"positive": "a", "negative": "b"}', "not json"], r"pairs.jsonl:2: not valid JSON"),
        (['{"positive": "a", "negative": "b"}', '{"positive": "a"}'], r":2: 'positive' and 'negative'"),
        (['{"positive": "a", "negative": "b"}', '{"text": "a"}'], r":2: give 'positive' and 'negative'"),
        (['{"positive": "a", "negative": "b"}', "[1, 2]"], r":2: expected a JSON object"),
    ],
)
def test_read_pairs_names_the_bad_line(tmp_path, lines, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


def test_cli_compute_equals_the_library(tmp_path, tokenizer, capsys):
    from steering_vectors import load_artifact
    from steerserve.cli import main as cli

    model = tiny_llama(layers=LAYERS)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    records = [
        {"positive": "I love it.", "negative": "I hate it."},
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "v.safetensors"
    argv = ["vectors", "compute", "--pairs", str(pairs), "--method", "pca", "--out", str(out)]
    assert cli([*argv, "--model", str(model_dir), "--layers", "0,2-3", "--description", "tone"]) == 0
    assert f"wrote {out} (add, pca from 2 pairs, layers [0, 2, 3]" in capsys.readouterr().out
    got = load_artifact(out)
    ids = encode_pairs(tokenizer, read_pairs(pairs, tokenizer), 1024)
    want = compute_vector(model, ids, method="pca", layers=[0, 2, 3])
    for layer in (0, 2, 3):
        torch.testing.assert_close(got.direction(layer), want.direction(layer), atol=1e-6, rtol=1e-5)
    assert got.extra["description"] == "tone" and got.extra["base_model"] == "model"
    assert cli([*argv, "--model", str(model_dir), "--layers", "9"]) == 2
    assert "layers [9] out of range" in capsys.readouterr().err


def _readme_accuracy(method: str) -> dict[float, float]:
    """{strength: held-out preference accuracy %} of ``method`` in the README's table."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if ln.startswith("| vector computed from the tone pairs |")]
    header = lines[0].strip("|").split("|")[1:]
    row = next(ln for ln in readme.splitlines() if ln.startswith(f"| `{method}` |"))
    values = [float(v.strip().rstrip("%").strip()) for v in row.strip("|").split("|")[1:]]
    return {float(h.strip().replace("−", "-")): v for h, v in zip(header, values, strict=True)}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 10 CPU-minutes: 24 min with three strengths on the loaded 2-core machine
def test_the_tone_vector_moves_held_out_preference_as_the_readme_reports():
    """On the default model, the mean-diff vector of the 336 demo tone pairs (read as ``vectors compute``
    reads them) moves the held-out preference accuracy as the README's table says, within one pair."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from eval_compute import contrast_pairs, preference_accuracy, tone_pairs

    from basemodel import load_model

    lm = load_model(quantization="none", dtype="float32")
    art = compute_vector(lm.model, contrast_pairs(lm.tokenizer, "train"), method="mean-diff")
    assert art.layers == list(range(7, 22))
    reported = _readme_accuracy("mean-diff")
    test = tone_pairs("test")
    hooks = install_steering(lm.model)
    try:
        got = {w: preference_accuracy(lm.model, lm.tokenizer, hooks, art, w, test) for w in CHECKED}
    finally:
        hooks.remove()
    for w in CHECKED:
        assert got[w] == pytest.approx(reported[w], abs=100 / len(test) + 0.05), (w, got, reported)
    assert got[0.125] > got[0.0]
