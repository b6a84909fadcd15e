"""Decode-step cost of the steering hooks on the default model, side by side in one run.

Configurations, interleaved round by round so that machine noise hits all of them alike:
  none    - no hooks installed
  idle    - hooks installed, no row steered (the fast path)
  steered - a compiled 3-vector profile (RED + two additive vectors) on every layer
  mix     - RED + an additive vector + a rank-8 LoRA on q_proj/v_proj, on every layer

Usage:  python bench/bench_hooks.py [--rounds 15] [--steps 32] [--batch 1] [--quantization none] [--profile]
Prints a table and writes bench/out/hooks.json; ``--profile`` also prints where a decode step's time goes
(torch.profiler, top operators by self CPU time) without hooks and with the ``mix`` profile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from basemodel import load_model
from steering_vectors import Artifact, VectorRef, compile_profile, install_steering


def three_vectors(cfg, seed: int = 0) -> list[Artifact]:
    """RED + two additive vectors on every layer of a model with config ``cfg`` (small random edits)."""
    d, n, mt = cfg.hidden_size, cfg.num_hidden_layers, cfg.model_type
    g = torch.Generator().manual_seed(seed)
    red = Artifact(
        kind="red",
        model_type=mt,
        hidden_size=d,
        num_layers=n,
        method="red",
        tensors={
            **{f"layers.{i}.scale": 1 + 0.01 * torch.randn(d, generator=g) for i in range(n)},
            **{f"layers.{i}.bias": 0.01 * torch.randn(d, generator=g) for i in range(n)},
        },
    )
    adds = [
        Artifact(
            kind="add",
            model_type=mt,
            hidden_size=d,
            num_layers=n,
            method="mean-diff",
            tensors={f"layers.{i}.direction": 0.05 * torch.randn(d, generator=g) for i in range(n)},
        )
        for _ in range(2)
    ]
    return [red, *adds]


def one_vector(cfg, seed: int = 0) -> Artifact:
    """One additive vector on every layer (norm ~1.2, a mild edit)."""
    g = torch.Generator().manual_seed(1000 + seed)
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    return Artifact(
        kind="add",
        model_type=cfg.model_type,
        hidden_size=d,
        num_layers=n,
        method="mean-diff",
        tensors={f"layers.{i}.direction": 0.05 * torch.randn(d, generator=g) for i in range(n)},
    )


def lora(model, seed: int = 0, rank: int = 8) -> Artifact:
    """A random rank-8 LoRA on ``q_proj`` and ``v_proj`` of every layer."""
    cfg, g = model.config, torch.Generator().manual_seed(2000 + seed)
    tensors = {}
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "v_proj"):
            lin = getattr(block.self_attn, name)
            tensors[f"layers.{i}.{name}.lora_A"] = 0.02 * torch.randn(rank, lin.in_features, generator=g)
            tensors[f"layers.{i}.{name}.lora_B"] = 0.02 * torch.randn(lin.out_features, rank, generator=g)
    return Artifact(
        kind="lora",
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        method="rahf-scit",
        lora_alpha=16.0,
        tensors=tensors,
    )


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per decode step after a prefill of ``ids`` [B, T]."""
    cache = DynamicCache()
    B, T = ids.shape
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.full((B, 1), T + i, dtype=torch.long)
        out = model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps


def profile_steps(model, ids: torch.Tensor, steps: int, profile, batch: int) -> None:
    """Print the top operators (self CPU time) of ``steps`` decode steps, without hooks and with ``profile``.

    (LoRA per row costs two small batched matmuls per adapted linear and step: ``aten::bmm`` here.)
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for label in ("no hooks", "mix profile"):
        hooks = None
        if label != "no hooks":
            hooks = install_steering(model)
            hooks.set_batch([hooks.acquire(profile)] * batch, generated=True)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_seconds(model, ids, steps)
        if hooks is not None:
            hooks.remove()
        print(f"--- {label}: {steps} decode steps, top operators by self CPU time")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=28)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--profile", action="store_true", help="print where a decode step's time goes")
    ap.add_argument("--out", type=Path, default=Path("bench/out/hooks.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(None, quantization=args.quantization)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 3)] * args.batch)
    cfg = model.config
    red, add1, add2 = three_vectors(cfg)
    profiles = {
        name: compile_profile(
            [(VectorRef(name=f"v{i}"), a) for i, a in enumerate(arts)],
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
        )
        for name, arts in (("steered", [red, add1, add2]), ("mix", [red, add1, lora(model)]))
    }
    times: dict[str, list[float]] = {"none": [], "idle": [], "steered": [], "mix": []}
    decode_seconds(model, ids, 4)  # warm-up
    for r in range(args.rounds):  # none, idle, steered, mix - and the reverse every other round
        order = list(times)[:: -1 if r % 2 else 1]
        hooks = None
        for name in order:
            if name == "none":
                if hooks is not None:
                    hooks.remove()
                    hooks = None
            elif hooks is None:
                hooks = install_steering(model)
            if name in profiles:
                hooks.set_batch([hooks.acquire(profiles[name])] * args.batch, generated=True)
            elif hooks is not None:
                hooks.clear_batch()
            times[name].append(decode_seconds(model, ids, args.steps))
        if hooks is not None:
            hooks.remove()
    if args.profile:
        profile_steps(model, ids, args.steps, profiles["mix"], args.batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": loaded.model_id,
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype),
        "batch": args.batch,
        "rounds": args.rounds,
        "steps": args.steps,
        "median_step_ms": {k: 1000 * v for k, v in med.items()},
        "idle_overhead": med["idle"] / med["none"] - 1,
        "steered_overhead": med["steered"] / med["none"] - 1,
        "mix_overhead": med["mix"] / med["none"] - 1,
    }
    print(
        f"model {loaded.model_id} ({loaded.quantization}, {loaded.dtype}), batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} decode steps, medians"
    )
    for k in times:
        print(f"  {k:8} {1000 * med[k]:8.3f} ms/step   ratio to none {med[k] / med['none']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
