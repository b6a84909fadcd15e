"""RAHF step 2 - collecting the activity patterns, and the targets step 3 distils.

For every (prompt, response) of the data (by default both the chosen and the rejected response of
each pair, over a seeded random subset of as many pairs as step 3 consumes in one epoch:
``extract_limit``), the per-token difference of the hidden states over the response tokens at each
target layer l (the residual stream after block l, ``output_hidden_states[l + 1]``):

    v_l(t) = h_l^pos(t) - h_l^neg(t)

SCIT: the tuned model under the good instruction minus the same model under the bad one, on the same
response tokens; Dual: the preferred model minus the dispreferred one on the same input.

Normalisation (a deviation from the paper, ``normalize="relative"``, the default): v_l is multiplied by
one factor per layer, ``f_l = v_norm * mean_t |h_l^base(t)| / mean_t |v_l(t)|``, so that its mean
per-token norm is ``v_norm`` times the base model's; directions and the token-to-token variation are
kept. ``normalize="none"`` uses the raw differences (f_l = 1), as the paper. The step-3 target of
token t at layer l is

    target_l(t) = h_l^base(t) + alpha * f_l * v_l(t)

and the ``add`` artifact's direction at layer l is the mean of f_l * v_l over all response tokens.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..records import PreferencePair
from ..tokens import Encoded, collate
from .instruct import Contrast, Runner
from .run import RahfRun

__all__ = [
    "Extracted",
    "Patterns",
    "base_states",
    "collect",
    "distill_targets",
    "extract",
    "extract_differences",
    "normalisation",
]


@torch.no_grad()
def extract_differences(
    pos: Runner,
    neg: Runner,
    pos_enc: Sequence[Encoded],
    neg_enc: Sequence[Encoded],
    layers: Sequence[int],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[int, torch.Tensor]]:
    """Per example, ``{l: [n_response, d]}`` = hidden states of ``pos`` on ``pos_enc[i]`` minus those
    of ``neg`` on ``neg_enc[i]`` at the response tokens (block outputs, float32).

    ``pos_enc[i]`` and ``neg_enc[i]`` may differ in their prompts (SCIT's instructions) but must hold
    the same response tokens.
    """
    if len(pos_enc) != len(neg_enc):
        raise ValueError("pos_enc and neg_enc must have the same length")
    for i, (a, b) in enumerate(zip(pos_enc, neg_enc, strict=True)):
        if a.response_ids != b.response_ids:
            raise ValueError(f"example {i}: the two passes do not share the same response tokens")
    out: list[dict[int, torch.Tensor]] = []
    starts = range(0, len(pos_enc), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="extract", dynamic_ncols=True)
    for s in starts:
        pb = collate(pos_enc[s : s + batch_size], pad_id)
        nb = collate(neg_enc[s : s + batch_size], pad_id)
        hp, hn = pos.states(pb, layers), neg.states(nb, layers)
        lens = pb["n_response"].tolist()
        diffs = {layer: (hp[layer] - hn[layer]).split(lens) for layer in layers}
        out.extend({layer: diffs[layer][j] for layer in layers} for j in range(len(lens)))
    return out


@torch.no_grad()
def base_states(
    runner: Runner, enc: Sequence[Encoded], layers: Sequence[int], pad_id: int, batch_size: int = 16
) -> list[dict[int, torch.Tensor]]:
    """Per example ``{l: [n_response, d]}``: ``runner``'s hidden states at the response tokens."""
    out: list[dict[int, torch.Tensor]] = []
    for s in range(0, len(enc), batch_size):
        b = collate(enc[s : s + batch_size], pad_id)
        h = runner.states(b, layers)
        lens = b["n_response"].tolist()
        parts = {layer: h[layer].split(lens) for layer in layers}
        out.extend({layer: parts[layer][j] for layer in layers} for j in range(len(lens)))
    return out


@dataclass
class Patterns:
    """The activity patterns of some pairs: per example (``which`` reply of each pair), the step-3
    input ``plain`` (prompt without instruction + response), the differences ``diffs`` {l: [n, d]}
    and the base model's hidden states ``base`` {l: [n, d]} on ``plain``."""

    plain: list[Encoded]
    diffs: list[dict[int, torch.Tensor]]
    base: list[dict[int, torch.Tensor]]


def collect(
    run: RahfRun, contrast: Contrast, pairs: Sequence[PreferencePair], which: Sequence[str]
) -> Patterns:
    """The :class:`Patterns` of ``pairs``' ``which`` replies (``"chosen"`` and/or ``"rejected"``)."""
    layers, pad, bs = run.layers, run.pad_id, run.cfg.eval_batch_size
    plain = [run.encode(p, w) for w in which for p in pairs]
    pos = [run.encode(p, w, contrast.pos_system) for w in which for p in pairs]
    neg = [run.encode(p, w, contrast.neg_system) for w in which for p in pairs]
    main = run.accelerator.is_main_process
    diffs = extract_differences(contrast.pos, contrast.neg, pos, neg, layers, pad, bs, progress=main)
    return Patterns(plain, diffs, base_states(Runner(run.base, run.layout.blocks), plain, layers, pad, bs))


def _token_norm(states: list[dict[int, torch.Tensor]], layer: int) -> float:
    """Mean per-token L2 norm at ``layer`` over all examples."""
    return float(torch.cat([s[layer] for s in states]).norm(dim=-1).mean())


def normalisation(run: RahfRun, patterns: Patterns) -> tuple[dict[int, float], dict[str, Any]]:
    """(the factor f_l per target layer, the norms it comes from as recorded in the metrics)."""
    cfg, layers = run.cfg, run.layers
    v_raw = {layer: _token_norm(patterns.diffs, layer) for layer in layers}
    h_norm = {layer: _token_norm(patterns.base, layer) for layer in layers}
    if cfg.normalize == "relative":
        factor = {layer: cfg.v_norm * h_norm[layer] / max(v_raw[layer], 1e-12) for layer in layers}
    else:
        factor = dict.fromkeys(layers, 1.0)
    stats = {
        "diff_token_norm_raw": {str(k): v for k, v in v_raw.items()},
        "hidden_token_norm": {str(k): v for k, v in h_norm.items()},
        "diff_to_hidden_ratio_raw": {str(k): v_raw[k] / max(h_norm[k], 1e-12) for k in layers},
        "normalize_factor": {str(k): v for k, v in factor.items()},
    }
    return factor, stats


def distill_targets(
    patterns: Patterns, factor: dict[int, float], alpha: float, layers: Sequence[int]
) -> list[torch.Tensor]:
    """Per example [n_response, n_layers, d]: ``h_base + alpha * f_l * v`` at each of ``layers``."""
    return [
        torch.stack([h[layer] + alpha * factor[layer] * v[layer] for layer in layers], dim=1)
        for h, v in zip(patterns.base, patterns.diffs, strict=True)
    ]


@dataclass
class Extracted:
    """Step 2's result: step 3's inputs and targets (train and eval), the ``add`` artifact's mean
    differences {l: [d]} (normalised), the response tokens they average and the norm statistics."""

    train_inputs: list[Encoded]
    train_targets: list[torch.Tensor]
    eval_inputs: list[Encoded]
    eval_targets: list[torch.Tensor]
    mean_diff: dict[int, torch.Tensor]
    response_tokens: int
    stats: dict[str, Any]


def _subset(run: RahfRun, pairs: list[PreferencePair], n_which: int) -> list[PreferencePair]:
    """``extract_limit`` pairs drawn with ``random.Random(seed)`` (in their order), or all of them;
    by default as many as step 3 consumes in one epoch."""
    cfg, limit = run.cfg, run.cfg.extract_limit
    if limit is None:
        per_step = cfg.batch_size * cfg.grad_accum * run.accelerator.num_processes
        limit = -(-cfg.distill_steps * per_step // n_which)
    if limit >= len(pairs):
        return pairs
    keep = sorted(random.Random(cfg.seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def extract(
    run: RahfRun, contrast: Contrast, pairs: list[PreferencePair], eval_pairs: list[PreferencePair]
) -> Extracted:
    """Step 2: the patterns of (a subset of) ``pairs`` and of ``eval_pairs``, and step 3's targets."""
    cfg, t = run.cfg, time.monotonic()
    which = ["chosen", "rejected"] if cfg.extract_on == "both" else [cfg.extract_on]
    ext_pairs = _subset(run, pairs, len(which))
    train = collect(run, contrast, ext_pairs, which)
    factor, stats = normalisation(run, train)
    train_targets = distill_targets(train, factor, cfg.alpha, run.layers)
    train.base = []  # no longer needed: free it before the eval pass
    if eval_pairs:
        held = collect(run, contrast, eval_pairs, which)
        eval_inputs, eval_targets = held.plain, distill_targets(held, factor, cfg.alpha, run.layers)
        del held
    else:
        eval_inputs, eval_targets = [], []
    n_tok = sum(d[run.layers[0]].shape[0] for d in train.diffs)
    mean_diff = {
        layer: factor[layer] * torch.cat([d[layer] for d in train.diffs]).mean(0) for layer in run.layers
    }
    run.phases["extract"] = {
        "pairs": len(ext_pairs),
        "examples": len(train.plain),
        "response_tokens": n_tok,
        "wall_s": round(time.monotonic() - t, 1),
    }
    return Extracted(train.plain, train_targets, eval_inputs, eval_targets, mean_diff, n_tok, stats)
