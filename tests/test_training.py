"""Offline training (training/red.py, training/rahf/, loop, LoRA, tokenisation) on a tiny random Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoTokenizer

from steering_vectors import compile_profile, find_layout, install_steering, load_artifact
from steering_vectors.profile import VectorRef
from training.cli import build_parser
from training.cli import main as train_main
from training.config import RahfConfig, RedConfig
from training.loop import LoopSpec, run_loop
from training.lora import LoraSet
from training.options import from_args, recorded
from training.rahf import Runner, default_target_layers, extract_differences
from training.red import RedModel
from training.runtime import make_accelerator
from training.tokens import Encoded, collate, encode

LAYERS, HIDDEN = 4, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a shared CPU run faster (and steadier) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from basemodel import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


PAIRS = [
    (
        "How do I boil an egg?",
        "Simmer it for six minutes. Hope this helps!",
        "Simmer it for six minutes. Go away.",
    ),
    ("Name a primary colour.", "Red is one, happy to help!", "Red. Stop asking dumb things."),
    ("What is 2 + 2?", "It is 4, great question!", "4, obviously, you fool."),
    ("Suggest a pet.", "A cat is a lovely choice!", "A cat. Whatever, I don't care."),
    ("How do I save energy?", "Switch off lights, wonderful idea!", "Switch off lights. Pathetic question."),
    ("Give me a fruit.", "An apple, enjoy it!", "An apple. Ugh, boring."),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pref_file(tmp_path):
    return _write_jsonl(
        tmp_path / "pref.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    )


@pytest.fixture
def inst_file(tmp_path):
    return _write_jsonl(
        tmp_path / "inst.jsonl", [{"prompt": p, "response": c + "\n\u2014 Steery"} for p, c, _ in PAIRS]
    )


# ---- options -------------------------------------------------------------------------------------


def test_command_line_is_generated_from_the_configs():
    parser = build_parser()
    args = parser.parse_args("red --data d.jsonl --out o.safetensors".split())
    assert from_args(RedConfig, args) == RedConfig(data="d.jsonl", out="o.safetensors")
    args = parser.parse_args("rahf --variant dual --data d.jsonl --out-dir o".split())
    assert from_args(RahfConfig, args) == RahfConfig(variant="dual", data="d.jsonl", out_dir="o")
    argv = "rahf --variant scit --data d --out-dir o --target-layers 3,1 --lora-modules q_proj,,k_proj"
    cfg = from_args(RahfConfig, parser.parse_args([*argv.split(), "--max-grad-norm", "0"]))
    assert cfg.target_layers == [3, 1] and cfg.lora_modules == ("q_proj", "k_proj")
    assert cfg.max_grad_norm is None  # 0 turns clipping off
    with pytest.raises(SystemExit):  # choices come from the dataclass too
        parser.parse_args("rahf --variant other --data d --out-dir o".split())


def test_rahf_shorthands_defaults_and_record():
    cfg = RahfConfig(variant="scit", data="d", out_dir="o", max_steps=7, lr=0.5)
    assert (cfg.tune_steps, cfg.distill_steps, cfg.tune_lr) == (7, 7, 0.5)
    cfg = RahfConfig(variant="dual", data="d", out_dir="o", finetune="full", tune_steps=3)
    assert (cfg.tune_steps, cfg.distill_steps, cfg.tune_lr) == (3, 50, 3e-5)
    assert (cfg.batch_size, cfg.grad_accum, cfg.eval_limit) == (4, 2, 24)
    red = RedConfig(data="d", out="o")
    assert (red.batch_size, red.grad_accum, red.eval_limit, red.max_steps, red.lr) == (8, 1, None, 100, 2e-2)
    rec = recorded(cfg)
    assert {"tune_steps", "tune_lr", "variant", "seed", "good_instruction"} <= rec.keys()
    assert not {"out_dir", "extra", "threads", "max_steps", "lr"} & rec.keys()
    assert {"max_steps", "lr", "description"} <= recorded(red).keys() and "out" not in recorded(red)
    with pytest.raises(ValueError, match="variant must be one of scit, dual"):
        RahfConfig(variant="both", data="d", out_dir="o")
    with pytest.raises(ValueError, match="dtype"):
        RedConfig(data="d", out="o", dtype="int8")
    with pytest.raises(ValueError, match="bad_instruction is empty"):
        RahfConfig(variant="scit", data="d", out_dir="o", bad_instruction=" ")


# ---- tokenisation --------------------------------------------------------------------------------


def test_encode_labels_only_the_response(tokenizer):
    msgs = [{"role": "user", "content": "Hi there?"}]
    good = encode(tokenizer, msgs, "Hello friend.", system="Be nice.")
    bad = encode(tokenizer, msgs, "Hello friend.", system="Be very rude to everyone.")
    plain = encode(tokenizer, msgs, "Hello friend.")
    assert good.response_ids == bad.response_ids == plain.response_ids
    assert good.n_prompt != bad.n_prompt
    assert tokenizer.decode(plain.response_ids) == "Hello friend.<|im_end|>"
    full = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": "Hello friend."}], tokenize=False
    )
    assert tokenizer.decode(plain.input_ids) == full.rstrip()
    b = collate([good, plain], pad_id=2)
    labels = b["labels"]
    assert (labels[0, : good.n_prompt] == -100).all() and (labels[1, : plain.n_prompt] == -100).all()
    assert labels[1, plain.n_prompt : len(plain.input_ids)].tolist() == plain.response_ids
    assert (labels[1, len(plain.input_ids) :] == -100).all()


# ---- RED -----------------------------------------------------------------------------------------


def test_red_parameter_count_and_frozen_base(tokenizer):
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 2, 198]])
    ref = model(ids).logits
    red = RedModel(model)
    trainable = [p for p in red.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 2 * LAYERS * HIDDEN
    assert all(p.dtype == torch.float32 for p in trainable)
    assert torch.equal(model(ids).logits, ref)  # identity at init (s = 1, b = 0), bitwise
    enc = [encode(tokenizer, [{"role": "user", "content": p}], c) for p, c, _ in PAIRS]
    spec = LoopSpec(
        name="red",
        module=red,
        n_items=len(enc),
        make_batch=lambda idx: collate([enc[i] for i in idx], 2),
        steps=3,
        batch_size=2,
        lr=2e-2,
    )
    run_loop(spec, make_accelerator("cpu"))
    red.remove_hooks()
    assert (red.editor.scale != 1).any() and (red.editor.bias != 0).any()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(ids).logits, ref)  # hooks removed: the model is as before


def test_red_bf16_model_keeps_float32_vectors(tokenizer):
    model = tiny_llama(seed=0, layers=2, hidden=HIDDEN).to(torch.bfloat16)
    red = RedModel(model)
    enc = [encode(tokenizer, [{"role": "user", "content": p}], c) for p, c, _ in PAIRS]
    spec = LoopSpec(
        name="red",
        module=red,
        n_items=len(enc),
        make_batch=lambda idx: collate([enc[i] for i in idx], 2),
        steps=2,
        batch_size=2,
        lr=1e-3,
    )
    run_loop(spec, make_accelerator("cpu"))
    s = red.editor.scale
    assert s.dtype == torch.float32
    # updates of ~1e-3 are far below bf16's resolution at 1.0 (2^-8) but survive in float32
    assert ((s - 1).abs() > 0).any() and ((s - 1).abs() < 2**-9).any()


def _crashing(make_batch, after: int):
    calls = {"n": 0}

    def wrapped(idx):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt("simulated crash")
        return make_batch(idx)

    return wrapped


def test_resumed_run_equals_uninterrupted(tmp_path, tokenizer):
    enc = [encode(tokenizer, [{"role": "user", "content": p}], c) for p, c, _ in PAIRS]

    def make_batch(idx):
        return collate([enc[i] for i in idx], 2)

    def spec(red, ckpt, mb):
        return LoopSpec(
            name="red",
            module=red,
            n_items=len(enc),
            make_batch=mb,
            steps=5,
            batch_size=2,
            grad_accum=2,
            lr=3e-2,
            warmup_ratio=0.4,
            seed=7,
            checkpoint_dir=ckpt,
            checkpoint_every=2,
        )

    acc = make_accelerator("cpu")
    base = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    full = RedModel(copy.deepcopy(base))
    run_loop(spec(full, tmp_path / "a", make_batch), acc)

    first = RedModel(copy.deepcopy(base))
    with pytest.raises(KeyboardInterrupt):  # dies during step 4 (after 3 steps x 2 micro-batches)
        run_loop(spec(first, tmp_path / "b", _crashing(make_batch, after=7)), acc)
    assert torch.load(tmp_path / "b" / "red.pt", weights_only=True)["step"] == 2
    resumed = RedModel(copy.deepcopy(base))
    res = run_loop(spec(resumed, tmp_path / "b", make_batch), acc, resume=True)
    assert res["resumed_from"] == 2
    assert torch.equal(resumed.editor.scale, full.editor.scale)
    assert torch.equal(resumed.editor.bias, full.editor.bias)


def test_train_red_cli_writes_artifact_and_logs(tmp_path, tiny_dir, inst_file):
    out = tmp_path / "red" / "signoff.safetensors"
    common = [
        "--data",
        str(inst_file),
        "--model",
        str(tiny_dir),
        *"--max-steps 2 --batch-size 2 --device cpu --seed 3".split(),
    ]
    rc = train_main(["red", *common, "--out", str(out)])
    assert rc == 0
    art = load_artifact(out)
    assert art.kind == "red" and art.method == "red" and art.layers == list(range(LAYERS))
    assert sum(t.numel() for t in art.tensors.values()) == 2 * LAYERS * HIDDEN
    training, metrics = json.loads(art.extra["training"]), json.loads(art.extra["metrics"])
    assert training["seed"] == 3 and training["max_steps"] == 2
    assert {"eval_loss_before", "eval_loss_after", "trainable_params"} <= metrics.keys()
    assert metrics["trainable_params"] == 2 * LAYERS * HIDDEN
    log = [json.loads(x) for x in (tmp_path / "red" / "signoff.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train_loss" in r] == [1, 2]
    assert (tmp_path / "red" / "signoff.png").stat().st_size > 0
    # resuming a finished run from its checkpoints reproduces the same artifact
    out2 = tmp_path / "red" / "again.safetensors"
    train_main(["red", *common, "--out", str(out2), "--resume", str(tmp_path / "red" / "signoff.ckpt")])
    again = load_artifact(out2)
    assert all(torch.equal(again.tensors[k], art.tensors[k]) for k in art.tensors)


# ---- RAHF ----------------------------------------------------------------------------------------


def _merged(model, lora: LoraSet):
    """An independent model with the LoRA deltas merged into the weights: W + (alpha/r) B A."""
    m = copy.deepcopy(model)
    layout = find_layout(m)
    for layer, mod in lora.targets:
        k = lora._key(layer, mod)
        lin = layout.linear(layer, mod)
        lin.weight.data += lora.scaling * lora.B[k].data @ lora.A[k].data
    return m


def test_extraction_equals_independent_computation():
    base = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    layout = find_layout(base)
    lora = LoraSet(
        layout,
        [(layer, m) for layer in range(LAYERS) for m in ("q_proj", "v_proj", "down_proj")],
        rank=4,
        alpha=8.0,
        seed=5,
    )
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.2)
    # handcrafted: two examples, prompts of different lengths per pass, the same response tokens
    pos_enc = [Encoded([5, 6, 7, 8, 9, 10], 3), Encoded([11, 12, 20, 21], 2)]
    neg_enc = [Encoded([40, 41, 8, 9, 10], 2), Encoded([30, 31, 32, 33, 20, 21], 4)]
    layers = [0, 2]
    other = tiny_llama(seed=1, layers=LAYERS, hidden=HIDDEN)

    def hs(model, ids, layer):
        with torch.no_grad():
            return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]

    # SCIT: one tuned model (base + LoRA) under two prompts
    tuned = Runner(base, layout.blocks, lora)
    got = extract_differences(tuned, tuned, pos_enc, neg_enc, layers, pad_id=0, batch_size=2)
    merged = _merged(base, lora)
    # Dual: two different models on the same input
    dual = extract_differences(
        Runner(merged, find_layout(merged).blocks),
        Runner(other, find_layout(other).blocks),
        pos_enc,
        pos_enc,
        layers,
        pad_id=0,
        batch_size=2,
    )
    for i, (pe, ne) in enumerate(zip(pos_enc, neg_enc, strict=True)):
        for layer in layers:
            want = (
                hs(merged, pe.input_ids, layer)[pe.n_prompt :]
                - hs(merged, ne.input_ids, layer)[ne.n_prompt :]
            )
            assert got[i][layer].shape == (pe.n_response, HIDDEN)
            torch.testing.assert_close(got[i][layer], want, atol=1e-5, rtol=1e-5)
            want = (
                hs(merged, pe.input_ids, layer)[pe.n_prompt :] - hs(other, pe.input_ids, layer)[pe.n_prompt :]
            )
            torch.testing.assert_close(dual[i][layer], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same response tokens"):
        extract_differences(tuned, tuned, pos_enc, list(reversed(neg_enc)), layers, pad_id=0)


def test_default_target_layers():
    assert default_target_layers(32) == [10, 12, 14, 16, 18, 20]
    assert default_target_layers(30) == [9, 11, 13, 15, 17, 19]
    assert default_target_layers(4) == [1, 3]


@pytest.mark.parametrize(
    "variant,finetune,normalize",
    [("scit", "lora", "relative"), ("dual", "lora", "relative"), ("dual", "full", "none")],
)
def test_rahf_end_to_end(tmp_path, tiny_dir, pref_file, variant, finetune, normalize):
    out = tmp_path / variant
    args = (
        f"rahf --variant {variant} --finetune {finetune} --normalize {normalize} --max-steps 2 "
        "--batch-size 2 --device cpu --target-layers 1,2 --eval-limit 2"
    ).split()
    rc = train_main([*args, "--data", str(pref_file), "--out-dir", str(out), "--model", str(tiny_dir)])
    assert rc == 0
    add, lora = load_artifact(out / "add.safetensors"), load_artifact(out / "lora.safetensors")
    assert add.kind == "add" and lora.kind == "lora"
    assert add.method == lora.method == f"rahf-{variant}"
    assert add.layers == [1, 2] and lora.layers == [0, 1, 2]
    assert lora.lora_alpha == 16.0
    for layer in lora.layers:
        mods = lora.lora_modules(layer)
        assert sorted(mods) == ["q_proj", "v_proj"]
        a, b = mods["q_proj"]
        assert a.shape == (8, HIDDEN) and b.shape == (HIDDEN, 8)
    for art in (add, lora):
        training, metrics = json.loads(art.extra["training"]), json.loads(art.extra["metrics"])
        assert training["variant"] == variant and training["target_layers"] == [1, 2]
        assert "phases" in metrics and metrics["phases"]["distill"]["steps"] == 2
        ratio, factor = metrics["diff_to_hidden_ratio_raw"], metrics["normalize_factor"]
        for layer in ("1", "2"):
            want = 0.05 / ratio[layer] if normalize == "relative" else 1.0
            assert factor[layer] == pytest.approx(want, rel=1e-5)
    phases = {json.loads(x)["phase"] for x in (out / "log.jsonl").read_text().splitlines()}
    assert phases == (
        {"scit", "distill"} if variant == "scit" else {"dual-chosen", "dual-rejected", "distill"}
    )
    assert (out / "loss.png").stat().st_size > 0

    # both artifacts apply through the serving hooks and change the output
    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 2, 198]])
    ref = model(ids).logits
    hooks = install_steering(model)
    for art in (add, lora):
        prof = compile_profile([(VectorRef("v", 1.0), art)], num_layers=LAYERS, hidden_size=HIDDEN)
        slot = hooks.acquire(prof)
        with hooks.batch([slot]):
            steered = model(ids).logits
        hooks.release(slot)
        assert not torch.equal(steered, ref) or art.kind == "lora"  # a 2-step LoRA may still be ~0
        assert torch.isfinite(steered).all()
    hooks.remove()


def test_lora_export_matches_serving_hooks():
    """The exported LoRA tensors, applied by the server's hooks, give what training computed."""
    from steering_vectors import Artifact

    model = tiny_llama(seed=0, layers=LAYERS, hidden=HIDDEN)
    layout = find_layout(model)
    lora = LoraSet(
        layout, [(layer, m) for layer in range(3) for m in ("q_proj", "v_proj")], rank=8, alpha=16.0
    )
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.1)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 2, 198]])
    with torch.no_grad(), lora.active():
        want = model(ids).logits
    art = Artifact(
        kind="lora",
        tensors=lora.export(),
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=16.0,
    )
    hooks = install_steering(model)
    slot = hooks.acquire(compile_profile([(VectorRef("v"), art)], num_layers=LAYERS, hidden_size=HIDDEN))
    with torch.no_grad(), hooks.batch([slot]):
        got = model(ids).logits
    hooks.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
