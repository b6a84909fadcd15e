"""Steering vectors computed from contrastive pairs (the repeng / CAA recipe): no training, one read of the
model's hidden states.

For each pair i (a positive and a negative text) the model reads both texts; at decoder layer l the
residual stream after block l (the block's output: where an ``add`` vector applies, and what
``output_hidden_states[l + 1]`` holds for every layer but the last, whose entry transformers takes after the
final norm) is read at each text's last token: h⁺_il, h⁻_il ∈ R^d, and d_il = h⁺_il − h⁻_il.

- ``mean-diff``:  v_l = (1/N) Σ_i d_il
- ``pca``:        u_l = argmax_{‖u‖=1} Σ_i (d_il · u)²  — the first principal component of the paired
  differences, *uncentred* (the first right-singular vector of D_l = [d_1l … d_Nl]ᵀ); its sign is chosen so
  that the positives project higher on average (mean_i d_il · u_l > 0), and it is scaled by that mean
  projection: v_l = u_l · mean_i (d_il · u_l). So at strength 1 it moves a hidden state along u_l as far as
  the average pair differs along it, on the same scale as ``mean-diff``.

The artifact records, per layer, ‖v_l‖ relative to the mean norm of the hidden states it was read from
(mean over the 2N last-token states at that layer), so a strength means the same on another model.

The model is run through :func:`unhooked_view`: a copy of its module tree that shares every parameter
and buffer but none of its forward hooks, so a server's steering hooks (driven by the engine thread) never
touch this computation, and it never touches the engine's batches.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ModelLayout, find_layout
from .artifact import Artifact

__all__ = [
    "COMPUTE_METHODS",
    "MAX_PAIRS",
    "MIN_PAIRS",
    "PairStates",
    "compute_from_texts",
    "compute_vector",
    "default_compute_layers",
    "encode_pairs",
    "last_token_states",
    "mean_diff",
    "pca_direction",
    "read_pair_states",
    "read_pairs",
    "unhooked_view",
]

COMPUTE_METHODS = ("mean-diff", "pca")
MIN_PAIRS, MAX_PAIRS = 2, 1000


def unhooked_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer (no weight is copied) but
    none of the hooks: forward passes through it see the model's own computation only.

    Raises ``ValueError`` for a module whose ``forward`` was replaced on the instance (e.g. accelerate's
    offloading hooks): such a wrapper is bound to the original module and would run its hooks.
    """
    if "forward" in vars(model):
        raise ValueError(
            f"{type(model).__name__} has a forward wrapper on the instance (offloading hooks?); "
            "cannot read its hidden states without its hooks"
        )
    view = copy.copy(model)  # a new object whose __dict__ holds the same values
    state = vars(view)
    for key, value in list(state.items()):
        if "hooks" in key and isinstance(value, dict):
            state[key] = OrderedDict()
    state["_parameters"] = dict(model._parameters)
    state["_buffers"] = dict(model._buffers)
    state["_modules"] = {k: None if m is None else unhooked_view(m) for k, m in model._modules.items()}
    return view


def default_compute_layers(num_layers: int) -> list[int]:
    """The middle half of the decoder layers, ``[L/4, 3L/4)`` (layers 7-21 of a 30-layer model): where
    contrastive directions steer best in the repeng and CAA experiments (early layers carry token
    identity, the last ones the next-token distribution)."""
    lo, hi = num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)
    return list(range(lo, hi))


