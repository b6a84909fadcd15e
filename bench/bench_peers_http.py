"""steerserve against Hugging Face's own server over HTTP, driven by a client neither side wrote.

Starts ``steerserve serve`` and ``transformers serve --continuous-batching`` (paged attention, chunked
prefill) on the same model (the default SmolLM2-135M-Instruct) in the same dtype (float32, one thread per
server process), and drives each with ``guidellm`` (installed by ``make bench-deps`` into
``.venv-guidellm``: its pins clash with the project's) at each concurrency, rounds interleaved
(A B, B A, ...): synthetic prompts of ``--prompt-tokens``, greedy, at most ``--output-tokens`` new tokens,
``--requests`` per concurrency level and run. Then steerserve with a saved 3-vector profile (RED + add +
LoRA rank 8 on every layer, named as the OpenAI ``model``) at the profile concurrency, against the peer.

Reports per run: output tokens/s (output tokens over wall time), TTFT and inter-token latency p50/p99
(guidellm's own figures), and the
median of each over the rounds with the ratio steerserve / transformers.

Usage:  python bench/bench_peers_http.py [--rounds 2] [--concurrency 1 8 16] [--profile-concurrency 8]
Writes bench/out/peers_http.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_hooks import lora, three_vectors  # bench/ is on sys.path when a script here runs

from basemodel import prepare_default_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "peers_http.json"
GUIDELLM = ROOT / ".venv-guidellm" / "bin" / "guidellm"
PROFILE = "bench-red-add-lora"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _wait(url: str, proc: subprocess.Popen[bytes], path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url}{path} answered")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url}{path} did not answer in {timeout} s")


def start_steerserve(model: Path, vector_dir: Path, log: io.BufferedWriter) -> tuple[str, subprocess.Popen]:
    port = _port()
    exe = str(Path(sys.executable).with_name("steerserve"))
    cmd = [exe, "serve", "--model", str(model), "--quantization", "none", "--dtype", "float32"]
    cmd += ["--port", str(port), "--vector-dir", str(vector_dir), "--max-batch-size", "16"]
    cmd += ["--max-queue", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, "/ready")
    return url, proc


def start_transformers(model: Path, log: io.BufferedWriter) -> tuple[str, subprocess.Popen]:
    port = _port()
    exe = str(Path(sys.executable).with_name("transformers"))
    cmd = [exe, "serve", str(model), "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, "/v1/models")
    return url, proc


def save_profile(url: str) -> None:
    """Upload RED + add + LoRA (rank 8, every layer) and save them as one profile."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = prepare_default_model(quiet=True)
    cfg = AutoConfig.from_pretrained(model_dir)
    red, add, _ = three_vectors(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    arts = {"bench-red": red, "bench-add": add, "bench-lora": lora(model)}
    for name, art in arts.items():
        files = {"file": (f"{name}.safetensors", art.to_bytes(), "application/octet-stream")}
        r = httpx.post(url + "/v1/vectors", data={"name": name}, files=files, timeout=120)
        r.raise_for_status()
    body = {"vectors": [{"name": n} for n in arts]}
    httpx.put(f"{url}/v1/profiles/{PROFILE}", json=body, timeout=60).raise_for_status()


def warm_up(targets: list[tuple[str, str]]) -> None:
    """A few chat requests to each (url, model) before anything is timed: transformers serve's first
    request compiles and caches (tens of seconds), and each side's first pass allocates its buffers."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    for url, model_id in targets:
        for _ in range(2):
            r = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": model_id}, timeout=600)
            r.raise_for_status()


def run_guidellm(
    url: str, model_id: str, tokenizer: Path, streams: int, args: argparse.Namespace, steered: bool = False
) -> dict:
    """One guidellm run; its output tokens/s, TTFT and ITL (ms) p50/p99. ``steered``: the steerserve
    profile run, which also sends ``ignore_eos`` (steered greedy text differs from the plain model's and
    may end before ``max_tokens``, where the peer's never does here: both then do the same work)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [str(GUIDELLM), "run"]
        # max_tokens on the backend, not output_tokens in the data: with the latter guidellm sends vLLM's
        # ignore_eos, which transformers serve refuses (422); temperature 0: greedy on both sides (OpenAI's
        # default of 1 samples, and each server would stop at a different end of text); both servers get
        # the same bodies, but for the profile runs' ignore_eos (see the docstring)
        backend = {"kind": "openai_http", "target": url, "model": model_id, "max_tokens": args.output_tokens}
        backend["extras"] = {"body": {"temperature": 0, **({"ignore_eos": True} if steered else {})}}
        cmd += ["--backend", json.dumps(backend)]
        cmd += ["--profile", f"kind=concurrent,streams={streams}"]
        data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens}"
        cmd += ["--data", data, "--tokenizer", f"kind=huggingface_auto,model={tokenizer}"]
        cmd += ["--constraint", f"kind=max_requests,count={max(args.requests, 2 * streams)}"]
        cmd += ["--output", f"kind=json,path={out}", "--disable-progress"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            raise RuntimeError(f"guidellm failed ({proc.returncode}):\n{tail}")
        return {**parse_report(json.loads(out.read_text())), "wall_s": round(time.monotonic() - t0, 1)}


def _stat(metrics: dict, name: str, which: str) -> float | None:
    """``which`` (median or a percentile such as p99) of guidellm's successful-request distribution."""
    dist = (metrics.get(name) or {}).get("successful") or {}
    return dist.get("median") if which == "median" else (dist.get("percentiles") or {}).get(which)


def parse_report(report: dict) -> dict:
    """Output tokens/s (all successful requests' output tokens over the wall time from the first request
    sent to the last answer), TTFT and ITL p50/p99 in ms, from guidellm's JSON report."""
    bench = report["benchmarks"][0]
    metrics, sched = bench["metrics"], bench["scheduler_metrics"]
    tokens = metrics["output_token_count"]["successful"]["total_sum"]
    wall = sched["request_end_time"] - sched["request_start_time"]
    return {
        "output_tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
        "output_tokens": tokens,
        "ttft_ms_p50": _stat(metrics, "time_to_first_token_ms", "median"),
        "ttft_ms_p99": _stat(metrics, "time_to_first_token_ms", "p99"),
        "itl_ms_p50": _stat(metrics, "inter_token_latency_ms", "median"),
        "itl_ms_p99": _stat(metrics, "inter_token_latency_ms", "p99"),
        "requests": metrics["request_totals"],
    }


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(runs: dict[str, dict[str, list[dict]]]) -> dict:
    out = {}
    for level, sides in runs.items():
        keys = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")
        med = {side: {k: _median(rs, k) for k in keys} for side, rs in sides.items()}
        ours = med.get("steerserve", {}).get("output_tokens_per_s")
        theirs = med.get("transformers", {}).get("output_tokens_per_s")
        ratio = round(ours / theirs, 3) if ours and theirs else None
        out[level] = {**med, "throughput_ratio": ratio}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--profile-concurrency", type=int, default=8, help="0: skip the profile runs")
    p.add_argument("--requests", type=int, default=16, help="requests per run (at least 2 x concurrency)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    args = p.parse_args()
    if not GUIDELLM.exists():
        sys.exit(f"{GUIDELLM} is missing: run `make bench-deps`")
    model = prepare_default_model(quiet=True)
    levels = [(f"c{c}", c, False) for c in args.concurrency]
    if args.profile_concurrency:
        levels.append((f"profile_c{args.profile_concurrency}", args.profile_concurrency, True))
    runs: dict[str, dict[str, list[dict]]] = {n: {"steerserve": [], "transformers": []} for n, _, _ in levels}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    vector_dir = Path(tempfile.mkdtemp(prefix="peers-http-"))
    with (OUT.parent / "peers_http.log").open("ab") as log:
        ours, ours_proc = start_steerserve(model, vector_dir, log)
        theirs, theirs_proc = start_transformers(model, log)
        try:
            if args.profile_concurrency:
                save_profile(ours)
            ours_id = httpx.get(ours + "/v1/models").json()["data"][0]["id"]
            warm_up(
                [(ours, ours_id), (theirs, str(model))]
                + ([(ours, PROFILE)] if args.profile_concurrency else [])
            )
            for rnd in range(args.rounds):
                for name, streams, profile in levels:
                    order = ["steerserve", "transformers"]
                    if (rnd + levels.index((name, streams, profile))) % 2:
                        order.reverse()
                    for side in order:
                        mine = side == "steerserve"
                        url, mid = (ours, PROFILE if profile else ours_id) if mine else (theirs, str(model))
                        res = run_guidellm(url, mid, model, streams, args, steered=mine and profile)
                        res["load_avg_1m"] = round(os.getloadavg()[0], 2)
                        runs[name][side].append(res)
                        print(json.dumps({"round": rnd, "level": name, "side": side, **res}), flush=True)
        finally:
            for proc in (ours_proc, theirs_proc):
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutil.rmtree(vector_dir, ignore_errors=True)
    result = {"args": vars(args), "summary": summarise(runs), "runs": runs, "cpus": os.cpu_count()}
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
