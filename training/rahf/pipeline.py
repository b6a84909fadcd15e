"""The RAHF pipeline: load the data and the base model, then step 1, step 2, step 3 and the outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import RahfConfig
from ..loaders import load_preferences, load_splits, split_holdout
from ..records import PreferencePair, prompt_key
from ..runtime import start
from .distill import distill
from .extract import extract
from .instruct import instruct
from .outputs import write_outputs
from .run import RahfRun

__all__ = ["split_steps", "train_rahf"]


def split_steps(
    pairs: list[PreferencePair], share: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(step 1's pairs, steps 2-3's pairs): about ``share`` of ``pairs`` for step 1 and the rest for
    steps 2-3, disjoint by prompt and seeded (the official code trains step 1 and steps 2-3 on two
    halves of its data); ``share`` 1 gives every pair to both."""
    if share >= 1:
        return pairs, pairs
    later, first = split_holdout(pairs, share, seed, key=prompt_key)
    return first, later


def train_rahf(cfg: RahfConfig) -> dict[str, Any]:
    """Run the three RAHF steps and write ``add.safetensors`` and the final model (``lora.safetensors``,
    or ``model/`` after a full fine-tune) and the log, plot and summary into ``cfg.out_dir``. Returns the
    summary."""
    t0 = time.monotonic()
    accelerator = start(cfg)
    if accelerator.is_main_process:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    pairs, eval_pairs = load_splits(cfg, load_preferences)
    step1_pairs, later_pairs = split_steps(pairs, cfg.instruct_share, cfg.seed)
    run = RahfRun.open(cfg, accelerator)
    contrast = instruct(run, step1_pairs, eval_pairs)  # step 1: the preference fine-tune(s)
    data = extract(run, contrast, later_pairs, eval_pairs)  # step 2: their hidden-state differences
    lora = distill(run, contrast.tuned, data)  # step 3: a LoRA on the step-1 model, towards h + alpha v
    return write_outputs(
        run, contrast.tuned, lora, data, (len(step1_pairs), len(later_pairs)), len(eval_pairs), t0
    )
