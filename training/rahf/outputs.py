"""The outputs of a RAHF run: the final model, the ``add`` artifact, the loss plot and ``summary.json``.

* ``lora.safetensors`` (kind ``lora``, after a LoRA step 1): the paper's final model, step 1 plus step 3,
  as one adapter - the step-1 adapter (every linear of every block) and the step-3 adapter (``q_proj``
  / ``v_proj`` below the highest target layer) stacked by :func:`training.lora.stack_adapters`, each
  one's ``alpha / r`` folded into its B. Served at strength 1 it gives exactly base + step 1 + step 3;
  strength w scales the whole low-rank delta (both adapters together), w = 0 is the base model.
* ``model/`` (after a full step-1 fine-tune, instead): the fine-tuned copy with the step-3 adapter
  merged into its weights, a Hugging Face model folder (serve it with ``--model``), as the official
  code saves its merged final model.
* ``add.safetensors`` (kind ``add``; ours, not part of RAHF): the (normalised) difference vectors
  averaged over all response tokens of the data at the target layers, each multiplied by
  ``add_scale = alpha / len(layers)`` and applied at the output of the block that produces that layer.
  Activation addition at several layers accumulates in the residual stream, so with that scale the
  total shift the model receives at strength 1 is about ``alpha`` times one mean difference. Note that
  the differences are measured between the step-1 models and applied to the base model.

Both artifacts carry the training configuration and their metrics in the metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from steering_vectors import Artifact, save_artifact

from ..artifacts import artifact_metadata
from ..lora import LoraSet, stack_adapters
from ..options import recorded
from ..runtime import peak_rss_mb
from .extract import Extracted
from .instruct import Runner
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
        layer_numbering="output_hidden_states (layer l = output of block l - 1)",
        add_scale=_add_scale(run),
        processes=run.accelerator.num_processes,
        lora_blocks=list(range(run.blocks[-1] + 1)),
    )
    return training


def _shape(run: RahfRun) -> dict[str, Any]:
    layout = run.layout
    return {
        "hidden_size": layout.hidden_size,
        "num_layers": layout.num_layers,
        "model_type": layout.model_type,
    }


def _add_artifact(run: RahfRun, data: Extracted, training: dict, metrics: dict) -> Artifact:
    cfg, scale = run.cfg, _add_scale(run)
    return Artifact(
        kind="add",
        tensors={f"layers.{b}.direction": (scale * data.mean_diff[b]).cpu().contiguous() for b in run.blocks},
        method=f"rahf-{cfg.variant}",
        extra=artifact_metadata(
            training,
            metrics,
            base_model=run.lm.model_id,
            description=f"RAHF-{cfg.variant.upper()} step-2 mean hidden-state difference x {scale:g} "
            f"(ours, not part of RAHF) at the outputs of blocks {run.blocks} (layers {run.layers})",
        ),
        **_shape(run),
    )


def _lora_artifact(run: RahfRun, tuned: Runner, lora: LoraSet, training: dict, metrics: dict) -> Artifact:
    cfg = run.cfg
    tensors, alpha = stack_adapters([tuned.lora, lora])
    return Artifact(
        kind="lora",
        tensors=tensors,
        method=f"rahf-{cfg.variant}",
        lora_alpha=alpha,
        extra=artifact_metadata(
            training,
            metrics,
            base_model=run.lm.model_id,
            description=f"RAHF-{cfg.variant.upper()} final model as one LoRA: step 1 "
            f"(r={cfg.tune_rank} on {'/'.join(cfg.tune_modules)} of every block) stacked with step 3 "
            f"(r={cfg.lora_rank} on {'/'.join(cfg.lora_modules)} of blocks 0..{run.blocks[-1]}); "
            "strength scales both",
        ),
        **_shape(run),
    )


def _save_model(run: RahfRun, tuned: Runner, lora: LoraSet, path: Path) -> str:
    """Merge step 3 into the fully fine-tuned step-1 copy and save it as a Hugging Face model folder."""
    lora.merge()
    tuned.model.save_pretrained(path, safe_serialization=True)
    run.lm.tokenizer.save_pretrained(path)
    return str(path)


def write_outputs(
    run: RahfRun,
    tuned: Runner,
    lora: LoraSet,
    data: Extracted,
    n_pairs: tuple[int, int],
    n_eval: int,
    t0: float,
) -> dict:
    """Write the final model (``lora.safetensors`` or ``model/``), ``add.safetensors``, ``loss.png`` and
    ``summary.json`` into ``out_dir`` (main process only) and return the summary (``n_pairs``: the
    pairs of step 1 and of steps 2-3; ``t0``: the run's start, monotonic)."""
    out_dir = Path(run.cfg.out_dir)
    training = _training(run)
    common = {
        "phases": run.phases,
        "train_pairs": {"step1": n_pairs[0], "steps23": n_pairs[1]},
        "eval_pairs": n_eval,
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    add_metrics = {
        **common,
        **data.stats,
        "mean_diff_norm": {
            str(lay): float(data.mean_diff[b].norm()) for lay, b in zip(run.layers, run.blocks, strict=True)
        },
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
        add = _add_artifact(run, data, training, add_metrics)
        summary.update(
            add=str(out_dir / "add.safetensors"), add_sha256=save_artifact(add, out_dir / "add.safetensors")
        )
        if tuned.lora is not None:
            lo = _lora_artifact(run, tuned, lora, training, lora_metrics)
            summary.update(
                lora=str(out_dir / "lora.safetensors"),
                lora_sha256=save_artifact(lo, out_dir / "lora.safetensors"),
            )
        else:
            summary["model"] = _save_model(run, tuned, lora, out_dir / "model")
        summary.update(
            log=str(run.log.path),
            plot=str(run.log.plot(out_dir / "loss.png", title=f"RAHF-{run.cfg.variant.upper()}")),
        )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.accelerator.wait_for_everyone()
    return summary
