"""RAHF step 3 - constructing the final model: a LoRA adapter distilled from the activity patterns.

A LoRA adapter (rank ``lora_rank`` = 8, alpha ``lora_alpha`` = 16, on ``lora_modules`` = ``q_proj`` /
``v_proj`` of the blocks below the highest target layer) on top of the step-1 model
(:attr:`~training.rahf.instruct.Contrast.tuned`, its own adapter active and frozen, as the official
``RAHF.py`` puts the new adapter on the step-1 model), trained on the plain prompt + response so that
the hidden states of the response tokens move to the step-2 targets, with the paper's loss: the L2
distance per token, averaged over the target layers, summed over the tokens and divided by their
number,

    loss = 1/N sum_t 1/|L| sum_{l in L} || h_l^final(t) - target_l(t) ||_2 .

The official code adapts blocks 0..l_max; block l_max cannot change ``output_hidden_states[l_max]``
(the output of block l_max - 1), so its adapter gets no gradient and stays zero - leaving it out gives
the same model. The final model is step 1 plus step 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steering_vectors import find_layout

from ..forward import gather_response, run_to_layers
from ..lora import LoraSet
from ..tokens import Encoded, collate
from .extract import Extracted
from .instruct import Runner
from .run import RahfRun

__all__ = ["Distiller", "distill", "distill_batch"]


class Distiller(nn.Module):
    """Step 3's loss: the L2 distance between the final model's (``tuned`` with ``lora`` active)
    outputs of ``blocks`` and the targets, per response token, averaged over the blocks.

    ``forward(..., target [N, n_blocks, d])`` returns (sum over the N response tokens, N). ``tuned`` is
    not a submodule: its parameters are frozen and not part of this module's state.
    """

    def __init__(self, tuned: Runner, lora: LoraSet, blocks: Sequence[int]):
        super().__init__()
        self.lora = lora
        self.blocks = list(blocks)
        self._tuned = [tuned]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n_prompt: torch.Tensor,
        n_response: torch.Tensor,
        target: torch.Tensor,
        **_: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tuned = self._tuned[0]
        with tuned.active(), self.lora.active():
            hs = run_to_layers(tuned.model, tuned.blocks, self.blocks, input_ids, attention_mask)
        h = torch.stack([gather_response(hs[b], n_prompt, n_response) for b in self.blocks], dim=1)
        dist = (h.float() - target).norm(dim=-1)  # [N, n_blocks]
        return dist.mean(dim=1).sum(), torch.tensor(dist.shape[0], device=dist.device)


def distill_batch(
    inputs: list[Encoded], targets: list[torch.Tensor], idx: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch of examples ``idx``: :func:`~training.tokens.collate` of the inputs plus ``target``
    [N, n_layers, d], their targets concatenated in the same order."""
    b = collate([inputs[i] for i in idx], pad_id)
    b["target"] = torch.cat([targets[i] for i in idx])
    return b


def distill(run: RahfRun, tuned: Runner, data: Extracted) -> LoraSet:
    """Step 3: train the adapter (seed ``seed + 2``) on top of ``tuned`` towards ``data``'s targets and
    return it."""
    cfg, pad, bs = run.cfg, run.pad_id, run.cfg.eval_batch_size
    modules = [(b, m) for b in range(run.blocks[-1] + 1) for m in cfg.lora_modules]
    layout = run.layout if tuned.model is run.base else find_layout(tuned.model)
    lora = LoraSet(layout, modules, rank=cfg.lora_rank, alpha=cfg.lora_alpha, seed=cfg.seed + 2)
    n_eval = len(data.eval_inputs)
    eval_batches = [
        distill_batch(data.eval_inputs, data.eval_targets, range(s, min(s + bs, n_eval)), pad)
        for s in range(0, n_eval, bs)
    ]
    trained = run.train_phase(
        "distill",
        Distiller(tuned, lora, run.blocks),
        len(data.train_inputs),
        lambda idx: distill_batch(data.train_inputs, data.train_targets, idx, pad),
        steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        seed=cfg.seed + 2,
        eval_batches=eval_batches,
        desc="step 3: distill",
        schedule=cfg.distill_schedule,
    )
    return trained.lora
