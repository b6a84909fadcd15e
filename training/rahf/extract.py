"""RAHF step 2 - collecting the activity patterns, and the targets step 3 distils.

For every (prompt, response) of the step 2-3 data - by default one reply per pair drawn at random for
SCIT and both replies of each pair for Dual (``extract_on``, as the official scripts' ``data_type``
``random`` and ``all``), over a seeded random subset of as many pairs as step 3 consumes in one epoch
(``extract_limit``) - the per-token difference of the hidden states over the response tokens at each
target layer l (numbered as ``output_hidden_states[l]``: the output of block l - 1):

    v_l(t) = h_l^pos(t) - h_l^neg(t)

SCIT: the tuned model under the good instruction minus the same model under the bad one, on the same
response tokens; Dual: the preferred model minus the dispreferred one on the same input.

Step 3 trains on top of the step-1 model (:attr:`~training.rahf.instruct.Contrast.tuned`: SCIT's tuned
model, Dual's preferred model), so the targets are built on that model's hidden states on the plain
prompt + response, as in the official ``RAHF.py``:

    target_l(t) = h_l^tuned(t) + alpha * f_l * v_l(t)

``f_l = 1`` by default (``normalize="none"``: the raw differences, as the paper). ``normalize=
"relative"`` (an option of ours) rescales v_l by one factor per layer, ``f_l = v_norm * mean_t
|h_l^tuned(t)| / mean_t |v_l(t)|``, so that its mean per-token norm is ``v_norm`` times the hidden
states'; directions and the token-to-token variation are kept. The ``add`` artifact's direction at
layer l is the mean of f_l * v_l over all response tokens.
"""

from __future__ import annotations

import math
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
    "examples",
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
    blocks: Sequence[int],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[int, torch.Tensor]]:
    """Per example, ``{b: [n_response, d]}`` = the output of block b of ``pos`` on ``pos_enc[i]`` minus
    that of ``neg`` on ``neg_enc[i]`` at the response tokens (float32), for each b in ``blocks``.

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
        hp, hn = pos.states(pb, blocks), neg.states(nb, blocks)
        lens = pb["n_response"].tolist()
        diffs = {b: (hp[b] - hn[b]).split(lens) for b in blocks}
        out.extend({b: diffs[b][j] for b in blocks} for j in range(len(lens)))
    return out


@torch.no_grad()
def base_states(
    runner: Runner, enc: Sequence[Encoded], blocks: Sequence[int], pad_id: int, batch_size: int = 16
) -> list[dict[int, torch.Tensor]]:
    """Per example ``{b: [n_response, d]}``: the output of ``runner``'s block b at the response tokens."""
    out: list[dict[int, torch.Tensor]] = []
    for s in range(0, len(enc), batch_size):
        b = collate(enc[s : s + batch_size], pad_id)
        h = runner.states(b, blocks)
        lens = b["n_response"].tolist()
        parts = {k: h[k].split(lens) for k in blocks}
        out.extend({k: parts[k][j] for k in blocks} for j in range(len(lens)))
    return out


@dataclass
class Patterns:
    """The activity patterns of some examples: per example, the step-3 input ``plain`` (prompt without
    instruction + response), the differences ``diffs`` {block: [n, d]} and the step-1 model's hidden
    states ``base`` {block: [n, d]} on ``plain`` (keys: the blocks whose outputs are the target
    layers)."""

    plain: list[Encoded]
    diffs: list[dict[int, torch.Tensor]]
    base: list[dict[int, torch.Tensor]]


def collect(run: RahfRun, contrast: Contrast, items: Sequence[tuple[PreferencePair, str]]) -> Patterns:
    """The :class:`Patterns` of ``items`` (a pair and which of its replies: ``"chosen"`` or
    ``"rejected"``); the targets' base states come from the step-1 model, ``contrast.tuned``."""
    blocks, pad, bs = run.blocks, run.pad_id, run.cfg.eval_batch_size
    plain = [run.encode(p, w) for p, w in items]
    pos = [run.encode(p, w, contrast.pos_system) for p, w in items]
    neg = [run.encode(p, w, contrast.neg_system) for p, w in items]
    main = run.accelerator.is_main_process
    diffs = extract_differences(contrast.pos, contrast.neg, pos, neg, blocks, pad, bs, progress=main)
    return Patterns(plain, diffs, base_states(contrast.tuned, plain, blocks, pad, bs))


def _token_norm(states: list[dict[int, torch.Tensor]], layer: int) -> float:
    """Mean per-token L2 norm at ``layer`` over all examples."""
    return float(torch.cat([s[layer] for s in states]).norm(dim=-1).mean())


