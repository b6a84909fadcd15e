"""RAHF - Representation Alignment from Human Feedback (Liu et al., ACL 2024), trained offline.

Three steps, following the paper:

1. **Instructing the LM on the preferences.**
   *SCIT* (single model, contrastive instruction tuning): one fine-tune of the base model on every
   preference pair twice - the chosen reply under a "good" instruction and the rejected reply under a
   "bad" instruction (the instruction is the system message; see :data:`GOOD_INSTRUCTION` and
   :data:`BAD_INSTRUCTION`), loss on the response tokens. *Dual*: two fine-tunes, a preferred model on
   the chosen replies and a dispreferred model on the rejected ones. Each fine-tune is a LoRA adapter
   (default; rank 8 on every linear of every block) or a full fine-tune of a copy (``finetune="full"``).
2. **Collecting the activity patterns.** For every (prompt, response) of the data (by default both the
   chosen and the rejected response of each pair, over a seeded random subset of as many pairs as step
   3 consumes in one epoch: ``extract_limit``), the per-token difference of the hidden states - the
   residual stream after block l, i.e. ``output_hidden_states[l + 1]`` - over the response tokens:
   SCIT = tuned model under the good instruction minus the same model under the bad instruction on the
   same response tokens; Dual = preferred model minus dispreferred model on the same input.
3. **Constructing the final model.** A LoRA adapter (rank 8, alpha 16, on ``q_proj``/``v_proj`` of
   every block up to the highest target layer) on the *base* model, trained on the plain prompt +
   response so that at each target layer the hidden states of the response tokens move to
   ``h_base + alpha * v`` (alpha = 5), with the paper's loss: the L2 distance per token, averaged over
   the response tokens and the target layers.

Normalisation (a deviation from the paper, ``normalize="relative"``, the default): v is rescaled by one
factor per target layer so that its mean per-token norm is ``v_norm`` (0.05) times the mean norm of the
base model's hidden states there; directions and the token-to-token variation are kept. The raw
differences' size depends on how far the preference fine-tunes drifted, not only on the preference:
on SmolLM2-135M the raw Dual differences were 12-28 % of the hidden-state norm (SCIT's: 3-10 %), so
``h_base + 5 v`` asked for displacements larger than the hidden states themselves and the distilled
LoRA produced gibberish at strength 1. ``normalize="none"`` uses the raw differences, as the paper.

Target layers: the middle layers, every second one. For the 32-layer 7B Llamas the usual choice of
this recipe (RepE's LoRRA, which RAHF's step 3 follows) is 10, 12, ..., 20; :func:`default_target_layers`
scales that range (30 % .. 65 % of the depth) to the model: for the 30-layer SmolLM2-135M it gives
9, 11, 13, 15, 17, 19, so the LoRA sits on blocks 0..19. ``target_layers`` overrides it.

Outputs (in ``out_dir``): ``lora.safetensors`` (kind ``lora``, the adapter of step 3) and
``add.safetensors`` (kind ``add``): the (normalised) difference vectors averaged over all response
tokens of the data at the target layers, each multiplied by ``add_scale = alpha / len(target_layers)``.
Activation addition at several layers accumulates in the residual stream, so with that scale the
total shift the model receives at strength 1 is about ``alpha`` times one mean difference - the
displacement step 3 distils. Both carry the training configuration and their metrics in the
metadata; a JSONL loss log, a PNG plot of every phase and ``summary.json`` are written next to them.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering_vectors import Artifact, find_layout, save_artifact

from .artifacts import artifact_metadata
from .config import BAD_INSTRUCTION, GOOD_INSTRUCTION, RahfConfig
from .forward import gather_response, response_nll, response_states, run_to_layers
from .loaders import load_preferences, load_splits
from .loop import LoopSpec, mean_loss, run_loop
from .lora import LoraSet
from .options import recorded
from .runlog import RunLog
from .runtime import load_base_model, peak_rss_mb, start
from .tokens import Encoded, collate, encode, pad_token_id

__all__ = [
    "BAD_INSTRUCTION",
    "GOOD_INSTRUCTION",
    "RahfConfig",
    "Runner",
    "default_target_layers",
    "extract_differences",
    "train_rahf",
]

log = logging.getLogger(__name__)


def default_target_layers(num_layers: int) -> list[int]:
    """The middle layers, every second one: from 30 % to 65 % of the depth (10..20 of 32, 9..19 of 30)."""
    lo = min(num_layers - 1, max(0, round(0.3 * num_layers)))
    hi = min(num_layers - 1, max(lo, round(0.65 * num_layers)))
    return list(range(lo, hi + 1, 2))


# --------------------------------------------------------------------------------------------------
# Models that produce activity patterns
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """A model to read hidden states from: ``model`` (its decoder ``blocks``), with ``lora`` active
    (a LoRA fine-tune on the shared base) or not (the base, or a fully fine-tuned copy)."""

    model: nn.Module
    blocks: Sequence[nn.Module]
    lora: LoraSet | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        with self.lora.active() if self.lora is not None else nullcontext():
            yield

    def states(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        with self.active():
            return response_states(self.model, self.blocks, layers, batch)


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
    """RAHF step 2: per example, ``{l: [n_response, d]}`` = hidden states of ``pos`` on ``pos_enc[i]``
    minus those of ``neg`` on ``neg_enc[i]`` at the response tokens (block outputs, float32).

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


