"""A strength sweep against one request: ``POST /v1/sweep`` with 8 strengths (8 rows of one batch) vs one
``POST /generate`` of the same length, through a real ``steerserve serve`` over HTTP (target: ≤ 1.3×).

Both are greedy, steered by the example vector (``examples/polite.safetensors``), with ``max_new_tokens``
new tokens; the single request uses strength 1. The two run one after the other in rounds, the order
reversed every other round (A B, B A, ...), and the medians are compared. The run checks that each sweep
row is what ``/generate`` answers for its strength, and reports the tokens generated (a row that meets
the end of its reply early leaves the batch).

It also measures the floor the hardware sets for any sweep: the plain model (no server, no steering, one
thread, the same quantization) decoding one token for 8 rows against 1 row at 32 tokens of context,
interleaved, medians — a sweep of 8 cannot cost less than that ratio of one request.

Usage::

    python bench/bench_sweep.py [--rounds 6] [--tokens 32] [--quantization none]
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def start_server(port: int, vec_dir: str, quantization: str) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "steerserve")
    cmd = [exe, "serve", "--port", str(port), "--vector-dir", vec_dir, "--quantization", quantization]
    cmd += ["--log-level", "warning"]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.Popen(cmd + ["--max-batch-size", "8"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server not ready after 300 s")


def run(url: str, args: argparse.Namespace) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    with (ROOT / "examples" / "polite.safetensors").open("rb") as f:
        client.post("/v1/vectors", data={"name": "polite"}, files={"file": ("polite.safetensors", f)})
    base = {"messages": PROMPT, "max_new_tokens": args.tokens}
    one = {**base, "steering": {"vectors": [{"name": "polite", "strength": 1.0}]}}
    sweep = {**base, "vector": "polite", "strengths": STRENGTHS}

    def timed(path: str, body: dict) -> tuple[float, dict]:
        t0 = time.perf_counter()
        resp = client.post(path, json=body)
        elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        return elapsed, resp.json()

    timed("/v1/sweep", sweep)  # warm-up
    times: dict[str, list[float]] = {"single": [], "sweep": []}
    last: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in ("single", "sweep")[:: -1 if r % 2 else 1]:
            elapsed, last[name] = timed(
                "/generate" if name == "single" else "/v1/sweep", one if name == "single" else sweep
            )
            times[name].append(elapsed)
    for w, row in zip(STRENGTHS, last["sweep"]["results"], strict=True):  # each row is its own request
        solo = client.post(
            "/generate", json={**base, "steering": {"vectors": [{"name": "polite", "strength": w}]}}
        )
        assert solo.json()["text"] == row["text"], (w, row["text"], solo.json()["text"])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": args.rounds,
        "max_new_tokens": args.tokens,
        "quantization": args.quantization,
        "strengths": STRENGTHS,
        "median_s": med,
        "all_s": times,
        "ratio": med["sweep"] / med["single"],
        "single_tokens": last["single"]["usage"]["completion_tokens"],
        "sweep_tokens": [r["usage"]["completion_tokens"] for r in last["sweep"]["results"]],
    }


def batch_step_ratio(quantization: str, rounds: int, steps: int = 16) -> dict:
    """Median decode-step time of the plain model at batch 8 and batch 1 (32 tokens of context), rounds
    interleaved (8 1, 1 8, ...), one thread."""
    import torch

    from basemodel import load_model

    torch.set_num_threads(1)
    model = load_model(quantization=quantization).model

    @torch.no_grad()
    def step_s(batch: int) -> float:
        ids = torch.randint(100, 1000, (batch, 32))  # [B, 32]
        out = model(ids, use_cache=True)
        cache, times = out.past_key_values, []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)  # [B, 1]
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            cache = out.past_key_values
        return statistics.median(times)

    step_s(1)  # warm-up
    times: dict[int, list[float]] = {1: [], 8: []}
    for r in range(rounds):
        for batch in (8, 1)[:: -1 if r % 2 else 1]:
            times[batch].append(step_s(batch))
    med = {b: statistics.median(v) for b, v in times.items()}
    return {"step_s": {str(b): m for b, m in med.items()}, "ratio": med[8] / med[1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quantization", default="none", choices=("auto", "none", "nf4", "int8"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "sweep.json"))
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as vec_dir:
        proc = start_server(port, vec_dir, args.quantization)
        try:
            res = run(f"http://127.0.0.1:{port}", args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    res["model_step_batch8_vs_batch1"] = batch_step_ratio(args.quantization, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"sweep of {len(STRENGTHS)} / one request ({args.tokens} tokens, {args.quantization}): "
        f"{res['median_s']['sweep']:.2f} s / {res['median_s']['single']:.2f} s = {res['ratio']:.2f}x; "
        f"tokens {res['sweep_tokens']} vs {res['single_tokens']}; the plain model's decode step at batch 8 "
        f"/ batch 1: {res['model_step_batch8_vs_batch1']['ratio']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
