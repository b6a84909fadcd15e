"""Peak RSS of 16 concurrent requests, each with its own profile of the largest allowed LoRA rank
(two rank-64 LoRAs on q_proj/v_proj of every layer = 128 stacked), against the budget formula.
Run by bench_engine.py in a fresh process; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import psutil
import torch
from bench_hooks import lora  # bench/ is on sys.path when a script here runs

from basemodel import load_model
from server.engine import Engine, SamplingParams
from steering_vectors import VectorRef, compile_profile, install_steering, tables_budget_bytes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    proc = psutil.Process()
    lm = load_model(quantization="none", dtype="float32")
    model, cfg = lm.model, lm.model.config
    rss_model = proc.memory_info().rss
    hooks = install_steering(model, max_slots=args.requests + 1, max_profile_rank=128)
    engine = Engine(model, lm.tokenizer, hooks, max_batch_size=args.requests)
    rss_engine = proc.memory_info().rss
    arts = [lora(model, seed=s, rank=64) for s in range(2 * args.requests)]
    profiles = [
        compile_profile(
            [(VectorRef(f"a{i}"), arts[2 * i]), (VectorRef(f"b{i}"), arts[2 * i + 1])],
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
        )
        for i in range(args.requests)
    ]
    rss_profiles = proc.memory_info().rss
    peak = [rss_profiles]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    engine.start()
    prompt = lm.tokenizer.encode("Write a short note about the ocean and the tides.")
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    t0 = time.monotonic()
    handles = [engine.submit(prompt, params, prof) for prof in profiles]
    results = [h.wait(600) for h in handles]
    elapsed = time.monotonic() - t0
    done.set()
    sampler.join()
    engine.stop()
    sites = {key: hooks.layout.linear_shapes()[key] for key in hooks.tables.lora}
    tables_max = tables_budget_bytes(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        max_slots=hooks.max_slots,
        max_rank=hooks.max_rank,
        lora_sites=sites,
        element_size=4,
    )
    mib = 1024 * 1024
    out = {
        "requests": args.requests,
        "finished": sum(r.finish_reason == "length" for r in results),
        "seconds": round(elapsed, 1),
        "rss_model_mib": round(rss_model / mib),
        "rss_engine_ready_mib": round(rss_engine / mib),
        "rss_with_profiles_mib": round(rss_profiles / mib),
        "rss_peak_mib": round(peak[0] / mib),
        "kv_cache_mib": round(_nbytes([engine.cache.k, engine.cache.v]) / mib),
        "tables_mib": round(hooks.tables.nbytes() / mib),
        "tables_budget_mib": round(tables_max / mib),
        "compiled_profiles_mib": round(
            _nbytes(t for prof in profiles for v in prof.lora.values() for t in v) / mib
        ),
        "artifacts_mib": round(_nbytes(t for a in arts for t in a.tensors.values()) / mib),
        "slots_in_use_after": hooks.slots_in_use,
    }
    out["peak_over_ready_mib"] = out["rss_peak_mib"] - out["rss_engine_ready_mib"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
