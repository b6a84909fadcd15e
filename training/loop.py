"""The optimisation loop every trainer uses: AdamW, warmup + linear decay or constant, resumable bitwise.

One phase is described by a :class:`LoopSpec` and run by :func:`run_loop` under ``accelerate``. Per
optimizer step each process takes ``grad_accum`` micro-batches of ``batch_size`` examples; the loss of
a micro-batch is ``loss_sum / count`` (the module returns both) divided by ``grad_accum``. The learning
rate at step s (0-based) of S, with W = round(warmup_ratio * S) warmup steps, is

    lr_s = lr * (s + 1) / W            for s < W
    lr_s = lr * max(0, (S - s) / (S - W))   otherwise

or, with ``schedule="constant"``, ``lr_s = lr`` at every step (no warmup: Hugging Face's
``constant``, which RAHF's official step-3 scripts use) (:func:`lr_factor`). The data order is the
stream of seeded epoch permutations of the dataset indices, so the examples of step s depend only on
the seed and s: a run resumed from a checkpoint (:mod:`training.checkpoint`) continues exactly as one
that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import capture, load_checkpoint, restore, save_checkpoint
from .runlog import RunLog
from .tokens import Encoded, batches

if TYPE_CHECKING:
    from .config import TrainOptions

__all__ = ["LoopSpec", "eval_loss", "lr_factor", "mean_loss", "run_loop"]


@dataclass
class LoopSpec:
    """One optimisation phase.

    ``module(**batch)`` returns ``(loss_sum, count)`` and is what ``accelerate`` prepares (its
    trainable parameters are the ones optimised). ``make_batch(indices)`` builds the batch of the
    examples at those dataset indices. ``schedule`` is ``linear`` (warmup + decay) or ``constant``
    (see :func:`lr_factor`). ``eval_fn()``, if given, returns ``{name: value}`` and is
    called before the first step (step 0), every ``eval_every`` steps and after the last one.
    """

    name: str
    module: nn.Module
    n_items: int
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]]
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"
    seed: int = 0
    eval_fn: Callable[[], dict[str, float]] | None = None
    eval_every: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    log: RunLog | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_options(cls, opts: TrainOptions, **fields: Any) -> LoopSpec:
        """A phase with the loop settings of a run's options (batch size, accumulation, warmup, weight
        decay, clipping, checkpoint and evaluation intervals); ``fields`` give the rest."""
        shared = (
            "batch_size",
            "grad_accum",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "checkpoint_every",
            "eval_every",
        )
        return cls(**{k: getattr(opts, k) for k in shared}, **fields)

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint_dir / "<name>.pt"`` (``None`` without a checkpoint folder)."""
        return self.checkpoint_dir / f"{self.name}.pt" if self.checkpoint_dir is not None else None


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """``linear``: warmup over ``warmup`` steps to 1, then linear decay to 0 at ``total``;
    ``constant``: 1 at every step."""
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise ValueError(f"schedule must be linear or constant, not {schedule!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _index_stream(n: int, seed: int, start: int) -> Iterator[int]:
    """Dataset indices from position ``start`` of the endless stream of seeded epoch permutations."""
    epoch, offset = divmod(start, n)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        yield from perm[offset:]
        epoch, offset = epoch + 1, 0


def _optimizer(spec: LoopSpec, params: list[nn.Parameter]):
    """AdamW (weight decay on matrices only) and its warmup/decay schedule."""
    decay = [p for p in params if p.dim() >= 2] if spec.weight_decay else []
    ids = {id(p) for p in decay}
    groups = [{"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": spec.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
    warmup = int(round(spec.warmup_ratio * spec.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec.steps, warmup, spec.schedule)
    )
    return optimizer, scheduler


def _step(spec: LoopSpec, model, stream: Iterator[int], accelerator) -> float:
    """Forward and backward of one step's micro-batches; returns their token-weighted mean loss."""
    nproc, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for micro in range(spec.grad_accum):
        chunk = [next(stream) for _ in range(spec.batch_size * nproc)]
        mine = chunk[rank * spec.batch_size : (rank + 1) * spec.batch_size]
        batch = {k: v.to(accelerator.device) for k, v in spec.make_batch(mine).items()}
        sync = micro == spec.grad_accum - 1
        ctx = nullcontext() if sync or nproc == 1 else accelerator.no_sync(model)
        with ctx:
            loss_sum, n = model(**batch)
            loss = loss_sum / n.clamp(min=1)
            accelerator.backward(loss / spec.grad_accum)
        total += loss_sum.detach().double().cpu()
        count += n.detach().double().cpu()
    return float(total / count.clamp(min=1))


def _evaluate(spec: LoopSpec, step: int) -> None:
    if spec.eval_fn is None:
        return
    metrics = spec.eval_fn()
    spec.history.append({"step": step, **metrics})
    if spec.log is not None:
        spec.log.write(spec.name, step, **metrics)


def _save(spec: LoopSpec, step: int, model, optimizer, scheduler, accelerator) -> None:
    path = spec.checkpoint_path
    if path is None:
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        save_checkpoint(path, capture(step, inner, optimizer, scheduler, spec.history))
    accelerator.wait_for_everyone()


def run_loop(spec: LoopSpec, accelerator, *, desc: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``spec.module``'s trainable parameters for ``spec.steps`` optimizer steps.

    AdamW, linear warmup (``warmup_ratio`` of the steps) and linear decay, gradient clipping,
    ``grad_accum`` micro-batches of ``batch_size`` examples per process and step. With ``resume`` and a
    checkpoint in ``spec.checkpoint_dir``, the run continues from it bitwise. Returns ``{"steps",
    "train_loss" (last), "history", "resumed_from"}``.
    """
    params = [p for p in spec.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{spec.name}: nothing to train")
    optimizer, scheduler = _optimizer(spec, params)
    model, optimizer = accelerator.prepare(spec.module, optimizer)
    per_step = spec.batch_size * spec.grad_accum * accelerator.num_processes
    start, resumed_from = 0, None
    ckpt = spec.checkpoint_path
    if resume and ckpt is not None and ckpt.exists():
        inner = accelerator.unwrap_model(model)
        start = resumed_from = restore(load_checkpoint(ckpt), inner, optimizer, scheduler, spec.history)
    if start == 0 and spec.eval_fn is not None:
        _evaluate(spec, 0)
    stream = _index_stream(spec.n_items, spec.seed, start * per_step)
    last_loss = float("nan")
    bar = _progress(spec.steps, start, desc or spec.name, accelerator.is_local_main_process)
    model.train(False)  # the frozen base keeps eval-mode semantics (no dropout)
    for step in range(start, spec.steps):
        last_loss = _step(spec, model, stream, accelerator)
        if spec.max_grad_norm:
            accelerator.clip_grad_norm_(params, spec.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if spec.log is not None and accelerator.is_main_process:
            spec.log.write(spec.name, step + 1, train_loss=last_loss, lr=lr)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        done = step + 1
        if spec.eval_every and done % spec.eval_every == 0 and done < spec.steps:
            _evaluate(spec, done)
        if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < spec.steps:
            _save(spec, done, model, optimizer, scheduler, accelerator)
    bar.close()
    if spec.eval_fn is not None and (not spec.history or spec.history[-1]["step"] != spec.steps):
        _evaluate(spec, spec.steps)
    _save(spec, spec.steps, model, optimizer, scheduler, accelerator)
    return {
        "steps": spec.steps,
        "train_loss": last_loss,
        "history": list(spec.history),
        "resumed_from": resumed_from,
    }


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


@torch.no_grad()
def mean_loss(module: nn.Module, data: Iterable[dict[str, torch.Tensor]], device) -> float:
    """Token-weighted mean of ``module``'s ``(loss_sum, count)`` over ``data``: sum of sums / sum of
    counts."""
    total, count = 0.0, 0
    for batch in data:
        s, n = module(**{k: v.to(device) for k, v in batch.items()})
        total += float(s)
        count += int(n)
    return total / max(count, 1)


def eval_loss(module: nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int, device) -> float:
    """:func:`mean_loss` of ``module`` over ``encoded`` in batches of ``batch_size`` (e.g. the response
    NLL of :class:`training.red.RedModel`)."""
    return mean_loss(module, batches(encoded, pad_id, batch_size), device)
