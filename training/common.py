"""Shared machinery of the offline trainers (RED and RAHF).

* tokenisation of a prompt + response through the tokenizer's chat template, with labels on the
  response tokens only (:func:`encode`, :func:`collate`);
* the response-only language-model loss, computing logits for the labelled positions only
  (:func:`response_nll`);
* hidden-state capture at decoder-block outputs, optionally stopping the forward pass after the last
  block needed (:func:`capture_blocks`, :func:`response_states`);
* a small LoRA implementation on forward hooks whose tensors export in SPEC §4's ``lora`` layout
  (:class:`LoraSet`);
* a generic, resumable, ``accelerate``-driven training loop (:func:`run_loop`) with linear warmup and
  decay, gradient accumulation, a deterministic data order, checkpoints that restore a run bitwise,
  progress bars, a JSONL loss log and a PNG plot of the curves (:class:`RunLog`).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "Encoded",
    "LoopSpec",
    "LoraSet",
    "RunLog",
    "StopForward",
    "capture_blocks",
    "collate",
    "encode",
    "load_base_model",
    "make_accelerator",
    "peak_rss_mb",
    "plot_log",
    "response_nll",
    "response_states",
    "run_loop",
    "set_seed",
    "write_artifact",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (the trainers use no other randomness)."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def make_accelerator(device: str = "auto"):
    """An ``accelerate.Accelerator`` for ``device``: ``auto`` (whatever accelerate finds: CUDA, one
    process per GPU under ``accelerate launch``, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if ":" in device:
            torch.cuda.set_device(int(device.split(":", 1)[1]))
    return Accelerator(cpu=device == "cpu")


def load_base_model(path: str | None, accelerator, dtype: str = "float32"):
    """Load the (unquantized) base model frozen in eval mode on the accelerator's device.

    Returns ``server.model.LoadedModel``; ``path=None`` is the embedded default model.
    """
    from basemodel import load_model

    dev = accelerator.device
    device = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    lm = load_model(path, quantization="none", dtype=dtype, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    lm.model.eval()
    return lm


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One tokenised example: ``input_ids[:n_prompt]`` is the prompt, the rest the response."""

    input_ids: list[int]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.n_prompt :]


def _with_system(messages: Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    msgs = [dict(m) for m in messages]
    if system is None:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{system}\n\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": system}, *msgs]


def _texts(tokenizer, messages: list[dict[str, str]], response: str) -> tuple[str, str]:
    """(prompt text ending with the assistant header, response text ending with the end-of-turn)."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        pre = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(pre) and response in full[len(pre) :]:
            return pre, full[len(pre) :].rstrip()
        return pre, response + eos
    pre = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return pre, response + eos


def encode(
    tokenizer,
    prompt: Sequence[dict[str, str]],
    response: str,
    *,
    system: str | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise ``prompt`` (chat messages) + ``response`` through the chat template.

    ``system`` (e.g. RAHF-SCIT's good/bad instruction) becomes the system message (prepended to an
    existing one). The prompt is the template up to and including the assistant header; the response
    is the reply and the end-of-turn token (trailing whitespace after it is dropped). The two parts are
    tokenised separately, so the response tokens are identical whatever precedes them. Over
    ``max_length`` the response is cut to at most half of it, the prompt loses its oldest tokens.
    """
    pre, resp = _texts(tokenizer, _with_system(prompt, system), response)
    p_ids = tokenizer(pre, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[: max(max_length - len(p_ids), max_length // 2)]
        p_ids = p_ids[len(p_ids) - (max_length - len(r_ids)) :]
    if not r_ids:
        raise ValueError("empty response after tokenisation")
    return Encoded(list(p_ids) + list(r_ids), len(p_ids))


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (response tokens only),
    ``n_prompt`` and ``n_response`` [B]."""
    T = max(len(e.input_ids) for e in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt : n] = torch.tensor(e.response_ids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "n_prompt": torch.tensor([e.n_prompt for e in items]),
        "n_response": torch.tensor([e.n_response for e in items]),
    }


# --------------------------------------------------------------------------------------------------
# Forward helpers
# --------------------------------------------------------------------------------------------------


def _needs_full_logits(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def response_nll(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token NLL over the labelled tokens, their count).

    The output head runs only on the positions that predict a label (a causal LM's decoder, then its
    output embedding), which saves most of the 49k-vocabulary projection on short responses; models
    with logit soft-capping or scaling go through their full forward instead.
    """
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    if _needs_full_logits(model) or not hasattr(model, "get_decoder"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, :-1][sel]
    else:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out[0][:, :-1][sel]
        logits = model.get_output_embeddings()(hidden)
    nll = F.cross_entropy(logits.float(), target[sel], reduction="sum")
    return nll, sel.sum()


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


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


class LoraSet(nn.Module):
    """Low-rank adapters on some linears of a model, applied by forward hooks.

    Each adapted linear gets ``y + (alpha / r) * B (A x)`` with A [r, d_in] (Kaiming-uniform, as in
    peft) and B [d_out, r] (zeros), kept in float32 whatever the model's dtype. :meth:`active` installs
    the hooks for the duration of a block; :meth:`export` returns SPEC §4 ``lora`` tensors.
    """

    def __init__(
        self, layout, targets: Sequence[tuple[int, str]], rank: int = 8, alpha: float = 16.0, seed: int = 0
    ):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = [(int(layer), str(m)) for layer, m in targets]
        self._layout = [layout]  # not a submodule: the base model is not part of this set
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer, m in self.targets:
            lin = layout.linear(layer, m)
            d_in, d_out = lin.in_features, lin.out_features
            a = torch.empty(rank, d_in)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, d_in] weight
            a.uniform_(-bound, bound, generator=g)
            self.A[self._key(layer, m)] = nn.Parameter(a)
            self.B[self._key(layer, m)] = nn.Parameter(torch.zeros(d_out, rank))

    @staticmethod
    def _key(layer: int, module: str) -> str:
        return f"l{layer}__{module.replace('.', '__')}"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _hook(self, key: str):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            a, b = self.A[key], self.B[key]
            x = args[0]
            delta = (x.to(a.dtype) @ a.t()) @ b.t()
            return out + (self.scaling * delta).to(out.dtype)

        return hook

    @contextmanager
    def active(self) -> Iterator[None]:
        layout = self._layout[0]
        handles = []
        try:
            for layer, m in self.targets:
                lin = layout.linear(layer, m)
                handles.append(lin.register_forward_hook(self._hook(self._key(layer, m))))
            yield
        finally:
            for h in handles:
                h.remove()

    def export(self) -> dict[str, torch.Tensor]:
        """``layers.{l}.{module}.lora_A`` [r, d_in] and ``.lora_B`` [d_out, r] (float32, CPU)."""
        out = {}
        for layer, m in self.targets:
            k = self._key(layer, m)
            out[f"layers.{layer}.{m}.lora_A"] = self.A[k].detach().float().cpu().clone()
            out[f"layers.{layer}.{m}.lora_B"] = self.B[k].detach().float().cpu().clone()
        return out


def write_artifact(art, path: str | Path) -> str:
    """``save_artifact`` that never writes a file whose first byte is 0x80.

    The first 8 bytes of a safetensors file are its header length (little endian); when the low byte
    is 0x80 (header lengths 128, 384, 640, ...) the loader's container sniffing takes the file for a
    Python pickle and refuses it. A one-space ``pad`` metadata entry moves the length off that value.
    """
    from steering_vectors import save_artifact

    if art.to_bytes()[:1] == b"\x80":
        art.extra["pad"] = " "
        art.to_bytes()
    return save_artifact(art, path)


# --------------------------------------------------------------------------------------------------
# Logging and plots
# --------------------------------------------------------------------------------------------------


class RunLog:
    """Append-only JSONL loss log (one object per record: ``phase``, ``step``, metrics, ``time_s``) and
    its PNG plot. Only the main process writes."""

    def __init__(self, path: str | Path, enabled: bool = True, append: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.t0 = time.monotonic()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append or not self.path.exists():
                self.path.write_text("")

    def write(self, phase: str, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        rec = {
            "phase": phase,
            "step": step,
            **{k: float(v) for k, v in metrics.items()},
            "time_s": round(time.monotonic() - self.t0, 3),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def plot(self, png: str | Path, title: str = "") -> Path | None:
        return plot_log(self.path, png, title) if self.enabled else None


def plot_log(log_path: str | Path, png: str | Path, title: str = "") -> Path:
    """Plot every ``*loss*`` series of a JSONL log against the step, one line per (phase, metric);
    train losses as lines, eval losses as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for k, v in rec.items():
            if "loss" in k and isinstance(v, (int, float)):
                series.setdefault((rec["phase"], k), []).append((rec["step"], v))
    phases = list(dict.fromkeys(p for p, _ in series))  # in order of first appearance
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(5.5 * max(1, len(phases)), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=False):
        for (p, k), pts in sorted(series.items()):
            if p != phase:
                continue
            xs, ys = zip(*sorted(pts), strict=False)
            style = {"marker": "o", "linestyle": "--"} if k.startswith("eval") else {"linewidth": 1}
            ax.plot(xs, ys, label=k, **style)
        ax.set_title(phase)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------


@dataclass
class LoopSpec:
    """One optimisation phase.

    ``module(**batch)`` returns ``(loss_sum, count)`` and is what ``accelerate`` prepares (its
    trainable parameters are the ones optimised). ``make_batch(indices)`` builds the batch of the
    examples at those dataset indices. ``eval_fn()``, if given, returns ``{name: value}`` and is
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
    seed: int = 0
    eval_fn: Callable[[], dict[str, float]] | None = None
    eval_every: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    log: RunLog | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps to 1, then linear decay to 0 at ``total``."""
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


def _ckpt_path(spec: LoopSpec) -> Path | None:
    return spec.checkpoint_dir / f"{spec.name}.pt" if spec.checkpoint_dir is not None else None


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_loop(spec: LoopSpec, accelerator, *, desc: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``spec.module``'s trainable parameters for ``spec.steps`` optimizer steps.

    AdamW, linear warmup (``warmup_ratio`` of the steps) and linear decay, gradient clipping,
    ``grad_accum`` micro-batches of ``batch_size`` examples per process and step. The data order is a
    function of the seed and the position in the stream of epoch permutations, so a run resumed from a
    checkpoint (parameters, optimizer, scheduler, RNG states, step) continues bitwise like one that was
    never interrupted. Returns ``{"steps", "train_loss" (last), "history", "resumed_from"}``.
    """
    module = spec.module
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{spec.name}: nothing to train")
    decay = [p for p in params if p.dim() >= 2] if spec.weight_decay else []
    ids = {id(p) for p in decay}
    groups = [{"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    if decay:
        groups.append({"params": decay, "weight_decay": spec.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
    warmup = int(round(spec.warmup_ratio * spec.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, spec.steps, warmup))
    model, optimizer = accelerator.prepare(module, optimizer)
    nproc, rank = accelerator.num_processes, accelerator.process_index
    per_step = spec.batch_size * spec.grad_accum * nproc

    start, resumed_from = 0, None
    ckpt = _ckpt_path(spec)
    if resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        inner = accelerator.unwrap_model(model)
        inner.load_state_dict(state["module"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = resumed_from = int(state["step"])
        spec.history[:] = state.get("history", [])

    def trainable_state() -> dict[str, torch.Tensor]:
        inner = accelerator.unwrap_model(model)
        names = {n for n, p in inner.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if k in names}

    def save(step: int) -> None:
        if ckpt is None:
            return
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_checkpoint(
                ckpt,
                {
                    "step": step,
                    "module": trainable_state(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "py_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "history": spec.history,
                },
            )
        accelerator.wait_for_everyone()

    def evaluate(step: int) -> None:
        if spec.eval_fn is None:
            return
        metrics = spec.eval_fn()
        spec.history.append({"step": step, **metrics})
        if spec.log is not None:
            spec.log.write(spec.name, step, **metrics)

    if start == 0 and spec.eval_fn is not None:
        evaluate(0)
    stream = _index_stream(spec.n_items, spec.seed, start * per_step)
    last_loss = float("nan")
    bar = _progress(spec.steps, start, desc or spec.name, accelerator.is_local_main_process)
    model.train(False)  # the frozen base keeps eval-mode semantics (no dropout)
    for step in range(start, spec.steps):
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
        if spec.max_grad_norm:
            accelerator.clip_grad_norm_(params, spec.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = float(total / count.clamp(min=1))
        if spec.log is not None and accelerator.is_main_process:
            spec.log.write(spec.name, step + 1, train_loss=last_loss, lr=lr)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        done = step + 1
        if spec.eval_every and done % spec.eval_every == 0 and done < spec.steps:
            evaluate(done)
        if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < spec.steps:
            save(done)
    bar.close()
    if spec.eval_fn is not None and (not spec.history or spec.history[-1]["step"] != spec.steps):
        evaluate(spec.steps)
    save(spec.steps)
    return {
        "steps": spec.steps,
        "train_loss": last_loss,
        "history": list(spec.history),
        "resumed_from": resumed_from,
    }


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
