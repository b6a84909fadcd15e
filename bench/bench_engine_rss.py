"""16 concurrent requests through a real ``steerserve serve``, each with its own saved profile of the
largest allowed LoRA rank (two rank-64 LoRAs on q_proj/v_proj of every layer = 128 stacked, the default
``--max-lora-rank`` / ``--max-profile-rank``): the server's peak RSS against the budget the README states,
and ``GET /health`` polled every 20 ms on its own connection throughout (its slowest answer against
100 ms). Run by bench_engine.py (``--parts lora_rss``); prints one JSON line.

Budget (MiB), from the README's formulas with this run's shapes:
    RSS of the server ready (model, KV cache, hooks)
  + the uploaded artifacts (the store's cache holds them as float32 tensors)
  + the compiled profiles (one per distinct profile in flight; float32)
  + the steering tables' bound (``tables_budget_bytes`` at the server's slot count and rank)
  + the decode rows' gathered LoRA tables (``rows x R x sum(d_in + d_out) x 4`` bytes)
  + 256 MiB for activations, HTTP buffers and the allocator's slack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from bench_hooks import lora  # bench/ is on sys.path when a script here runs
from bench_peers_http import _env, _port, _wait
from transformers import AutoModelForCausalLM

from basemodel import prepare_default_model
from server.state import steering_slots
from steering_vectors import tables_budget_bytes

MIB = 1024 * 1024
RANK = 64  # --max-lora-rank's default; two of them are --max-profile-rank's 128


def _serve(model: Path, vector_dir: Path, rows: int, log) -> tuple[str, subprocess.Popen]:
    port = _port()
    exe = str(Path(sys.executable).with_name("steerserve"))
    cmd = [exe, "serve", "--model", str(model), "--quantization", "none", "--dtype", "float32"]
    cmd += ["--port", str(port), "--vector-dir", str(vector_dir), "--max-batch-size", str(rows)]
    cmd += ["--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, "/ready")
    return url, proc


def _poll_health(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get(url + "/health").raise_for_status()
            out.append(time.perf_counter() - t0)
            time.sleep(0.02)


def _sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)


def _upload(url: str, arts: list, n: int) -> None:
    """Upload the 2n LoRAs and save n profiles of two each (``p{i}``: ``l{2i}`` + ``l{2i+1}``)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        for i, art in enumerate(arts):
            files = {"file": (f"l{i}.safetensors", art.to_bytes(), "application/octet-stream")}
            client.post("/v1/vectors", data={"name": f"l{i}"}, files=files).raise_for_status()
        for i in range(n):
            body = {"vectors": [{"name": f"l{2 * i}"}, {"name": f"l{2 * i + 1}"}]}
            client.put(f"/v1/profiles/p{i}", json=body).raise_for_status()


def _run(url: str, pid: int, n: int, tokens: int) -> tuple[list[dict], float, list[float], int]:
    """n concurrent steered /generate requests while /health is polled and the server's RSS sampled:
    (responses, seconds, /health latencies, peak RSS in bytes)."""
    stop, health, peak = threading.Event(), [], [psutil.Process(pid).memory_info().rss]
    watchers = [
        threading.Thread(target=_poll_health, args=(url, stop, health), daemon=True),
        threading.Thread(target=_sample_rss, args=(pid, stop, peak), daemon=True),
    ]
    for w in watchers:
        w.start()
    time.sleep(0.5)  # /health's latency while idle, too

    def one(i: int) -> dict:
        prompt = "Write a short note about the ocean and the tides."
        body = {"prompt": prompt, "steering": f"p{i}", "max_new_tokens": tokens, "ignore_eos": True}
        r = httpx.post(url + "/generate", json=body, timeout=900)
        r.raise_for_status()
        return r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    for w in watchers:
        w.join(30)
    return results, elapsed, health, peak[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    args = p.parse_args()
    n = args.requests
    model_dir = prepare_default_model(quiet=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    arts = [lora(model, seed=s, rank=RANK) for s in range(2 * n)]
    sites = {
        (i, name): (m.in_features, m.out_features)
        for i, block in enumerate(model.model.layers)
        for name, m in (("q_proj", block.self_attn.q_proj), ("v_proj", block.self_attn.v_proj))
    }
    del model
    art_bytes = sum(t.numel() * 4 for a in arts for t in a.tensors.values())
    with tempfile.TemporaryDirectory() as vdir, open(Path(vdir) / "server.log", "wb") as log:
        url, proc = _serve(model_dir, Path(vdir) / "vectors", n, log)
        try:
            rss_ready = psutil.Process(proc.pid).memory_info().rss
            _upload(url, arts, n)
            rss_loaded = psutil.Process(proc.pid).memory_info().rss
            results, elapsed, health, peak = _run(url, proc.pid, n, args.tokens)
            ready = httpx.get(url + "/ready", timeout=30).json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    slots = steering_slots(n)  # the server's hook slots for --max-batch-size n
    tables = tables_budget_bytes(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        max_slots=slots,
        max_rank=2 * RANK,
        lora_sites=sites,
        element_size=4,
    )
    gathered = 4 * n * 2 * RANK * sum(d_in + d_out for d_in, d_out in sites.values())
    budget = rss_ready + 2 * art_bytes + tables + gathered + 256 * MIB  # compiled profiles = artifacts' size
    out = {
        "requests": n,
        "finished": sum(r.get("finish_reason") == "length" for r in results),
        "seconds": round(elapsed, 1),
        "rss_ready_mib": round(rss_ready / MIB),
        "rss_after_uploads_mib": round(rss_loaded / MIB),
        "rss_peak_mib": round(peak / MIB),
        "budget_mib": round(budget / MIB),
        "within_budget": peak <= budget,
        "artifacts_mib": round(art_bytes / MIB),
        "tables_bound_mib": round(tables / MIB),
        "gathered_mib": round(gathered / MIB),
        "health_polls": len(health),
        "health_ms_median": round(1e3 * statistics.median(health), 1),
        "health_ms_max": round(1e3 * max(health), 1),
        "health_within_100ms": max(health) <= 0.1,
        "ready_after": ready.get("status"),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
