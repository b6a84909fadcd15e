"""Forward passes the trainers need: the response-only LM loss and hidden states at chosen blocks.

* :func:`response_nll` - the summed next-token negative log-likelihood over the labelled (response)
  tokens, ``-sum_t log p(y_t | y_<t)``, with the output head run on those positions only;
* :func:`sequence_logprobs` - the same log-likelihood per row (RAHF-SCIT's contrastive term);
* :func:`capture_blocks` / :func:`run_to_layers` - the output of decoder block l (the residual stream
  after it, ``output_hidden_states[l + 1]`` in Hugging Face terms), the pass stopped after the highest
  block needed;
* :func:`response_states` - those hidden states at the response tokens, rows concatenated: {l: [N, d]}.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import IGNORE_INDEX

__all__ = [
    "StopForward",
    "capture_blocks",
    "gather_response",
    "response_nll",
    "response_states",
    "run_to_layers",
    "sequence_logprobs",
]


def _needs_full_logits(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def _label_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor
) -> torch.Tensor:
    """Logits [N, V] of the positions ``sel`` [B, T-1] marks (those that predict a label).

    The output head runs only on those positions (a causal LM's decoder, then its output embedding),
    which saves most of the 49k-vocabulary projection on short responses; models with logit
    soft-capping or scaling go through their full forward instead.
    """
    if _needs_full_logits(model) or not hasattr(model, "get_decoder"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][sel]
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return model.get_output_embeddings()(out[0][:, :-1][sel])


def response_nll(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token NLL over the labelled tokens, their count)."""
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    logits = _label_logits(model, input_ids, attention_mask, sel)
    nll = F.cross_entropy(logits.float(), target[sel], reduction="sum")
    return nll, sel.sum()


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of the next-token log-probabilities of its labelled tokens [B], their count [B]),

    ``logp_b = sum_t log p(y_t | y_<t)`` over the response tokens of row b.
    """
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    logits = _label_logits(model, input_ids, attention_mask, sel)
    lp = -F.cross_entropy(logits.float(), target[sel], reduction="none")  # [N]
    rows = sel.nonzero()[:, 0]  # row of each selected position, in the order of lp
    sums = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, sel.sum(dim=1)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass after the last block whose output is needed."""


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_blocks(
    blocks: Sequence[nn.Module], layers: Sequence[int], stop_after: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output (residual stream) of decoder block l for every l in ``layers``.

    That is ``output_hidden_states[l + 1]`` of Hugging Face models (for l below the last layer, whose
    ``hidden_states`` entry is after the final norm). With ``stop_after``, the block of the highest
    layer raises :class:`StopForward` once recorded; the caller catches it.
    """
    store: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make(layer: int):
        def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
            store[layer] = _block_out(out)
            if stop_after and layer == last:
                raise StopForward

        return hook

    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_to_layers(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """Block outputs at ``layers`` [B, T, d]; the forward stops after the highest one."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    with capture_blocks(blocks, layers, stop_after=True) as store:
        try:
            body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return dict(store)


def gather_response(h: torch.Tensor, n_prompt: torch.Tensor, n_response: torch.Tensor) -> torch.Tensor:
    """Concatenate, row by row, the response positions of a right-padded [B, T, d] tensor: [N, d]."""
    return torch.cat(
        [h[i, int(p) : int(p) + int(r)] for i, (p, r) in enumerate(zip(n_prompt, n_response, strict=True))]
    )


@torch.no_grad()
def response_states(
    model: nn.Module, blocks: Sequence[nn.Module], layers: Sequence[int], batch: dict[str, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Hidden states (block outputs) at ``layers`` over the response tokens of ``batch``: {l: [N, d]}
    in float32, rows concatenated in batch order."""
    dev = next(model.parameters()).device
    hs = run_to_layers(model, blocks, layers, batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    return {
        layer: gather_response(h, batch["n_prompt"], batch["n_response"]).float() for layer, h in hs.items()
    }