def normalisation(run: RahfRun, patterns: Patterns) -> tuple[dict[int, float], dict[str, Any]]:
    """(the factor f per target block, the norms it comes from as recorded in the metrics, keyed by
    target layer)."""
    cfg = run.cfg
    v_raw = {b: _token_norm(patterns.diffs, b) for b in run.blocks}
    h_norm = {b: _token_norm(patterns.base, b) for b in run.blocks}
    if cfg.normalize == "relative":
        factor = {b: cfg.v_norm * h_norm[b] / max(v_raw[b], 1e-12) for b in run.blocks}
    else:
        factor = dict.fromkeys(run.blocks, 1.0)
    pairs = list(zip(run.layers, run.blocks, strict=True))
    stats = {
        "diff_token_norm_raw": {str(lay): v_raw[b] for lay, b in pairs},
        "hidden_token_norm": {str(lay): h_norm[b] for lay, b in pairs},
        "diff_to_hidden_ratio_raw": {str(lay): v_raw[b] / max(h_norm[b], 1e-12) for lay, b in pairs},
        "normalize_factor": {str(lay): factor[b] for lay, b in pairs},
    }
    return factor, stats


def distill_targets(
    patterns: Patterns, factor: dict[int, float], alpha: float, blocks: Sequence[int]
) -> list[torch.Tensor]:
    """Per example [n_response, n_layers, d]: ``h_tuned + alpha * f * v`` at each of ``blocks``."""
    return [
        torch.stack([h[b] + alpha * factor[b] * v[b] for b in blocks], dim=1)
        for h, v in zip(patterns.base, patterns.diffs, strict=True)
    ]


@dataclass
class Extracted:
    """Step 2's result: step 3's inputs and targets (train and eval), the ``add`` artifact's mean
    differences {block: [d]} (normalised), the response tokens they average and the norm statistics."""

    train_inputs: list[Encoded]
    train_targets: list[torch.Tensor]
    eval_inputs: list[Encoded]
    eval_targets: list[torch.Tensor]
    mean_diff: dict[int, torch.Tensor]
    response_tokens: int
    stats: dict[str, Any]


def _subset(run: RahfRun, pairs: list[PreferencePair], per_pair: float) -> list[PreferencePair]:
    """``extract_limit`` pairs drawn with ``random.Random(seed)`` (in their order), or all of them;
    by default as many as step 3 consumes in one epoch (``per_pair``: examples per pair)."""
    cfg, limit = run.cfg, run.cfg.extract_limit
    if limit is None:
        per_step = cfg.batch_size * cfg.grad_accum * run.accelerator.num_processes
        limit = math.ceil(cfg.distill_steps * per_step / per_pair)
    if limit >= len(pairs):
        return pairs
    keep = sorted(random.Random(cfg.seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def examples(pairs: Sequence[PreferencePair], extract_on: str, seed: int) -> list[tuple[PreferencePair, str]]:
    """The (pair, reply) examples of step 2-3: every chosen, every rejected, both (chosen ones first),
    or one reply per pair drawn with ``random.Random(seed)`` (``random``)."""
    if extract_on == "random":
        rng = random.Random(seed)
        return [(p, rng.choice(("chosen", "rejected"))) for p in pairs]
    which = ["chosen", "rejected"] if extract_on == "both" else [extract_on]
    return [(p, w) for w in which for p in pairs]


def extract(
    run: RahfRun, contrast: Contrast, pairs: list[PreferencePair], eval_pairs: list[PreferencePair]
) -> Extracted:
    """Step 2: the patterns of (a subset of) ``pairs`` and of ``eval_pairs``, and step 3's targets."""
    cfg, t = run.cfg, time.monotonic()
    ext_pairs = _subset(run, pairs, 2.0 if cfg.extract_on == "both" else 1.0)
    train = collect(run, contrast, examples(ext_pairs, cfg.extract_on, cfg.seed))
    factor, stats = normalisation(run, train)
    train_targets = distill_targets(train, factor, cfg.alpha, run.blocks)
    train.base = []  # no longer needed: free it before the eval pass
    if eval_pairs:
        held = collect(run, contrast, examples(eval_pairs, cfg.extract_on, cfg.seed + 1))
        eval_inputs, eval_targets = held.plain, distill_targets(held, factor, cfg.alpha, run.blocks)
        del held
    else:
        eval_inputs, eval_targets = [], []
    n_tok = sum(d[run.blocks[0]].shape[0] for d in train.diffs)
    mean_diff = {b: factor[b] * torch.cat([d[b] for d in train.diffs]).mean(0) for b in run.blocks}
    run.phases["extract"] = {
        "pairs": len(ext_pairs),
        "examples": len(train.plain),
        "response_tokens": n_tok,
        "wall_s": round(time.monotonic() - t, 1),
    }
    return Extracted(train.plain, train_targets, eval_inputs, eval_targets, mean_diff, n_tok, stats)
