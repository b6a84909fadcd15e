"""``steerserve train red`` and ``steerserve train rahf``: argparse wiring of the offline trainers.

:func:`add_train_parser` registers both subcommands on an argparse subparsers object; each sets
``args.run`` to the function that executes it. ``python -m training.cli red|rahf ...`` runs them
standalone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

__all__ = ["add_train_parser", "main", "run_rahf", "run_red"]

FORMATS = ("auto", "hh-rlhf", "ultrafeedback", "jsonl")


def _common(
    p: argparse.ArgumentParser, *, steps: int | None, batch: int, accum: int, steps_help: str
) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data", required=True, help="training data: .jsonl/.json/.parquet file or a save_to_disk folder"
    )
    g.add_argument(
        "--format", choices=FORMATS, default="auto", help="data format (default: detected from the file)"
    )
    g.add_argument(
        "--eval-data",
        default=None,
        help="held-out data (default: a 10%% split of --data, disjoint by prompt)",
    )
    g.add_argument("--limit", type=int, default=None, help="use at most N training examples")
    g.add_argument(
        "--model", default=None, help="local Hugging Face model directory (default: the embedded model)"
    )
    g.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (multi-GPU: accelerate launch)"
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="compute dtype of the frozen base model (trainable tensors stay float32)",
    )
    g.add_argument("--max-length", type=int, default=256, help="truncate prompt + response to N tokens")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; on a busy CPU set OMP_WAIT_POLICY=PASSIVE)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=steps, help=steps_help)
    g.add_argument(
        "--batch-size", type=int, default=batch, help=f"examples per micro-batch and process ({batch})"
    )
    g.add_argument(
        "--grad-accum", type=int, default=accum, help=f"micro-batches per optimizer step ({accum})"
    )
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction of the steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-batch-size", type=int, default=16)
    g = p.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-dir", default=None, help="where checkpoints go (default: next to the output)"
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=25, help="save every N optimizer steps (and at the end)"
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="resume from the checkpoints in DIR (same options as the interrupted run)",
    )


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``red`` and ``rahf`` on ``subparsers`` (e.g. the one of ``steerserve train``)."""
    p = subparsers.add_parser(
        "red",
        help="train RED scale/bias edits of the FFN outputs (writes a red artifact)",
        description="RED (Wu et al., 2024): per-layer scale and bias on the FFN output, base model frozen, "
        "loss on the response tokens. Writes OUT, OUT's .log.jsonl, .png, .json and a .ckpt/ dir.",
    )
    _common(p, steps=100, batch=8, accum=1, steps_help="optimizer steps (default 100)")
    p.add_argument("--out", required=True, help="output artifact (.safetensors)")
    p.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate (RED uses large ones; 2e-2)")
    p.add_argument("--eval-limit", type=int, default=None, help="use at most N held-out examples")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: before/after)")
    p.add_argument("--description", default=None, help="description stored in the artifact")
    p.set_defaults(run=run_red)

    p = subparsers.add_parser(
        "rahf",
        help="train RAHF preference representations (writes add and lora artifacts)",
        description="RAHF (Liu et al., 2024): step 1 SCIT or Dual preference fine-tunes, step 2 hidden-state "
        "differences over the response tokens, step 3 LoRA distillation. Writes add.safetensors, "
        "lora.safetensors, log.jsonl, loss.png and summary.json into --out-dir.",
    )
    _common(
        p,
        steps=None,
        batch=4,
        accum=2,
        steps_help="optimizer steps of step 1 (per model) and step 3 unless --tune-steps/--distill-steps",
    )
    p.add_argument("--variant", choices=("scit", "dual"), required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--finetune", choices=("lora", "full"), default="lora", help="step 1 fine-tuning (lora)")
    p.add_argument("--lr", type=float, default=None, help="step 1 learning rate (lora 1e-3, full 3e-5)")
    p.add_argument("--tune-steps", type=int, default=None, help="step 1 steps per model (default 40)")
    p.add_argument("--tune-rank", type=int, default=8, help="step 1 LoRA rank (all linears of every block)")
    p.add_argument("--distill-steps", type=int, default=None, help="step 3 steps (default 50)")
    p.add_argument("--distill-lr", type=float, default=2e-3, help="step 3 learning rate")
    p.add_argument("--lora-rank", type=int, default=8, help="step 3 LoRA rank (paper: 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="step 3 LoRA alpha (paper: 16)")
    p.add_argument(
        "--lora-modules", default="q_proj,v_proj", help="step 3 LoRA modules (paper: q_proj,v_proj)"
    )
    p.add_argument(
        "--target-layers",
        default=None,
        help="comma-separated target layers (default: the middle layers, every second one)",
    )
    p.add_argument("--alpha", type=float, default=5.0, help="target h_base + alpha*v (paper: 5)")
    p.add_argument(
        "--normalize",
        choices=("relative", "none"),
        default="relative",
        help="rescale v per layer so its mean token norm is --v-norm x the hidden states' (relative), "
        "or use the raw differences as the paper does (none)",
    )
    p.add_argument(
        "--v-norm", type=float, default=0.05, help="relative size of v with --normalize relative (0.05)"
    )
    p.add_argument(
        "--add-scale",
        type=float,
        default=None,
        help="scale of the add artifact's mean differences (default alpha / #target layers)",
    )
    p.add_argument(
        "--extract-on",
        choices=("chosen", "rejected", "both"),
        default="both",
        help="responses whose tokens give the differences and the step-3 data",
    )
    p.add_argument(
        "--extract-limit",
        type=int,
        default=None,
        help="pairs (a seeded random subset) whose responses give the differences and the step-3 data "
        "(default: as many as step 3 consumes in one epoch)",
    )
    p.add_argument("--good-instruction", default=None, help="SCIT instruction for the preferred replies")
    p.add_argument("--bad-instruction", default=None, help="SCIT instruction for the dispreferred replies")
    p.add_argument("--eval-limit", type=int, default=24, help="use at most N held-out pairs (24)")
    p.set_defaults(run=run_rahf)


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _setup(args: argparse.Namespace) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _shared_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options `train red` and `train rahf` share, as config keyword arguments."""
    return {
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm or None,
        "max_length": args.max_length,
        "eval_batch_size": args.eval_batch_size,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


def run_red(args: argparse.Namespace) -> int:
    from .red import RedConfig, train_red

    _setup(args)
    cfg = RedConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        format=args.format,
        eval_data=args.eval_data,
        limit=args.limit,
        eval_limit=args.eval_limit,
        max_steps=args.max_steps,
        lr=args.lr,
        eval_every=args.eval_every,
        description=args.description,
        **_shared_config(args),
    )
    summary = train_red(cfg)
    print(json.dumps({"artifact": summary["artifact"], **summary["metrics"]}, indent=2))
    return 0


def run_rahf(args: argparse.Namespace) -> int:
    from .rahf import BAD_INSTRUCTION, GOOD_INSTRUCTION, RahfConfig, train_rahf

    _setup(args)
    targets = [int(x) for x in args.target_layers.split(",")] if args.target_layers else None
    cfg = RahfConfig(
        variant=args.variant,
        data=args.data,
        out_dir=args.out_dir,
        model=args.model,
        format=args.format,
        eval_data=args.eval_data,
        limit=args.limit,
        eval_limit=args.eval_limit,
        finetune=args.finetune,
        tune_steps=_first(args.tune_steps, args.max_steps, 40),
        tune_lr=args.lr,
        tune_rank=args.tune_rank,
        distill_steps=_first(args.distill_steps, args.max_steps, 50),
        distill_lr=args.distill_lr,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_modules=tuple(m.strip() for m in args.lora_modules.split(",") if m.strip()),
        target_layers=targets,
        alpha=args.alpha,
        normalize=args.normalize,
        v_norm=args.v_norm,
        add_scale=args.add_scale,
        extract_on=args.extract_on,
        extract_limit=args.extract_limit,
        good_instruction=args.good_instruction or GOOD_INSTRUCTION,
        bad_instruction=args.bad_instruction or BAD_INSTRUCTION,
        **_shared_config(args),
    )
    summary = train_rahf(cfg)
    m = summary["metrics"]
    print(
        json.dumps(
            {
                "add": summary.get("add"),
                "lora": summary.get("lora"),
                "wall_s": m["wall_s"],
                "peak_rss_mb": m["peak_rss_mb"],
                "phases": m["phases"],
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.cli", description="Offline RED / RAHF training."
    )
    add_train_parser(parser.add_subparsers(dest="method", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