# --------------------------------------------------------------------------------------------------
# Trainable modules
# --------------------------------------------------------------------------------------------------


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


class Distiller(nn.Module):
    """Step 3: the L2 distance between the LoRA model's hidden states at the target layers and the
    targets ``h_base + alpha * v``, per response token, averaged over the target layers.

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


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _chunks(seq: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


def train_rahf(cfg: RahfConfig) -> dict[str, Any]:
    """Run the three RAHF steps and write ``add.safetensors`` and ``lora.safetensors`` (and the log,
    plot and summary) into ``cfg.out_dir``. Returns the summary."""
    t0 = time.monotonic()
    out_dir = Path(cfg.out_dir)
    accelerator = start(cfg)
    main = accelerator.is_main_process
    dev = accelerator.device
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    pairs, eval_pairs = load_splits(cfg, load_preferences)

    lm = load_base_model(cfg.model, accelerator, cfg.dtype)
    base, tok = lm.model, lm.tokenizer
    layout = find_layout(base)
    L = layout.num_layers
    targets = sorted(set(cfg.target_layers)) if cfg.target_layers else default_target_layers(L)
    if not targets or targets[0] < 0 or targets[-1] >= L:
        raise ValueError(f"target layers {targets} out of range for a {L}-layer model")
    add_scale = cfg.add_scale if cfg.add_scale is not None else cfg.alpha / len(targets)
    pad_id = pad_token_id(tok)
    ml = cfg.max_length

    def enc(p, which: str, system: str | None = None) -> Encoded:
        return encode(tok, p.prompt, getattr(p, which), system=system, max_length=ml)

    run_log = RunLog(out_dir / "log.jsonl", enabled=main, append=bool(cfg.resume))
    ckpt_dir = Path(cfg.resume or cfg.checkpoint_dir or out_dir / "ckpt")
    resume = cfg.resume is not None
    phases: dict[str, Any] = {}

    # ---- step 1: preference fine-tunes ---------------------------------------------------------
    def tune(name: str, train_seqs: list[list[Encoded]], eval_seqs: list[list[Encoded]], seed: int) -> Runner:
        """Fine-tune on ``train_seqs`` (each item: the sequences of one pair) and return the runner."""
        if cfg.finetune == "lora":
            lora = LoraSet(
                layout,
                [(layer, m) for layer in range(L) for m in cfg.tune_modules],
                rank=cfg.tune_rank,
                alpha=cfg.tune_alpha,
                seed=seed,
            )
            module, runner_model, blocks = LMTuner(base, lora), base, layout.blocks
        else:
            copy_model = copy.deepcopy(base)
            for p in copy_model.parameters():
                p.requires_grad_(True)
            lora, module, runner_model = None, LMTuner(copy_model, None), copy_model
            blocks = find_layout(copy_model).blocks
        eval_batches = [
            collate([e for item in chunk for e in item], pad_id)
            for chunk in _chunks(eval_seqs, max(1, cfg.eval_batch_size // 2))
        ]
        spec = LoopSpec.from_options(
            cfg,
            name=name,
            module=module,
            n_items=len(train_seqs),
            make_batch=lambda idx: collate([e for i in idx for e in train_seqs[i]], pad_id),
            steps=cfg.tune_steps,
            lr=cfg.tune_lr,
            seed=seed,
            eval_fn=(lambda: {"eval_loss": mean_loss(module, eval_batches, dev)}) if eval_batches else None,
            checkpoint_dir=ckpt_dir,
            log=run_log,
        )
        t = time.monotonic()
        res = run_loop(spec, accelerator, desc=f"step 1: {name}", resume=resume)
        hist = res["history"]
        phases[name] = {
            "steps": res["steps"],
            "train_loss_last": res["train_loss"],
            "eval_loss_before": hist[0]["eval_loss"] if hist else None,
            "eval_loss_after": hist[-1]["eval_loss"] if hist else None,
            "wall_s": round(time.monotonic() - t, 1),
        }
        tuned = accelerator.unwrap_model(module)
        for p in tuned.parameters():
            p.requires_grad_(False)
        return Runner(runner_model, blocks, tuned.lora if lora is not None else None)

    if cfg.variant == "scit":
        good, bad = cfg.good_instruction, cfg.bad_instruction

        def scit_seqs(ps):
            return [[enc(p, "chosen", good), enc(p, "rejected", bad)] for p in ps]

        tuned = tune("scit", scit_seqs(pairs), scit_seqs(eval_pairs), cfg.seed)
        pos_runner = neg_runner = tuned
        pos_sys, neg_sys = good, bad
    else:
        pos_runner = tune(
            "dual-chosen",
            [[enc(p, "chosen")] for p in pairs],
            [[enc(p, "chosen")] for p in eval_pairs],
            cfg.seed,
        )
        neg_runner = tune(
            "dual-rejected",
            [[enc(p, "rejected")] for p in pairs],
            [[enc(p, "rejected")] for p in eval_pairs],
            cfg.seed + 1,
        )
        pos_sys = neg_sys = None

    # ---- step 2: activity patterns ----------------------------------------------------------------
    which = ["chosen", "rejected"] if cfg.extract_on == "both" else [cfg.extract_on]
    base_runner = Runner(base, layout.blocks)

    def patterns(ps) -> tuple[list[Encoded], list[dict[int, torch.Tensor]], list[dict[int, torch.Tensor]]]:
        """Step-3 inputs (plain prompt + response), their differences v and base hidden states."""
        plain = [enc(p, w) for w in which for p in ps]
        pos = [enc(p, w, pos_sys) for w in which for p in ps]
        neg = [enc(p, w, neg_sys) for w in which for p in ps]
        diffs = extract_differences(
            pos_runner, neg_runner, pos, neg, targets, pad_id, cfg.eval_batch_size, progress=main
        )
        hb = base_states(base_runner, plain, targets, pad_id, cfg.eval_batch_size)
        return plain, diffs, hb

    def distill_targets(hb, diffs) -> list[torch.Tensor]:
        """Per example [n_resp, n_layers, d]: h_base + alpha * factor_l * v (factor 1 without normalising)."""
        return [
            torch.stack([h[layer] + cfg.alpha * factor[layer] * v[layer] for layer in targets], dim=1)
            for h, v in zip(hb, diffs, strict=True)
        ]

    def token_norm(states: list[dict[int, torch.Tensor]], layer: int) -> float:
        return float(torch.cat([s[layer] for s in states]).norm(dim=-1).mean())

    t = time.monotonic()
    ext_pairs = pairs
    limit = cfg.extract_limit
    if limit is None:  # as many pairs as step 3 consumes in one epoch
        per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        limit = -(-cfg.distill_steps * per_step // len(which))
    if limit < len(pairs):
        keep = sorted(random.Random(cfg.seed).sample(range(len(pairs)), limit))
        ext_pairs = [pairs[i] for i in keep]
    train_plain, train_diffs, train_hb = patterns(ext_pairs)
    v_raw = {layer: token_norm(train_diffs, layer) for layer in targets}
    h_norm = {layer: token_norm(train_hb, layer) for layer in targets}
    if cfg.normalize == "relative":
        factor = {layer: cfg.v_norm * h_norm[layer] / max(v_raw[layer], 1e-12) for layer in targets}
    else:
        factor = dict.fromkeys(targets, 1.0)
    train_tgt = distill_targets(train_hb, train_diffs)
    del train_hb
    if eval_pairs:
        eval_plain, eval_diffs, eval_hb = patterns(eval_pairs)
        eval_tgt = distill_targets(eval_hb, eval_diffs)
        del eval_diffs, eval_hb
    else:
        eval_plain, eval_tgt = [], []
    n_tok = sum(d[targets[0]].shape[0] for d in train_diffs)
    mean_diff = {
        layer: factor[layer] * torch.cat([d[layer] for d in train_diffs]).mean(0) for layer in targets
    }
    del train_diffs
    phases["extract"] = {
        "pairs": len(ext_pairs),
        "examples": len(train_plain),
        "response_tokens": n_tok,
        "wall_s": round(time.monotonic() - t, 1),
    }
    v_stats = {
        "diff_token_norm_raw": {str(k): v for k, v in v_raw.items()},
        "hidden_token_norm": {str(k): v for k, v in h_norm.items()},
        "diff_to_hidden_ratio_raw": {str(k): v_raw[k] / max(h_norm[k], 1e-12) for k in targets},
        "normalize_factor": {str(k): v for k, v in factor.items()},
    }

    # ---- step 3: distil into a LoRA adapter on the base -------------------------------------------
    max_t = targets[-1]
    lora = LoraSet(
        layout,
        [(layer, m) for layer in range(max_t + 1) for m in cfg.lora_modules],
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        seed=cfg.seed + 2,
    )
    distiller = Distiller(base, layout.blocks, lora, targets)

    def distill_batch(plain: list[Encoded], tgt: list[torch.Tensor], idx: Sequence[int]) -> dict:
        b = collate([plain[i] for i in idx], pad_id)
        b["target"] = torch.cat([tgt[i] for i in idx])
        return b

    eval_batches = [
        distill_batch(eval_plain, eval_tgt, range(s, min(s + cfg.eval_batch_size, len(eval_plain))))
        for s in range(0, len(eval_plain), cfg.eval_batch_size)
    ]
    spec = LoopSpec.from_options(
        cfg,
        name="distill",
        module=distiller,
        n_items=len(train_plain),
        make_batch=lambda idx: distill_batch(train_plain, train_tgt, idx),
        steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        seed=cfg.seed + 2,
        eval_fn=(lambda: {"eval_loss": mean_loss(distiller, eval_batches, dev)}) if eval_batches else None,
        checkpoint_dir=ckpt_dir,
        log=run_log,
    )
    t = time.monotonic()
    res = run_loop(spec, accelerator, desc="step 3: distill", resume=resume)
    hist = res["history"]
    phases["distill"] = {
        "steps": res["steps"],
        "train_loss_last": res["train_loss"],
        "eval_loss_before": hist[0]["eval_loss"] if hist else None,
        "eval_loss_after": hist[-1]["eval_loss"] if hist else None,
        "wall_s": round(time.monotonic() - t, 1),
    }
    lora = accelerator.unwrap_model(distiller).lora

    # ---- outputs ---------------------------------------------------------------------------------
    method = f"rahf-{cfg.variant}"
    training = recorded(cfg)
    training.update(
        cfg.extra,
        model=cfg.model or lm.model_id,
        dtype=lm.dtype_name,
        target_layers=targets,
        add_scale=add_scale,
        processes=accelerator.num_processes,
        lora_blocks=list(range(max_t + 1)),
    )
    common = {
        "phases": phases,
        "train_pairs": len(pairs),
        "eval_pairs": len(eval_pairs),
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    add_metrics = {
        **common,
        **v_stats,
        "mean_diff_norm": {str(k): float(v.norm()) for k, v in mean_diff.items()},
        "response_tokens": n_tok,
    }
    lora_metrics = {
        **common,
        **v_stats,
        "distill_eval_loss_before": phases["distill"]["eval_loss_before"],
        "distill_eval_loss_after": phases["distill"]["eval_loss_after"],
    }
    summary: dict[str, Any] = {"training": training, "metrics": {**common, **add_metrics, **lora_metrics}}
    if main:
        add = Artifact(
            kind="add",
            tensors={
                f"layers.{layer}.direction": (add_scale * mean_diff[layer]).cpu().contiguous()
                for layer in targets
            },
            hidden_size=layout.hidden_size,
            num_layers=L,
            model_type=layout.model_type,
            method=method,
            extra=artifact_metadata(
                training,
                add_metrics,
                base_model=lm.model_id,
                description=f"RAHF-{cfg.variant.upper()} preference direction: mean hidden-state difference "
                f"x {add_scale:g} at layers {targets}",
            ),
        )
        lo = Artifact(
            kind="lora",
            tensors=lora.export(),
            hidden_size=layout.hidden_size,
            num_layers=L,
            model_type=layout.model_type,
            method=method,
            lora_alpha=cfg.lora_alpha,
            extra=artifact_metadata(
                training,
                lora_metrics,
                base_model=lm.model_id,
                description=f"RAHF-{cfg.variant.upper()} LoRA (r={cfg.lora_rank}, alpha={cfg.lora_alpha:g}) "
                f"on {'/'.join(cfg.lora_modules)} of blocks 0..{max_t}",
            ),
        )
        summary.update(
            add=str(out_dir / "add.safetensors"),
            add_sha256=save_artifact(add, out_dir / "add.safetensors"),
            lora=str(out_dir / "lora.safetensors"),
            lora_sha256=save_artifact(lo, out_dir / "lora.safetensors"),
            log=str(run_log.path),
            plot=str(run_log.plot(out_dir / "loss.png", title=f"RAHF-{cfg.variant.upper()}")),
        )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary
