"""Serving throughput of the engine and the HTTP server on the default model, side by side in one run.

Part A (in-process engine, interleaved rounds, medians):
  - tokens/s of 8 concurrent requests, unsteered vs a 3-vector profile (RED + 2 add) on every layer;
  - 8 rows with 8 distinct profiles vs 8 rows sharing one profile.
Part B (a real `steerserve serve` process over HTTP):
  - aggregate tokens/s at concurrency 8 vs 1;
  - the server's resident memory idle and under load.

Usage:  python bench/bench_serving.py [--rounds 5] [--tokens 64] [--quantization auto]
Writes bench/out/serving.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch
from bench_hooks import three_vectors  # bench/ is on sys.path when a script here runs

from server.engine import Engine, SamplingParams
from server.model import load_model
from steering_vectors import VectorRef, compile_profile, install_steering

PROMPTS = [
    "Write a short note about the ocean.",
    "Explain how a bicycle works.",
    "Give me a recipe idea for dinner.",
    "What should I pack for a hiking trip?",
    "Describe a calm morning routine.",
    "How do plants grow?",
    "Suggest a name for a small bakery.",
    "Tell me about the history of clocks.",
]


def profile(cfg, seed: int):
    return compile_profile(
        [(VectorRef(name=f"v{i}"), a) for i, a in enumerate(three_vectors(cfg, seed))],
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
    )


def engine_tps(engine: Engine, prompts: list[list[int]], profiles: list, tokens: int) -> float:
    """Aggregate generated tokens/s of all prompts submitted at once (greedy, fixed length)."""
    params = SamplingParams(max_new_tokens=tokens, stop=())
    t0 = time.perf_counter()
    handles = [engine.submit(p, params, prof) for p, prof in zip(prompts, profiles, strict=True)]
    n = sum(h.wait().completion_tokens for h in handles)
    return n / (time.perf_counter() - t0)


def part_a(args: argparse.Namespace) -> dict:
    loaded = load_model(None, quantization=args.quantization)
    cfg, tok = loaded.model.config, loaded.tokenizer
    hooks = install_steering(loaded.model)
    engine = Engine(loaded.model, tok, hooks, max_batch_size=8)
    engine.eos_ids = set()  # fixed-length runs: every configuration generates exactly `tokens` per row
    engine.start()
    prompts = [tok.encode(p) for p in PROMPTS]
    shared = profile(cfg, 0)
    distinct = [profile(cfg, s) for s in range(8)]
    configs = {"unsteered": [None] * 8, "3-vector, shared": [shared] * 8, "8 distinct profiles": distinct}
    tps: dict[str, list[float]] = {k: [] for k in configs}
    engine_tps(engine, prompts, configs["unsteered"], 8)  # warm-up
    for _ in range(args.rounds):
        for name, profs in configs.items():
            tps[name].append(engine_tps(engine, prompts, profs, args.tokens))
    engine.stop()
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "quantization": loaded.quantization,
        "dtype": str(loaded.dtype),
        "tokens_per_s": med,
        "steered_vs_unsteered": med["3-vector, shared"] / med["unsteered"],
        "distinct_vs_shared": med["8 distinct profiles"] / med["3-vector, shared"],
    }


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_b(args: argparse.Namespace) -> dict:
    port = _port()
    url = f"http://127.0.0.1:{port}"
    exe = str(Path(sys.executable).parent / "steerserve")
    with tempfile.TemporaryDirectory() as vec_dir:
        proc = subprocess.Popen(
            [
                exe,
                "serve",
                "--port",
                str(port),
                "--vector-dir",
                vec_dir,
                "--quantization",
                args.quantization,
                "--max-batch-size",
                "8",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            ps = psutil.Process(proc.pid)

            def one(i: int) -> int:
                r = httpx.post(
                    url + "/generate",
                    timeout=600,
                    json={"prompt": PROMPTS[i % 8], "max_new_tokens": args.tokens},
                )
                return r.json()["usage"]["completion_tokens"]

            one(0)
            time.sleep(1.0)
            rss_idle = ps.memory_info().rss
            results: dict[str, list[float]] = {"1": [], "8": []}
            rss_peak = rss_idle
            for _ in range(args.rounds):
                for conc in (1, 8):
                    t0 = time.perf_counter()
                    with cf.ThreadPoolExecutor(conc) as pool:
                        futs = [pool.submit(one, i) for i in range(conc * 2)]
                        while not all(f.done() for f in futs):
                            rss_peak = max(rss_peak, ps.memory_info().rss)
                            time.sleep(0.05)
                        n = sum(f.result() for f in futs)
                    results[str(conc)].append(n / (time.perf_counter() - t0))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "http_tokens_per_s": med,
        "concurrency8_vs_1": med["8"] / med["1"],
        "rss_idle_mb": rss_idle / 2**20,
        "rss_under_load_peak_mb": rss_peak / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench/out/serving.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    a = part_a(args)
    print(
        f"engine ({a['quantization']}, {a['dtype']}), 8 rows x {args.tokens} tokens, median of {args.rounds}:"
    )
    for k, v in a["tokens_per_s"].items():
        print(f"  {k:22} {v:8.1f} tok/s")
    print(f"  steered / unsteered          {a['steered_vs_unsteered']:.3f}   (target >= 0.95)")
    print(f"  8 distinct / 1 shared        {a['distinct_vs_shared']:.3f}   (target >= 0.95)")
    b = part_b(args)
    print("HTTP server:")
    print(
        f"  concurrency 1: {b['http_tokens_per_s']['1']:.1f} tok/s, concurrency 8: "
        f"{b['http_tokens_per_s']['8']:.1f} tok/s, ratio {b['concurrency8_vs_1']:.2f}x (target >= 3x)"
    )
    print(f"  RSS idle {b['rss_idle_mb']:.0f} MB, under load (peak) {b['rss_under_load_peak_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "engine": a, "http": b}, indent=2)
    )


if __name__ == "__main__":
    main()
