"""RAHF step 3 - constructing the final model: a LoRA adapter distilled from the activity patterns.

A LoRA adapter (rank ``lora_rank`` = 8, alpha ``lora_alpha`` = 16, on ``lora_modules`` = ``q_proj`` /
``v_proj`` of every block up to the highest target layer) on the *base* model, trained on the plain
prompt + response so that the hidden states of the response tokens move to the step-2 targets, with
the paper's loss: the L2 distance per token, averaged over the target layers, summed over the tokens
and divided by their number,

    loss = 1/N sum_t 1/|L| sum_{l in L} || h_l^lora(t) - target_l(t) ||_2 .
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..forward import gather_response, run_to_layers
from ..lora import LoraSet
from ..tokens import Encoded, collate
from .extract import Extracted
from .run import RahfRun

__all__ = ["Distiller", "distill", "distill_batch"]


class Distiller(nn.Module):
    """Step 3's loss: the L2 distance between the LoRA model's hidden states at the target layers and
    the targets ``h_base + alpha * v``, per response token, averaged over the target layers.

    ``forward(..., target [N, n_layers, d])`` returns (sum over the N response tokens, N).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], lora: LoraSet, layers: Sequence[int]):
        super().__init__()
        self.model = model
        self.lora = lora
        self.layers = list(layers)
        self._blocks = list(blocks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n_prompt: torch.Tensor,
        n_response: torch.Tensor,
        target: torch.Tensor,
        **_: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lora.active():
            hs = run_to_layers(self.model, self._blocks, self.layers, input_ids, attention_mask)
        h = torch.stack([gather_response(hs[layer], n_prompt, n_response) for layer in self.layers], dim=1)
        dist = (h.float() - target).norm(dim=-1)  # [N, n_layers]
        return dist.mean(dim=1).sum(), torch.tensor(dist.shape[0], device=dist.device)


def distill_batch(
    inputs: list[Encoded], targets: list[torch.Tensor], idx: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch of examples ``idx``: :func:`~training.tokens.collate` of the inputs plus ``target``
    [N, n_layers, d], their targets concatenated in the same order."""
    b = collate([inputs[i] for i in idx], pad_id)
    b["target"] = torch.cat([targets[i] for i in idx])
    return b


def distill(run: RahfRun, data: Extracted) -> LoraSet:
    """Step 3: train the adapter (seed ``seed + 2``) towards ``data``'s targets and return it."""
    cfg, pad, bs = run.cfg, run.pad_id, run.cfg.eval_batch_size
    modules = [(layer, m) for layer in range(run.layers[-1] + 1) for m in cfg.lora_modules]
    lora = LoraSet(run.layout, modules, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed + 2)
    n_eval = len(data.eval_inputs)
    eval_batches = [
        distill_batch(data.eval_inputs, data.eval_targets, range(s, min(s + bs, n_eval)), pad)
        for s in range(0, n_eval, bs)
    ]
    trained = run.train_phase(
        "distill",
        Distiller(run.base, run.layout.blocks, lora, run.layers),
        len(data.train_inputs),
        lambda idx: distill_batch(data.train_inputs, data.train_targets, idx, pad),
        steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        seed=cfg.seed + 2,
        eval_batches=eval_batches,
        desc="step 3: distill",
    )
    return trained.lora