class _Enough(Exception):
    """Raised by the hook of the highest layer read: the rest of the forward pass is not needed."""


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [B, T], right padded: real tokens keep positions 0..n-1 and,
    attention being causal, never see the padding."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def last_token_states(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
) -> dict[int, torch.Tensor]:
    """{l: [n, d] float32}: the output of decoder block l at the last token of each of ``seqs``.

    Runs ``model`` without its hooks (:func:`unhooked_view`) up to the highest layer asked for, ``batch_size``
    sequences per forward pass (similar lengths together, right padded); the order of ``seqs`` is kept.
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every text must have at least one token")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    view = unhooked_view(model)
    layout = find_layout(view)
    device = next(model.parameters()).device
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(view.forward).parameters else {}
    out = {layer: torch.empty(len(seqs), layout.hidden_size) for layer in layers}  # [n, d] each
    captured: dict[int, torch.Tensor] = {}
    top = max(layers)

    def capture(layer: int):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output  # [B, T, d]
            if layer == top:
                raise _Enough  # the blocks above the highest layer asked for are not run

        return hook

    handles = [layout.blocks[layer].register_forward_hook(capture(layer)) for layer in layers]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _right_pad([seqs[i] for i in rows], pad_id)
            with contextlib.suppress(_Enough):
                view(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
            last = (mask.sum(-1) - 1).to(device)  # [b] index of each row's last token
            for layer in layers:
                h = captured.pop(layer)  # [b, T, d]
                out[layer][rows] = h[torch.arange(len(rows), device=device), last].float().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return out


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``v = (1/N) Σ_i (pos_i − neg_i)``; ``pos``, ``neg`` [N, d] → [d]."""
    return (pos - neg).mean(0)


def pca_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The first uncentred principal component of ``D = pos − neg`` [N, d], signed so that
    ``mean_i D_i · u > 0`` and scaled by that mean projection: ``u · mean_i (D_i · u)`` [d]."""
    diffs = (pos - neg).double()  # [N, d]
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)  # rows of vh: right-singular vectors
    u = vh[0]  # [d], unit norm
    proj = (diffs @ u).mean()
    if proj < 0:
        u, proj = -u, -proj
    return (u * proj).float()


def _check_method(method: str) -> None:
    if method not in COMPUTE_METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(COMPUTE_METHODS)}")


def _digits(x: float) -> float:
    """``x`` to 6 significant digits (what the metadata records)."""
    return float(f"{x:.6g}")


@dataclass
class PairStates:
    """What a computation read from a model: per layer the positives' and the negatives' last-token
    states [N, d] (float32), and the model's layout."""

    pos: dict[int, torch.Tensor]
    neg: dict[int, torch.Tensor]
    layout: ModelLayout

    @property
    def layers(self) -> list[int]:
        return sorted(self.pos)

    def vector(self, layer: int, method: str) -> torch.Tensor:
        """The ``method`` vector [d] at ``layer``."""
        _check_method(method)
        fn = mean_diff if method == "mean-diff" else pca_direction
        return fn(self.pos[layer], self.neg[layer])

    def hidden_norm(self, layer: int) -> float:
        """Mean ‖h‖ of the 2N states at ``layer``."""
        return float(torch.cat([self.pos[layer], self.neg[layer]]).norm(dim=-1).mean())

    def artifact(self, method: str, extra: dict[str, str] | None = None) -> Artifact:
        """The ``add`` artifact of ``method`` at every layer read.

        Metadata (strings): ``method``, ``pairs`` (N), ``layers`` and ``position`` (``last-token``), and per
        layer as JSON ``{layer: value}``: ``relative_norms`` (‖v_l‖ / mean hidden-state norm) and
        ``hidden_norms`` (that mean); ``extra`` is added as given (e.g. ``base_model``, ``description``).
        """
        tensors, relative, hidden = {}, {}, {}
        for layer in self.layers:
            v = self.vector(layer, method)
            tensors[f"layers.{layer}.direction"] = v
            norm = self.hidden_norm(layer)
            hidden[str(layer)] = _digits(norm)
            relative[str(layer)] = _digits(float(v.norm()) / max(norm, 1e-12))
        meta = {
            "pairs": str(len(next(iter(self.pos.values())))),
            "layers": json.dumps(self.layers),
            "position": "last-token",
            "relative_norms": json.dumps(relative),
            "hidden_norms": json.dumps(hidden),
            **(extra or {}),
        }
        return Artifact.for_model(self.layout, "add", tensors, method, extra=meta)


