"""What the steps of one RAHF run share: options, accelerator, base model, target layers, log, phases.

:class:`RahfRun` is opened once by :func:`training.rahf.train_rahf` and handed to every step; its
:meth:`RahfRun.train_phase` runs one optimisation phase (a step-1 fine-tune or the step-3 distillation)
with the run's shared loop settings and records the phase's losses and time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering_vectors import find_layout

from ..config import RahfConfig
from ..loop import LoopSpec, mean_loss, run_loop
from ..records import PreferencePair
from ..runlog import RunLog
from ..runtime import load_base_model
from ..tokens import Encoded, encode, pad_token_id

__all__ = ["RahfRun", "default_target_layers", "target_layers"]


def default_target_layers(num_layers: int) -> list[int]:
    """The middle layers, every second one, numbered as ``output_hidden_states`` (layer l = the
    residual stream after l blocks): from 30 % to 65 % of the depth - 10..20 of 32 (the official Dual
    script's list for the 32-layer 7B models), 9..19 of 30."""
    lo = min(num_layers - 1, max(1, round(0.3 * num_layers)))
    hi = min(num_layers - 1, max(lo, round(0.65 * num_layers)))
    return list(range(lo, hi + 1, 2))


def target_layers(requested: Sequence[int] | None, num_layers: int) -> list[int]:
    """``requested`` sorted and deduplicated (else :func:`default_target_layers`), checked to be in
    1..num_layers-1 (``output_hidden_states[0]`` is the embeddings, the last entry is after the final
    norm: neither is a block output)."""
    targets = sorted(set(requested)) if requested else default_target_layers(num_layers)
    if not targets or targets[0] < 1 or targets[-1] >= num_layers:
        raise ValueError(
            f"target layers {targets} out of range for a {num_layers}-layer model (1..{num_layers - 1}, "
            "numbered as output_hidden_states)"
        )
    return targets


@dataclass
class RahfRun:
    """One RAHF run: ``cfg``, the ``accelerate`` accelerator, the frozen base model ``lm``
    (:class:`basemodel.LoadedModel`) and its ``layout``, the target ``layers``, the loss ``log``, the
    ``checkpoint_dir`` and, filled in by the steps, ``phases`` (per phase: steps, losses, wall time).

    ``layers`` are numbered as the paper's code numbers them, ``output_hidden_states[l]``: layer l is
    the output of block l - 1 (:attr:`blocks`), which is where the hooks read it and where the ``add``
    artifact (SPEC: decoder layer output) applies it."""

    cfg: RahfConfig
    accelerator: Any
    lm: Any
    layout: Any
    layers: list[int]
    pad_id: int
    log: RunLog
    checkpoint_dir: Path
    phases: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: RahfConfig, accelerator) -> RahfRun:
        """Load the base model and resolve the target layers; the log goes to ``out_dir/log.jsonl``."""
        lm = load_base_model(cfg.model, accelerator, cfg.dtype)
        layout = find_layout(lm.model)
        out_dir = Path(cfg.out_dir)
        return cls(
            cfg=cfg,
            accelerator=accelerator,
            lm=lm,
            layout=layout,
            layers=target_layers(cfg.target_layers, layout.num_layers),
            pad_id=pad_token_id(lm.tokenizer),
            log=RunLog(out_dir / "log.jsonl", enabled=accelerator.is_main_process, append=bool(cfg.resume)),
            checkpoint_dir=Path(cfg.resume or cfg.checkpoint_dir or out_dir / "ckpt"),
        )

    @property
    def blocks(self) -> list[int]:
        """The decoder blocks whose outputs are the target layers: ``l - 1`` for each l."""
        return [layer - 1 for layer in self.layers]

    @property
    def base(self) -> nn.Module:
        """The frozen base model."""
        return self.lm.model

    def encode(self, pair: PreferencePair, which: str, system: str | None = None) -> Encoded:
        """The pair's prompt (under the system instruction ``system``) and its ``which`` reply."""
        return encode(
            self.lm.tokenizer,
            pair.prompt,
            getattr(pair, which),
            system=system,
            max_length=self.cfg.max_length,
        )

    def train_phase(
        self,
        name: str,
        module: nn.Module,
        n_items: int,
        make_batch: Callable[[list[int]], dict[str, torch.Tensor]],
        *,
        steps: int,
        lr: float,
        seed: int,
        eval_batches: list[dict[str, torch.Tensor]],
        desc: str,
        schedule: str = "linear",
    ) -> nn.Module:
        """Train ``module`` (see :class:`training.loop.LoopSpec`) with the run's loop settings, evaluated
        on ``eval_batches`` before, every so often and after; returns it unwrapped from accelerate."""
        cfg, dev = self.cfg, self.accelerator.device
        spec = LoopSpec.from_options(
            cfg,
            name=name,
            module=module,
            n_items=n_items,
            make_batch=make_batch,
            steps=steps,
            lr=lr,
            seed=seed,
            schedule=schedule,
            eval_fn=(lambda: {"eval_loss": mean_loss(module, eval_batches, dev)}) if eval_batches else None,
            checkpoint_dir=self.checkpoint_dir,
            log=self.log,
        )
        t = time.monotonic()
        res = run_loop(spec, self.accelerator, desc=desc, resume=cfg.resume is not None)
        hist = res["history"]
        self.phases[name] = {
            "steps": res["steps"],
            "train_loss_last": res["train_loss"],
            "eval_loss_before": hist[0]["eval_loss"] if hist else None,
            "eval_loss_after": hist[-1]["eval_loss"] if hist else None,
            "eval_history": [[h["step"], h["eval_loss"]] for h in hist],
            "wall_s": round(time.monotonic() - t, 1),
        }
        return self.accelerator.unwrap_model(module)
