"""Decode-step cost of the steering hooks on the default model, side by side in one run.

Configurations, interleaved round by round so that machine noise hits all of them alike:
  none    - no hooks installed
  idle    - hooks installed, no row steered (the fast path)
  steered - a compiled 3-vector profile (RED + two additive vectors) on every layer

Usage:  python bench/bench_hooks.py [--rounds 15] [--steps 32] [--batch 1] [--quantization none]
Prints a table and writes bench/out/hooks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from server.model import load_model
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--out", type=Path, default=Path("bench/out/hooks.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(None, quantization=args.quantization)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 3)] * args.batch)
    cfg = model.config
    profile = compile_profile(
        [(VectorRef(name=f"v{i}"), a) for i, a in enumerate(three_vectors(model.config))],
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
    )
    times: dict[str, list[float]] = {"none": [], "idle": [], "steered": []}
    decode_seconds(model, ids, 4)  # warm-up
    for _ in range(args.rounds):
        times["none"].append(decode_seconds(model, ids, args.steps))
        hooks = install_steering(model)
        times["idle"].append(decode_seconds(model, ids, args.steps))
        slot = hooks.acquire(profile)
        hooks.set_batch([slot] * args.batch, generated=True)
        times["steered"].append(decode_seconds(model, ids, args.steps))
        hooks.remove()
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
