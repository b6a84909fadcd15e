"""RAHF step 1 - instructing the LM on the preferences: the models whose activity patterns differ.

* *SCIT* (single model, contrastive instruction tuning): one fine-tune of the base model on every
  preference pair - the chosen reply under a "good" instruction and the rejected reply under a "bad"
  instruction (the instruction is the system message) - with the loss of the official code
  (``code/step1/SCIT-step1.py``): the NLL of those replies plus a contrastive term that prefers each
  reply under its own instruction to the same reply under the opposite one. Per example (instruction
  i, reply y, opposite instruction i'), with ``l(y | i)`` the mean log-probability per reply token,
  ``d = l(y | i) - l(y | i')``, smoothing ``eps`` (0.2) and weight ``lam`` (1):

      loss = NLL_mean + lam * mean_examples [ (1 - eps) softplus(-d) + eps softplus(d) ]

  (``softplus(-d) = -log(p_i / (p_i + p_i'))`` with ``p = exp(l)``.) Step 2 then compares the tuned
  model under the good and under the bad instruction.
* *Dual*: two fine-tunes on the response NLL, a preferred model on the chosen replies and a
  dispreferred model on the rejected ones. Step 2 compares the two models on the same input.

Each fine-tune is a LoRA adapter on the shared base (``finetune="lora"``: rank ``tune_rank`` on
``tune_modules`` of every block) or a full fine-tune of a copy of the base (``finetune="full"``). The
tuned model stays in use after step 1: step 3 trains on top of it (:attr:`Contrast.tuned`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steering_vectors import find_layout

from ..forward import response_nll, response_states, sequence_logprobs
from ..lora import LoraSet
from ..records import PreferencePair
from ..tokens import Encoded, collate
from .run import RahfRun

__all__ = ["Contrast", "LMTuner", "Runner", "ScitTuner", "instruct", "scit_contrast", "tune"]


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

    def states(self, batch: dict[str, torch.Tensor], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """The outputs of ``blocks`` over the response tokens of ``batch``: {b: [N, d]} (float32)."""
        with self.active():
            return response_states(self.model, self.blocks, blocks, batch)


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


def scit_contrast(l_own: torch.Tensor, l_other: torch.Tensor, smoothing: float) -> torch.Tensor:
    """SCIT's contrastive term per example: ``(1 - eps) softplus(-d) + eps softplus(d)``, with
    ``d = l_own - l_other`` the difference of the mean per-token log-probabilities of a reply under its
    own and under the opposite instruction."""
    d = l_own - l_other
    return (1.0 - smoothing) * F.softplus(-d) + smoothing * F.softplus(d)


class ScitTuner(nn.Module):
    """SCIT's step-1 loss (see the module docstring) of ``model`` with ``lora`` active.

    The batch holds pairs of rows: row 2k is an example (a reply under its own instruction; its tokens
    carry the NLL), row 2k+1 the same reply under the opposite instruction. ``forward`` returns
    ``(NLL_sum + weight * mean_k(contrast_k) * N, N)`` with N the labelled tokens of the even rows, so
    that the loop's ``loss_sum / count`` is ``NLL_mean + weight * mean_k(contrast_k)``.
    """

    def __init__(self, model: nn.Module, lora: LoraSet | None, weight: float, smoothing: float):
        super().__init__()
        self.model = model
        self.lora = lora
        self.weight, self.smoothing = float(weight), float(smoothing)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lora.active() if self.lora is not None else nullcontext():
            sums, counts = sequence_logprobs(self.model, input_ids, attention_mask, labels)  # [2K]
        n = counts[0::2].sum()
        mean_lp = sums / counts.clamp(min=1)
        contrast = scit_contrast(mean_lp[0::2], mean_lp[1::2], self.smoothing).mean()
        return -sums[0::2].sum() + self.weight * contrast * n, n


@dataclass
class Contrast:
    """Step 1's result, what step 2 compares: ``pos`` under the system instruction ``pos_system``
    against ``neg`` under ``neg_system`` (SCIT: one model, two instructions; Dual: two models, none)."""

    pos: Runner
    neg: Runner
    pos_system: str | None = None
    neg_system: str | None = None

    @property
    def tuned(self) -> Runner:
        """The step-1 model that step 3 trains on and reads its targets' base from: SCIT's tuned model,
        Dual's preferred model (as the official code's ``model_base``)."""
        return self.pos


def tune(
    run: RahfRun,
    name: str,
    train_seqs: list[list[Encoded]],
    eval_seqs: list[list[Encoded]],
    seed: int,
    contrastive: bool = False,
) -> Runner:
    """Fine-tune on ``train_seqs`` (each item: the sequences of one pair, all in one batch) and return
    the tuned model's runner; ``eval_seqs`` give the eval loss of the phase ``name``. ``contrastive``:
    the items are SCIT's (example, same reply under the opposite instruction) rows for
    :class:`ScitTuner`."""
    cfg, layout = run.cfg, run.layout
    if cfg.finetune == "lora":
        targets = [(layer, m) for layer in range(layout.num_layers) for m in cfg.tune_modules]
        lora = LoraSet(layout, targets, rank=cfg.tune_rank, alpha=cfg.tune_alpha, seed=seed)
        model, blocks = run.base, layout.blocks
    else:
        model = copy.deepcopy(run.base)
        for p in model.parameters():
            p.requires_grad_(True)
        lora, blocks = None, find_layout(model).blocks
    if contrastive:
        module: nn.Module = ScitTuner(model, lora, cfg.scit_weight, cfg.scit_smoothing)
    else:
        module = LMTuner(model, lora)
    per_batch = max(1, cfg.eval_batch_size // max(len(s) for s in train_seqs))
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
        contrastive = cfg.scit_weight > 0

        def scit(ps: list[PreferencePair]) -> list[list[Encoded]]:
            if not contrastive:  # plain NLL: only the examples themselves
                return [[run.encode(p, "chosen", good), run.encode(p, "rejected", bad)] for p in ps]
            return [
                [
                    run.encode(p, "chosen", good),  # example, then its reply under the other instruction
                    run.encode(p, "chosen", bad),
                    run.encode(p, "rejected", bad),
                    run.encode(p, "rejected", good),
                ]
                for p in ps
            ]

        tuned = tune(run, "scit", scit(pairs), scit(eval_pairs), cfg.seed, contrastive)
        return Contrast(tuned, tuned, good, bad)

    def dual(ps: list[PreferencePair], which: str) -> list[list[Encoded]]:
        return [[run.encode(p, which)] for p in ps]

    pos = tune(run, "dual-chosen", dual(pairs, "chosen"), dual(eval_pairs, "chosen"), cfg.seed)
    neg = tune(run, "dual-rejected", dual(pairs, "rejected"), dual(eval_pairs, "rejected"), cfg.seed + 1)
    return Contrast(pos, neg)
