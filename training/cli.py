"""``steerserve train red`` and ``steerserve train rahf``: the command line of the offline trainers.

:func:`add_train_parser` registers both subcommands on an argparse subparsers object, their options
generated from :class:`~training.config.RedConfig` and :class:`~training.config.RahfConfig`; each sets
``args.run`` to the function that executes it. ``python -m training.cli red|rahf ...`` runs them
standalone. Building the parser imports no torch; the trainers are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import RahfConfig, RedConfig
from .options import add_arguments, from_args

__all__ = ["add_train_parser", "build_parser", "main", "run_rahf", "run_red"]


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``red`` and ``rahf`` on ``subparsers`` (e.g. the one of ``steerserve train``)."""
    p = subparsers.add_parser(
        "red",
        allow_abbrev=False,
        help="train RED scale/bias edits of the FFN outputs (writes a red artifact)",
        description="RED (Wu et al., 2024): per-layer scale and bias on the FFN output, base model frozen, "
        "loss on the response tokens. Writes OUT, OUT's .log.jsonl, .png, .json and a .ckpt/ dir.",
    )
    add_arguments(p, RedConfig, "RED")
    p.set_defaults(run=run_red)
    p = subparsers.add_parser(
        "rahf",
        allow_abbrev=False,  # `--out x` must not pass for --out-dir
        help="train RAHF preference representations (writes add and lora artifacts)",
        description="RAHF (Liu et al., 2024): step 1 SCIT or Dual preference fine-tunes, step 2 hidden-state "
        "differences over the response tokens, step 3 LoRA distillation. Writes add.safetensors, "
        "lora.safetensors, log.jsonl, loss.png and summary.json into --out-dir.",
    )
    add_arguments(p, RahfConfig, "RAHF")
    p.set_defaults(run=run_rahf)


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_red(args: argparse.Namespace) -> int:
    """Train RED from parsed arguments; prints the artifact's path and metrics as JSON."""
    from .red import train_red

    _logging()
    summary = train_red(from_args(RedConfig, args))
    print(json.dumps({"artifact": summary["artifact"], **summary["metrics"]}, indent=2))
    return 0


def run_rahf(args: argparse.Namespace) -> int:
    """Train RAHF from parsed arguments; prints the artifacts' paths, time, memory and phases as JSON."""
    from .rahf import train_rahf

    _logging()
    if args.out_dir.endswith(".safetensors"):
        raise ValueError(
            f"--out-dir {args.out_dir} names a folder: rahf writes add.safetensors and more into it"
        )
    summary = train_rahf(from_args(RahfConfig, args))
    m = summary["metrics"]
    keys = ("wall_s", "peak_rss_mb", "phases")
    print(
        json.dumps(
            {"add": summary.get("add"), "lora": summary.get("lora"), **{k: m[k] for k in keys}}, indent=2
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m training.cli``."""
    parser = argparse.ArgumentParser(
        prog="python -m training.cli", description="Offline RED / RAHF training."
    )
    add_train_parser(parser.add_subparsers(dest="method", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen trainer; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
