"""RED - Representation EDiting (Wu et al., ACL 2024), trained offline.

Per decoder layer l a scale vector s_l (init 1) and a bias vector b_l (init 0), both of the hidden size
d, edit the output of the layer's last feed-forward projection (``mlp.down_proj`` in Llama) before the
residual add: ``h' = s_l * h + b_l``. The base model is frozen; only these 2·L·d numbers are trained, by
supervised fine-tuning with the loss on the response tokens only. The edit is applied during training
by forward hooks that are removed afterwards, so the base model object is left exactly as it was.

The vectors are kept in float32 even when the model runs in bfloat16 (the hook computes the edit in
float32 and casts the result back): in bf16 a scale of 1 has a resolution of 2^-8, so the small
updates of the scale would round away and only the bias would learn.

Output: a ``red`` artifact (SPEC §4) with the training configuration and the eval losses (before
training = the base model's, and after) in its metadata, plus a JSONL loss log, a PNG plot and a JSON
summary next to it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering_vectors import Artifact, find_layout, save_artifact

from .artifacts import artifact_metadata
from .config import RedConfig
from .formats import DataFormatError
from .forward import response_nll
from .loaders import load_instructions, load_preferences, load_splits
from .loop import LoopSpec, eval_loss, run_loop
from .options import recorded
from .records import pairs_to_instructions
from .runlog import RunLog
from .runtime import load_base_model, peak_rss_mb, start
from .tokens import collate, encode_all, pad_token_id

__all__ = ["RedConfig", "RedEditor", "RedModel", "load_instruction_data", "red_artifact", "train_red"]

log = logging.getLogger(__name__)


class RedEditor(nn.Module):
    """The trainable RED vectors: ``scale`` [L, d] (ones) and ``bias`` [L, d] (zeros), float32."""

    def __init__(self, num_layers: int, hidden_size: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_layers, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(num_layers, hidden_size, dtype=torch.float32))

    def edit(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """``s_l * h + b_l`` computed in float32 and returned in ``out``'s dtype."""
        return (out.to(torch.float32) * self.scale[layer] + self.bias[layer]).to(out.dtype)


class RedModel(nn.Module):
    """A frozen causal LM plus a :class:`RedEditor` hooked onto its FFN output projections.

    ``forward(input_ids, attention_mask, labels)`` returns ``(sum of response NLL, token count)``.
    The hooks live from construction until :meth:`remove_hooks`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layout = find_layout(model)
        self.editor = RedEditor(self.layout.num_layers, self.layout.hidden_size)
        self._handles = [
            mod.register_forward_hook(self._hook(layer)) for layer, mod in enumerate(self.layout.ffn_out)
        ]

    def _hook(self, layer: int):
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
            return self.editor.edit(layer, out)

        return hook

    def remove_hooks(self) -> None:
        """Remove the edit hooks: the model computes exactly what it did before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return response_nll(self.model, input_ids, attention_mask, labels)


def load_instruction_data(path: str, format: str = "auto", limit: int | None = None):
    """Instructions from ``path``; preference data is accepted too (its chosen replies are used)."""
    try:
        return load_instructions(path, format=format, limit=limit)
    except DataFormatError as first:
        try:
            pairs = load_preferences(path, format=format, limit=limit)
        except DataFormatError:
            raise first from None
        log.info("%s holds preference pairs: training RED on their chosen replies", path)
        return pairs_to_instructions(pairs, "chosen")


def red_artifact(
    editor: RedEditor,
    layout,
    *,
    training: dict[str, Any],
    metrics: dict[str, Any],
    base_model: str | None = None,
    description: str | None = None,
) -> Artifact:
    """The ``red`` artifact of ``editor``: ``layers.{l}.scale`` and ``layers.{l}.bias`` for every layer."""
    tensors = {}
    for layer in range(layout.num_layers):
        tensors[f"layers.{layer}.scale"] = editor.scale[layer].detach().float().cpu().clone()
        tensors[f"layers.{layer}.bias"] = editor.bias[layer].detach().float().cpu().clone()
    description = description or "RED scale/bias edits of the FFN outputs (Wu et al., 2024)"
    return Artifact(
        kind="red",
        tensors=tensors,
        hidden_size=layout.hidden_size,
        num_layers=layout.num_layers,
        model_type=layout.model_type,
        method="red",
        extra=artifact_metadata(training, metrics, base_model=base_model, description=description),
    )


