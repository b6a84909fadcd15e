"""The outputs of a RAHF run: the ``add`` and ``lora`` artifacts, the loss plot and ``summary.json``.

* ``lora.safetensors`` (kind ``lora``): the adapter of step 3.
* ``add.safetensors`` (kind ``add``): the (normalised) difference vectors averaged over all response
  tokens of the data at the target layers, each multiplied by ``add_scale = alpha / len(layers)``.
  Activation addition at several layers accumulates in the residual stream, so with that scale the
  total shift the model receives at strength 1 is about ``alpha`` times one mean difference - the
  displacement step 3 distils.

Both carry the training configuration and their metrics in the metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from steering_vectors import Artifact, save_artifact

from ..artifacts import artifact_metadata
from ..lora import LoraSet
from ..options import recorded
from ..runtime import peak_rss_mb
from .extract import Extracted
from .run import RahfRun

__all__ = ["write_outputs"]


def _add_scale(run: RahfRun) -> float:
    cfg = run.cfg
    return cfg.add_scale if cfg.add_scale is not None else cfg.alpha / len(run.layers)


def _training(run: RahfRun) -> dict[str, Any]:
    """The recorded options plus what the run resolved (model, dtype, layers, scale, processes)."""
    cfg = run.cfg
    training = recorded(cfg)
    training.update(
        cfg.extra,
        model=cfg.model or run.lm.model_id,
        dtype=run.lm.dtype_name,
        target_layers=run.layers,
        add_scale=_add_scale(run),
        processes=run.accelerator.num_processes,
        lora_blocks=list(range(run.layers[-1] + 1)),
    )
    return training


def _artifacts(
    run: RahfRun, lora: LoraSet, data: Extracted, training: dict, add_metrics: dict, lora_metrics: dict
) -> tuple[Artifact, Artifact]:
    cfg, layout, layers, scale = run.cfg, run.layout, run.layers, _add_scale(run)
    method, name = f"rahf-{cfg.variant}", f"RAHF-{cfg.variant.upper()}"
    shape = {
        "hidden_size": layout.hidden_size,
        "num_layers": layout.num_layers,
        "model_type": layout.model_type,
    }
    add = Artifact(
        kind="add",
        tensors={
            f"layers.{layer}.direction": (scale * data.mean_diff[layer]).cpu().contiguous()
            for layer in layers
        },
        method=method,
        extra=artifact_metadata(
            training,
            add_metrics,
            base_model=run.lm.model_id,
            description=f"{name} preference direction: mean hidden-state difference x {scale:g} "
            f"at layers {layers}",
        ),
        **shape,
    )
    lo = Artifact(
        kind="lora",
        tensors=lora.export(),
        method=method,
        lora_alpha=cfg.lora_alpha,
        extra=artifact_metadata(
            training,
            lora_metrics,
            base_model=run.lm.model_id,
            description=f"{name} LoRA (r={cfg.lora_rank}, alpha={cfg.lora_alpha:g}) "
            f"on {'/'.join(cfg.lora_modules)} of blocks 0..{layers[-1]}",
        ),
        **shape,
    )
    return add, lo


def write_outputs(run: RahfRun, lora: LoraSet, data: Extracted, n_pairs: int, n_eval: int, t0: float) -> dict:
    """Write ``add.safetensors``, ``lora.safetensors``, ``loss.png`` and ``summary.json`` into
    ``out_dir`` (main process only) and return the summary (``t0``: the run's start, monotonic)."""
    out_dir = Path(run.cfg.out_dir)
    training = _training(run)
    common = {
        "phases": run.phases,
        "train_pairs": n_pairs,
        "eval_pairs": n_eval,
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    add_metrics = {
        **common,
        **data.stats,
        "mean_diff_norm": {str(k): float(v.norm()) for k, v in data.mean_diff.items()},
        "response_tokens": data.response_tokens,
    }
    lora_metrics = {
        **common,
        **data.stats,
        "distill_eval_loss_before": run.phases["distill"]["eval_loss_before"],
        "distill_eval_loss_after": run.phases["distill"]["eval_loss_after"],
    }
    summary: dict[str, Any] = {"training": training, "metrics": {**common, **add_metrics, **lora_metrics}}
    if run.accelerator.is_main_process:
        add, lo = _artifacts(run, lora, data, training, add_metrics, lora_metrics)
        summary.update(
            add=str(out_dir / "add.safetensors"),
            add_sha256=save_artifact(add, out_dir / "add.safetensors"),
            lora=str(out_dir / "lora.safetensors"),
            lora_sha256=save_artifact(lo, out_dir / "lora.safetensors"),
            log=str(run.log.path),
            plot=str(run.log.plot(out_dir / "loss.png", title=f"RAHF-{run.cfg.variant.upper()}")),
        )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    return summary
