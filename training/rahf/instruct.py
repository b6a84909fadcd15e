"""RAHF step 1 - instructing the LM on the preferences: the models whose activity patterns differ.

* *SCIT* (single model, contrastive instruction tuning): one fine-tune of the base model on every
  preference pair twice - the chosen reply under a "good" instruction and the rejected reply under a
  "bad" instruction (the instruction is the system message), loss = the response NLL
  ``-sum_t log p(y_t | x, y_<t)`` summed over both sequences of a pair. Step 2 then compares the tuned
  model under the good and under the bad instruction.
* *Dual*: two fine-tunes with the same loss, a preferred model on the chosen replies and a
  dispreferred model on the rejected ones. Step 2 compares the two models on the same input.

Each fine-tune is a LoRA adapter on the shared base (``finetune="lora"``: rank ``tune_rank`` on
``tune_modules`` of every block) or a full fine-tune of a copy of the base (``finetune="full"``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steering_vectors import find_layout

from ..forward import response_nll, response_states
from ..lora import LoraSet
from ..records import PreferencePair
from ..tokens import Encoded, collate
from .run import RahfRun

__all__ = ["Contrast", "LMTuner", "Runner", "instruct", "tune"]


@dataclass
class Runner:
    """A model to read hidden states from: ``model`` (its decoder ``blocks``), with ``lora`` active
    (a LoRA fine-tune on the shared base) or not (the base, or a fully fine-tuned copy)."""

    model: nn.Module
    blocks: Sequence[nn.Module]
    lora: LoraSet | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, ``model`` computes this runner's function (its LoRA applied, if any)."""
        with self.lora.active() if self.lora is not None else nullcontext():
            yield

    def states(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states at ``layers`` over the response tokens of ``batch``: {l: [N, d]} (float32)."""
        with self.active():
            return response_states(self.model, self.blocks, layers, batch)


class LMTuner(nn.Module):
    """Response-only LM loss of ``model`` with an optional LoRA set active (step 1)."""

    def __init__(self, model: nn.Module, lora: LoraSet | None):
        super().__init__()
        self.model = model
        self.lora = lora

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lora.active() if self.lora is not None else nullcontext():
            return response_nll(self.model, input_ids, attention_mask, labels)


@dataclass
class Contrast:
    """Step 1's result, what step 2 compares: ``pos`` under the system instruction ``pos_system``
    against ``neg`` under ``neg_system`` (SCIT: one model, two instructions; Dual: two models, none)."""

    pos: Runner
    neg: Runner
    pos_system: str | None = None
    neg_system: str | None = None


def tune(
    run: RahfRun, name: str, train_seqs: list[list[Encoded]], eval_seqs: list[list[Encoded]], seed: int
) -> Runner:
    """Fine-tune on ``train_seqs`` (each item: the sequences of one pair, all in one batch) and return
    the tuned model's runner; ``eval_seqs`` give the eval loss of the phase ``name``."""
    cfg, layout = run.cfg, run.layout
    if cfg.finetune == "lora":
        targets = [(layer, m) for layer in range(layout.num_layers) for m in cfg.tune_modules]
        lora = LoraSet(layout, targets, rank=cfg.tune_rank, alpha=cfg.tune_alpha, seed=seed)
        module, model, blocks = LMTuner(run.base, lora), run.base, layout.blocks
    else:
        model = copy.deepcopy(run.base)
        for p in model.parameters():
            p.requires_grad_(True)
        lora, module, blocks = None, LMTuner(model, None), find_layout(model).blocks
    per_batch = max(1, cfg.eval_batch_size // 2)
    eval_batches = [
        collate([e for item in eval_seqs[s : s + per_batch] for e in item], run.pad_id)
        for s in range(0, len(eval_seqs), per_batch)
    ]
    tuned = run.train_phase(
        name,
        module,
        len(train_seqs),
        lambda idx: collate([e for i in idx for e in train_seqs[i]], run.pad_id),
        steps=cfg.tune_steps,
        lr=cfg.tune_lr,
        seed=seed,
        eval_batches=eval_batches,
        desc=f"step 1: {name}",
    )
    for p in tuned.parameters():
        p.requires_grad_(False)
    return Runner(model, blocks, tuned.lora if lora is not None else None)


def instruct(run: RahfRun, pairs: list[PreferencePair], eval_pairs: list[PreferencePair]) -> Contrast:
    """Step 1 of ``run.cfg.variant``: SCIT's one fine-tune (seed ``seed``) or Dual's two (``seed`` for
    the chosen replies, ``seed + 1`` for the rejected ones)."""
    cfg = run.cfg
    if cfg.variant == "scit":
        good, bad = cfg.good_instruction, cfg.bad_instruction

        def scit(ps: list[PreferencePair]) -> list[list[Encoded]]:
            return [[run.encode(p, "chosen", good), run.encode(p, "rejected", bad)] for p in ps]

        tuned = tune(run, "scit", scit(pairs), scit(eval_pairs), cfg.seed)
        return Contrast(tuned, tuned, good, bad)

    def dual(ps: list[PreferencePair], which: str) -> list[list[Encoded]]:
        return [[run.encode(p, which)] for p in ps]

    pos = tune(run, "dual-chosen", dual(pairs, "chosen"), dual(eval_pairs, "chosen"), cfg.seed)
    neg = tune(run, "dual-rejected", dual(pairs, "rejected"), dual(eval_pairs, "rejected"), cfg.seed + 1)
    return Contrast(pos, neg)
