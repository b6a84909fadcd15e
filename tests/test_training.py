"""Offline training (training/red.py, loop, options, tokenisation) on a tiny random Llama; RAHF is in
test_training_rahf.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoTokenizer

from steering_vectors import load_artifact
from training.cli import build_parser
from training.cli import main as train_main
from training.config import RahfConfig, RedConfig
from training.loop import LoopSpec, lr_factor, run_loop
from training.options import from_args, recorded
from training.red import RedModel
from training.runtime import make_accelerator
from training.tokens import collate, encode

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
    assert (cfg.extract_on, cfg.tune_alpha, cfg.instruct_share, cfg.normalize) == (
        "random",
        64.0,
        0.5,
        "none",
    )
    cfg = RahfConfig(variant="dual", data="d", out_dir="o", finetune="full", tune_steps=3)
    assert (cfg.tune_steps, cfg.distill_steps, cfg.tune_lr, cfg.extract_on) == (3, 60, 2e-5, "both")
    assert (cfg.batch_size, cfg.grad_accum, cfg.eval_limit, cfg.distill_schedule) == (4, 1, 24, "constant")
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
    with pytest.raises(ValueError, match="instruct_share"):
        RahfConfig(variant="scit", data="d", out_dir="o", instruct_share=0.0)
    with pytest.raises(ValueError, match="extract_on must be one of"):
        RahfConfig(variant="scit", data="d", out_dir="o", extract_on="all")


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


def test_lr_schedules():
    assert [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]  # no warmup, no decay
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, 2, "cosine")


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
