"""The RAHF pipeline: load the data and the base model, then step 1, step 2, step 3 and the outputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import RahfConfig
from ..loaders import load_preferences, load_splits
from ..runtime import start
from .distill import distill
from .extract import extract
from .instruct import instruct
from .outputs import write_outputs
from .run import RahfRun

__all__ = ["train_rahf"]


def train_rahf(cfg: RahfConfig) -> dict[str, Any]:
    """Run the three RAHF steps and write ``add.safetensors`` and ``lora.safetensors`` (and the log,
    plot and summary) into ``cfg.out_dir``. Returns the summary."""
    t0 = time.monotonic()
    accelerator = start(cfg)
    if accelerator.is_main_process:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    pairs, eval_pairs = load_splits(cfg, load_preferences)
    run = RahfRun.open(cfg, accelerator)
    contrast = instruct(run, pairs, eval_pairs)  # step 1: the preference fine-tune(s)
    data = extract(run, contrast, pairs, eval_pairs)  # step 2: their hidden-state differences
    lora = distill(run, data)  # step 3: the LoRA adapter towards h_base + alpha * v
    return write_outputs(run, lora, data, len(pairs), len(eval_pairs), t0)