def read_pair_states(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> PairStates:
    """The last-token states of ``pairs`` of token ids (positive, negative) at ``layers`` (default
    :func:`default_compute_layers`), batched (see :func:`last_token_states`)."""
    layout = find_layout(model)
    layers = sorted(set(layers)) if layers is not None else default_compute_layers(layout.num_layers)
    if not MIN_PAIRS <= len(pairs) <= MAX_PAIRS:
        raise ValueError(f"pairs: give between {MIN_PAIRS} and {MAX_PAIRS} pairs, got {len(pairs)}")
    if not layers:
        raise ValueError("layers: give at least one layer")
    n = layout.num_layers
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range (the model has {n} layers: 0-{n - 1})")
    seqs = [s for pair in pairs for s in pair]  # pos_0, neg_0, pos_1, neg_1, ...
    states = last_token_states(model, seqs, layers, batch_size=batch_size, pad_id=pad_id)
    return PairStates(
        pos={layer: s[0::2] for layer, s in states.items()},
        neg={layer: s[1::2] for layer, s in states.items()},
        layout=layout,
    )


def _pair_texts(record: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "positive" in record or "negative" in record:
        pos, neg = record.get("positive"), record.get("negative")
        if not (isinstance(pos, str) and pos and isinstance(neg, str) and neg):
            raise ValueError(f"{where}: 'positive' and 'negative' must be non-empty strings")
        return pos, neg
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if not (isinstance(chosen, str) and chosen and isinstance(rejected, str) and rejected):
        raise ValueError(f"{where}: give 'positive' and 'negative', or 'prompt', 'chosen' and 'rejected'")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages")
    if tokenizer is None:
        raise ValueError(f"{where}: preference records need the model's tokenizer (chat template)")
    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prefix + chosen, prefix + rejected


def read_pairs(path: str | os.PathLike[str], tokenizer: Any = None) -> list[tuple[str, str]]:
    """Contrastive pairs (positive text, negative text) from a JSONL file, one pair per line:
    ``{"positive", "negative"}`` as they are, or a preference record ``{"prompt", "chosen", "rejected"}``
    as the chat-formatted prompt followed by each reply (the states are then read in the reply)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_pair_texts(json.loads(line), tokenizer, f"{path}:{n}"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    if not MIN_PAIRS <= len(records) <= MAX_PAIRS:
        raise ValueError(f"{path}: give between {MIN_PAIRS} and {MAX_PAIRS} pairs, got {len(records)}")
    return records


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_tokens: int, *, limit: str = "max_tokens"
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (positive, negative) text, as the server encodes prompts (no special tokens
    added); ``ValueError`` naming the pair and side of a text with no token or more than ``max_tokens``
    (and ``limit``, the name of that bound for the caller's users)."""
    out = []
    for i, texts in enumerate(pairs):
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        for side, toks in zip(("positive", "negative"), ids, strict=True):
            if not 0 < len(toks) <= max_tokens:
                raise ValueError(
                    f"pairs[{i}].{side}: {len(toks)} tokens; each text must have 1 to {max_tokens} tokens "
                    f"({limit})"
                )
        out.append((ids[0], ids[1]))
    return out


def compute_from_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[tuple[str, str]],
    *,
    method: str = "mean-diff",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_tokens: int = 1024,
    limit: str = "max_tokens",
    extra: dict[str, str] | None = None,
) -> Artifact:
    """:func:`compute_vector` over (positive, negative) texts, encoded by :func:`encode_pairs` (each text
    at most ``max_tokens`` tokens, a bound its users know as ``limit``) and padded with the tokenizer's
    pad token."""
    pairs = encode_pairs(tokenizer, texts, max_tokens, limit=limit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return compute_vector(
        model, pairs, method=method, layers=layers, batch_size=batch_size, pad_id=pad_id, extra=extra
    )


def compute_vector(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    method: str = "mean-diff",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
    extra: dict[str, str] | None = None,
) -> Artifact:
    """An ``add`` artifact from ``pairs`` of token ids (positive, negative): ``method`` (``mean-diff`` or
    ``pca``) at ``layers`` (default :func:`default_compute_layers`); its metadata is described at
    :meth:`PairStates.artifact`."""
    _check_method(method)
    states = read_pair_states(model, pairs, layers=layers, batch_size=batch_size, pad_id=pad_id)
    return states.artifact(method, extra)
