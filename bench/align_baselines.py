"""The two alignment baselines the evaluation compares RED and RAHF with, written as steerserve artifacts.

* ``mean-diff``: the ``steering-vectors`` library (PyPI 0.12.2, ``bench/peers.py``) trains a steering
  vector on the preference pairs with its own activation recording: for each pair the chosen and the
  rejected conversation (chat template applied) are run, the decoder-block outputs at their last token
  are read, and its mean aggregator averages positive − negative per layer. The layers are RAHF's
  target layers (9, 11, …, 19 on the default model). A mean difference has no training randomness, so
  seed s draws a random 80 % of the training pairs (the spread is over data). Written as kind ``add``
  (method ``mean-diff``), applied at strength 1 like the library's ``multiplier=1``.
* ``dpo``: TRL's ``DPOTrainer`` (PyPI 1.16.0) with a peft LoRA (rank 8, alpha 16, ``q_proj``/``v_proj``
  of every block — the RAHF adapter's shape), sigmoid loss, beta 0.1, on the same pairs. The adapter is
  saved by peft and converted by ``steering_vectors.peft_io`` (``steerserve vectors import-peft``) to kind
  ``lora`` (method ``dpo``), so the server applies it per request.

Usage::

    python bench/align_baselines.py mean-diff --seed 0 --out runs/align/mean-diff/seed0/add.safetensors
    python bench/align_baselines.py dpo --seed 0 --out runs/align/dpo/seed0/lora.safetensors
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peers import peer_steering_vectors  # noqa: E402

from basemodel import load_model, model_skeleton  # noqa: E402
from steering_vectors import Artifact, save_artifact  # noqa: E402
from steering_vectors.peft_io import import_peft  # noqa: E402
from training.demo import demo_path  # noqa: E402
from training.loaders import load_preferences  # noqa: E402
from training.rahf import default_target_layers  # noqa: E402
from training.runtime import peak_rss_mb, set_seed  # noqa: E402

SUBSAMPLE = 0.8


def _artifact(lm, kind: str, method: str, tensors: dict, meta: dict, **kw) -> Artifact:
    cfg = lm.model.config
    return Artifact(
        kind=kind,
        tensors=tensors,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        model_type=cfg.model_type,
        method=method,
        extra={"base_model": lm.model_id, "training": json.dumps(meta, sort_keys=True)},
        **kw,
    )


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _chat(tok, prompt: list[dict], reply: str) -> str:
    return tok.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)


def mean_diff(args: argparse.Namespace) -> dict:
    """Train a mean-difference vector with the steering-vectors library; returns the run summary."""
    sv = peer_steering_vectors()
    lm = load_model(args.model, quantization="none", dtype="float32", device="cpu")
    tok = lm.tokenizer
    pairs = load_preferences(args.data)
    rng = random.Random(args.seed)
    pairs = rng.sample(pairs, int(round(SUBSAMPLE * len(pairs))))
    samples = [(_chat(tok, p.prompt, p.chosen), _chat(tok, p.prompt, p.rejected)) for p in pairs]
    layers = default_target_layers(lm.model.config.num_hidden_layers)
    vec = sv.train_steering_vector(
        lm.model, tok, samples, layers=layers, layer_type="decoder_block", batch_size=8, show_progress=True
    )
    tensors = {f"layers.{layer}.direction": vec.layer_activations[layer].float().cpu() for layer in layers}
    meta = {
        "library": f"steering-vectors {sv.__version__}",
        "pairs": len(pairs),
        "seed": args.seed,
        "layers": layers,
        "data": _rel(args.data),
        "read_token_index": -1,
        "aggregator": "mean",
    }
    return {"artifact": _artifact(lm, "add", "mean-diff", tensors, meta), "meta": meta}


def dpo(args: argparse.Namespace) -> dict:
    """DPO with a LoRA adapter through TRL; returns the run summary."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    set_seed(args.seed)
    lm = load_model(args.model, quantization="none", dtype="float32", device="cpu")
    pairs = load_preferences(args.data)
    ds = Dataset.from_list(
        [
            {
                "prompt": p.prompt,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in pairs
        ]
    )
    out_dir = Path(args.out).parent
    cfg = DPOConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.steps // 10),
        beta=args.beta,
        max_length=256,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL turns it on by default; a 135M model needs no memory saving
        disable_tqdm=False,
    )
    peft_cfg = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=lm.model, args=cfg, train_dataset=ds, processing_class=lm.tokenizer, peft_config=peft_cfg
    )
    t0 = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - t0
    trainer.model.save_pretrained(out_dir / "peft")  # adapter_config.json + adapter_model.safetensors
    tensors = import_peft(out_dir / "peft", model_skeleton(args.model)).tensors  # peft wrapped lm.model
    logs = [h for h in trainer.state.log_history if "loss" in h]
    meta = {
        "library": "trl 1.16.0 DPOTrainer + peft LoRA",
        "pairs": len(pairs),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "beta": args.beta,
        "lora_rank": 8,
        "lora_alpha": 16,
        "modules": ["q_proj", "v_proj"],
        "data": _rel(args.data),
        "train_s": round(train_s, 1),
        "loss_first": logs[0]["loss"] if logs else None,
        "loss_last": logs[-1]["loss"] if logs else None,
        "reward_accuracy_last": logs[-1].get("rewards/accuracies") if logs else None,
    }
    return {"artifact": _artifact(lm, "lora", "dpo", tensors, meta, lora_alpha=16.0), "meta": meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=("mean-diff", "dpo"))
    ap.add_argument("--out", required=True, help="artifact path (.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(demo_path("tone_pref", "train")))
    ap.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    ap.add_argument("--steps", type=int, default=84, help="dpo: optimizer steps (84 = one epoch at batch 4)")
    ap.add_argument("--batch-size", type=int, default=4, help="dpo: pairs per step")
    ap.add_argument("--lr", type=float, default=5e-4, help="dpo: learning rate")
    ap.add_argument("--beta", type=float, default=0.1, help="dpo: KL strength")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    res = (mean_diff if args.method == "mean-diff" else dpo)(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_artifact(res["artifact"], out)
    summary = {
        "artifact": str(out),
        "sha256": sha,
        "method": args.method,
        **res["meta"],
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