def _metrics(n_params: int, editor: RedEditor, result: dict[str, Any], n_train: int, n_eval: int) -> dict:
    """What the artifact's ``metrics`` record, but the wall time and memory."""
    metrics: dict[str, Any] = {
        "trainable_params": n_params,
        "train_loss_last": result["train_loss"],
        "train_examples": n_train,
        "eval_examples": n_eval,
    }
    hist = result["history"]
    if hist:
        metrics["eval_loss_before"] = hist[0]["eval_loss"]
        metrics["eval_loss_after"] = hist[-1]["eval_loss"]
    metrics["scale_dev_mean_abs"] = float((editor.scale.detach() - 1).abs().mean())
    metrics["bias_mean_abs"] = float(editor.bias.detach().abs().mean())
    return metrics


def _write(summary: dict[str, Any], art: Artifact, out: Path, stem: Path, run_log: RunLog) -> None:
    """Write the artifact, the loss plot and the summary (``<stem>.json``); completes ``summary``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    summary["sha256"] = save_artifact(art, out)
    png = run_log.plot(f"{stem}.png", title="RED")
    summary["plot"], summary["log"] = str(png), str(run_log.path)
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")


def train_red(cfg: RedConfig) -> dict[str, Any]:
    """Train RED vectors and write the artifact, loss log, plot and summary. Returns the summary."""
    t0 = time.monotonic()
    out = Path(cfg.out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    accelerator = start(cfg)
    main = accelerator.is_main_process
    items, eval_items = load_splits(cfg, load_instruction_data)
    lm = load_base_model(cfg.model, accelerator, cfg.dtype)
    pad_id = pad_token_id(lm.tokenizer)
    train_enc = encode_all(lm.tokenizer, items, cfg.max_length)
    eval_enc = encode_all(lm.tokenizer, eval_items, cfg.max_length) if eval_items else []

    red = RedModel(lm.model)
    n_trainable = sum(p.numel() for p in red.parameters() if p.requires_grad)
    L, d = red.layout.num_layers, red.layout.hidden_size
    if n_trainable != 2 * L * d:
        raise RuntimeError(f"RED trains 2 x {L} x {d} numbers, found {n_trainable} trainable")
    if main:
        log.info(
            "RED: %d trainable parameters (2 x %d layers x %d), %d train / %d eval examples",
            *(n_trainable, L, d, len(train_enc), len(eval_enc)),
        )
    run_log = RunLog(f"{stem}.log.jsonl", enabled=main, append=bool(cfg.resume))

    def evaluate() -> dict[str, float]:
        return {"eval_loss": eval_loss(red, eval_enc, pad_id, cfg.eval_batch_size, accelerator.device)}

    spec = LoopSpec.from_options(
        cfg,
        name="red",
        module=red,
        n_items=len(train_enc),
        make_batch=lambda idx: collate([train_enc[i] for i in idx], pad_id),
        steps=cfg.max_steps,
        lr=cfg.lr,
        seed=cfg.seed,
        eval_fn=evaluate if eval_enc else None,
        checkpoint_dir=Path(cfg.resume or cfg.checkpoint_dir or f"{stem}.ckpt"),
        log=run_log,
    )
    result = run_loop(spec, accelerator, desc="train red", resume=cfg.resume is not None)
    red.remove_hooks()
    editor = accelerator.unwrap_model(red).editor
    metrics = _metrics(n_trainable, editor, result, len(train_enc), len(eval_enc))
    metrics["wall_s"] = round(time.monotonic() - t0, 1)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    training = recorded(cfg)
    training.update(
        cfg.extra,
        model=cfg.model or lm.model_id,
        dtype=lm.dtype_name,
        processes=accelerator.num_processes,
        resumed_from=result["resumed_from"],
    )
    summary = {"artifact": str(out), "training": training, "metrics": metrics}
    if main:
        kw = {"base_model": lm.model_id, "description": cfg.description}
        art = red_artifact(editor, red.layout, training=training, metrics=metrics, **kw)
        _write(summary, art, out, stem, run_log)
    accelerator.wait_for_everyone()
    return summary
