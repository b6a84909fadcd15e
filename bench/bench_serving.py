"""Serving cost on the default model, side by side in one run (interleaved rounds, medians).

1. ``overhead``  engine tokens/s, steered vs unsteered, at batch 1 and 8, for three profiles on every
   layer: one additive vector; three vectors (RED + 2 add); RED + add + LoRA (rank 8 on q/v).
2. ``distinct``  a batch of N rows with N distinct RED + add + LoRA profiles vs N rows sharing one,
   N = 1, 4, 8, 16 (one engine, batch size 16).
3. ``batching``  staggered arrivals with mixed lengths (short 8 / long 64 tokens, one of four profiles
   each): steerserve's continuous batching vs static batching (requests that have arrived are grouped,
   up to 8, and run to the longest with ``model.generate``), throughput and p50 latency of the short.
4. ``peers``     ``model.generate`` on the same model with the same additive vector on every layer, through
   steerserve's hooks, the ``steering-vectors`` library's hooks and ``repeng``'s wrapped blocks, batch 1
   and 8; and 8 requests with 8 different vectors: one steerserve batch vs one batch per vector (what the
   libraries, which hold one vector per model at a time, must do).
5. ``http``      the same 8 greedy requests through a real ``steerserve serve`` process and through an
   in-process engine, interleaved, one client at a time and all 8 at once; the server's resident memory.

Usage:  python bench/bench_serving.py [--rounds 5] [--tokens 32] [--parts overhead distinct ...]
Writes bench/out/serving.json and bench/out/serving.png.
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
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import torch
from bench_hooks import lora, one_vector, three_vectors  # bench/ is on sys.path when a script here runs

from basemodel import load_model
from server.engine import Engine, SamplingParams
from steering_vectors import Artifact, VectorRef, compile_profile, install_steering

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
PARTS = ("overhead", "distinct", "batching", "peers", "http")


# ---- artifacts ------------------------------------------------------------------------------------
def compile_(cfg, arts: list[Artifact]):
    return compile_profile(
        [(VectorRef(name=f"v{i}"), a) for i, a in enumerate(arts)],
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
    )


def profiles(model, seed: int) -> dict[str, object]:
    """The three steered profiles of part 1, built with ``seed``."""
    cfg = model.config
    red, add1, add2 = three_vectors(cfg, seed)
    return {
        "1 add vector": compile_(cfg, [one_vector(cfg, seed)]),
        "3 vectors (RED+2 add)": compile_(cfg, [red, add1, add2]),
        "RED+add+LoRA": compile_(cfg, [red, add1, lora(model, seed)]),
    }


# ---- engine measurements ---------------------------------------------------------------------------
def engine_tps(engine: Engine, prompts: list[list[int]], profs: list, tokens: int) -> float:
    """Aggregate generated tokens/s of all prompts submitted at once (greedy, fixed length)."""
    params = SamplingParams(max_new_tokens=tokens, stop=())
    t0 = time.perf_counter()
    handles = [engine.submit(p, params, prof) for p, prof in zip(prompts, profs, strict=True)]
    n = sum(h.wait().completion_tokens for h in handles)
    return n / (time.perf_counter() - t0)


def _interleave(configs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run every config once per round, the order reversed every other round (A B C, C B A, ...) so that
    a drift of the machine's speed does not favour the configs that come first; the median per config."""
    res: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        for k in list(configs)[:: -1 if r % 2 else 1]:
            res[k].append(configs[k]())
    return {k: statistics.median(v) for k, v in res.items()}


def part_overhead(engine, lm, prompts, args) -> dict:
    profs = profiles(lm.model, 0)
    out = {}
    for batch in (1, 8):
        ps = [prompts[i % len(prompts)] for i in range(batch)]
        configs = {"unsteered": lambda ps=ps: engine_tps(engine, ps, [None] * len(ps), args.tokens)}
        for name, prof in profs.items():
            configs[name] = lambda ps=ps, prof=prof: engine_tps(engine, ps, [prof] * len(ps), args.tokens)
        med = _interleave(configs, args.rounds)
        out[f"batch {batch}"] = {
            "tokens_per_s": med,
            "ratio": {k: v / med["unsteered"] for k, v in med.items() if k != "unsteered"},
        }
    return out


def part_distinct(engine, lm, prompts, args) -> dict:
    profs = [profiles(lm.model, s)["RED+add+LoRA"] for s in range(16)]
    out = {}
    for n in (1, 4, 8, 16):
        ps = [prompts[i % len(prompts)] for i in range(n)]
        med = _interleave(
            {
                "shared": lambda ps=ps: engine_tps(engine, ps, [profs[0]] * len(ps), args.tokens),
                "distinct": lambda ps=ps: engine_tps(engine, ps, profs[: len(ps)], args.tokens),
            },
            args.rounds,
        )
        out[str(n)] = {"tokens_per_s": med, "ratio": med["distinct"] / med["shared"]}
    return out


def _workload(prompts, profs, n: int = 24, gap: float = 0.25) -> list[dict]:
    """``n`` requests arriving every ``gap`` s, alternating short (8) and long (64) outputs."""
    return [
        {
            "arrival": i * gap,
            "prompt": prompts[i % len(prompts)],
            "tokens": 8 if i % 2 == 0 else 64,
            "profile": profs[i % len(profs)],
        }
        for i in range(n)
    ]


def run_continuous(engine: Engine, work: list[dict]) -> dict:
    t0 = time.perf_counter()
    handles = []
    for w in work:
        delay = w["arrival"] - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        handles.append(
            engine.submit(w["prompt"], SamplingParams(max_new_tokens=w["tokens"], stop=()), w["profile"])
        )
    results = [h.wait() for h in handles]
    makespan = time.perf_counter() - t0
    lat = [h.timings["total"] for h in handles]
    return _batching_stats(work, lat, sum(r.completion_tokens for r in results), makespan)


@torch.no_grad()
def run_static(lm, hooks, work: list[dict], max_batch: int = 8) -> dict:
    """Static batching: group what has arrived (up to ``max_batch``), run it to the longest request."""
    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    lat = [0.0] * len(work)
    i, n_tokens = 0, 0
    while i < len(work):
        delay = work[i]["arrival"] - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        now = time.perf_counter() - t0
        group = [j for j in range(i, len(work)) if work[j]["arrival"] <= now][:max_batch]
        i = group[-1] + 1
        width = max(len(work[j]["prompt"]) for j in group)
        ids = torch.tensor([[pad] * (width - len(work[j]["prompt"])) + work[j]["prompt"] for j in group])
        mask = torch.tensor(
            [[0] * (width - len(work[j]["prompt"])) + [1] * len(work[j]["prompt"]) for j in group]
        )
        longest = max(work[j]["tokens"] for j in group)
        slots = [hooks.acquire(work[j]["profile"]) if work[j]["profile"] else 0 for j in group]
        with hooks.batch(slots):
            hf_generate(model, {"input_ids": ids, "attention_mask": mask, "pad_id": pad}, longest)
        for s in slots:
            hooks.release(s)
        done = time.perf_counter() - t0
        for j in group:
            lat[j] = done - work[j]["arrival"]
            n_tokens += work[j]["tokens"]  # a request's own tokens; the rest of its row is wasted
    return _batching_stats(work, lat, n_tokens, time.perf_counter() - t0)


def _batching_stats(work, lat, n_tokens, makespan) -> dict:
    short = [x for x, w in zip(lat, work, strict=True) if w["tokens"] == 8]
    long = [x for x, w in zip(lat, work, strict=True) if w["tokens"] != 8]
    return {
        "tokens_per_s": n_tokens / makespan,
        "p50_short_s": statistics.median(short),
        "p50_long_s": statistics.median(long),
        "makespan_s": makespan,
    }


def part_batching(engine, lm, hooks, prompts, args) -> dict:
    profs = [profiles(lm.model, s)["3 vectors (RED+2 add)"] for s in range(4)]
    work = _workload(prompts, profs)
    res: dict[str, list[dict]] = {"continuous": [], "static": []}
    for _ in range(args.batching_rounds):
        res["continuous"].append(run_continuous(engine, work))
        res["static"].append(run_static(lm, hooks, work))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in res.items()}
    return {
        "requests": len(work),
        "arrival_gap_s": 0.25,
        **med,
        "throughput_ratio": med["continuous"]["tokens_per_s"] / med["static"]["tokens_per_s"],
        "p50_short_ratio": med["static"]["p50_short_s"] / med["continuous"]["p50_short_s"],
    }


# ---- peers ----------------------------------------------------------------------------------------
@torch.no_grad()
def hf_generate(model, batch: dict, tokens: int) -> torch.Tensor:
    """Greedy ``model.generate`` of exactly ``tokens`` new tokens per row."""
    return model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=batch["pad_id"],
    )


def hf_tps(model, batch: dict, tokens: int) -> float:
    t0 = time.perf_counter()
    out = hf_generate(model, batch, tokens)
    return out.shape[0] * tokens / (time.perf_counter() - t0)


def part_peers(lm, hooks, args) -> dict:
    from peers import peer_repeng, peer_steering_vectors

    sv, rp = peer_steering_vectors(), peer_repeng()
    model, tok, cfg = lm.model, lm.tokenizer, lm.model.config
    n = cfg.num_hidden_layers
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def enc(texts):
        b = tok(texts, return_tensors="pt", padding=True)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pad_id": pad_id}

    vecs = [one_vector(cfg, s) for s in range(8)]
    dirs = [{i: v.direction(i) for i in range(n)} for v in vecs]
    slots = [hooks.acquire(compile_(cfg, [v])) for v in vecs]
    peer_sv = [sv.SteeringVector(layer_activations=d, layer_type="decoder_block") for d in dirs]

    def ours(b, slot_list, tokens=args.tokens):
        with hooks.batch(slot_list):
            return hf_tps(model, b, tokens)

    def steering_vectors_lib(b, k=0, run=hf_tps, tokens=args.tokens):
        with peer_sv[k].apply(model, multiplier=1.0):
            return run(model, b, tokens)

    def repeng_lib(b, k=0, run=hf_tps, tokens=args.tokens):
        ctrl = rp.ControlModel(model, list(range(n)))  # wraps every block until unwrap()
        ctrl.set_raw_control(dirs[k])
        try:
            return run(model, b, tokens)
        finally:
            ctrl.unwrap()

    def per_vector(fn, texts):  # one batch of 1 per request: aggregate tok/s over the 8
        t0 = time.perf_counter()
        for k, t in enumerate(texts):
            fn(enc([t]), k)
        return len(texts) * args.tokens / (time.perf_counter() - t0)

    # the three apply the same vector at the same site: the same greedy tokens (and not the plain ones)
    probe = enc([PROMPTS[0]])
    with hooks.batch([slots[0]]):
        ref = hf_generate(model, probe, 16)
    gen = {
        "steering-vectors": steering_vectors_lib(probe, run=hf_generate, tokens=16),
        "repeng": repeng_lib(probe, run=hf_generate, tokens=16),
        "unsteered": hf_generate(model, probe, 16),
    }
    same = {k: bool(torch.equal(v, ref)) for k, v in gen.items()}

    out = {"same_greedy_tokens_as_steerserve": same}
    for batch in (1, 8):
        b = enc(PROMPTS[:batch])
        med = _interleave(
            {
                "unsteered": lambda b=b: hf_tps(model, b, args.tokens),
                "steerserve hooks": lambda b=b: ours(b, [slots[0]] * b["input_ids"].shape[0]),
                "steering-vectors": lambda b=b: steering_vectors_lib(b),
                "repeng": lambda b=b: repeng_lib(b),
            },
            args.peer_rounds,
        )
        out[f"batch {batch}"] = med
    med = _interleave(
        {
            "steerserve, one batch of 8 vectors": lambda: ours(enc(PROMPTS), slots),
            "steering-vectors, 8 batches of 1": lambda: per_vector(steering_vectors_lib, PROMPTS),
            "repeng, 8 batches of 1": lambda: per_vector(repeng_lib, PROMPTS),
        },
        args.peer_rounds,
    )
    out["8 requests, 8 different vectors"] = med
    for s in slots:
        hooks.release(s)
    return out


# ---- HTTP -----------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_http(lm, hooks, args: argparse.Namespace) -> dict:
    """The same 8 greedy requests (end-of-sequence on, like any client's) through a real server over HTTP
    and through an in-process engine on the same model, interleaved: one client after the other
    (concurrency 1) and all at once (concurrency 8). Both must generate the same number of tokens."""
    engine = Engine(lm.model, lm.tokenizer, hooks, max_batch_size=8).start()
    prompts = [lm.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]  # as the server does
    params = SamplingParams(max_new_tokens=args.tokens, stop=())
    port = _port()
    url = f"http://127.0.0.1:{port}"
    exe = str(Path(sys.executable).parent / "steerserve")
    counts: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as vec_dir:
        cmd = [
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
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
                body = {"prompt": PROMPTS[i], "max_new_tokens": args.tokens, "stop": []}
                return httpx.post(url + "/generate", timeout=600, json=body).json()["usage"][
                    "completion_tokens"
                ]

            one(0)
            time.sleep(1.0)
            rss_idle = rss_peak = ps.memory_info().rss

            def http(conc: int) -> float:
                nonlocal rss_peak
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(conc) as pool:
                    futs = [pool.submit(one, i) for i in range(8)]
                    while not all(f.done() for f in futs):
                        rss_peak = max(rss_peak, ps.memory_info().rss)
                        time.sleep(0.05)
                counts[f"http {conc}"] = [f.result() for f in futs]
                return sum(counts[f"http {conc}"]) / (time.perf_counter() - t0)

            def in_process(conc: int) -> float:
                t0 = time.perf_counter()
                n = []
                for i in range(0, 8, conc):
                    handles = [engine.submit(p, params) for p in prompts[i : i + conc]]
                    n += [h.wait().completion_tokens for h in handles]
                counts[f"in-process {conc}"] = n
                return sum(n) / (time.perf_counter() - t0)

            med = _interleave(
                {
                    "in-process, concurrency 1": lambda: in_process(1),
                    "HTTP, concurrency 1": lambda: http(1),
                    "in-process, concurrency 8": lambda: in_process(8),
                    "HTTP, concurrency 8": lambda: http(8),
                },
                args.rounds,
            )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            engine.stop()
    return {
        "tokens_per_s": med,
        "completion_tokens": counts,
        "same_tokens": len({tuple(v) for v in counts.values()}) == 1,
        "http_vs_in_process": {
            c: med[f"HTTP, concurrency {c}"] / med[f"in-process, concurrency {c}"] for c in ("1", "8")
        },
        "rss_idle_mb": rss_idle / 2**20,
        "rss_under_load_peak_mb": rss_peak / 2**20,
    }


# ---- report ---------------------------------------------------------------------------------------
def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("overhead", "distinct", "batching", "peers") if k in res]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, k in zip(axes[0], panels, strict=True):
        r = res[k]
        if k == "overhead":
            names = list(r["batch 1"]["ratio"])
            for j, b in enumerate(("batch 1", "batch 8")):
                ax.bar(
                    [i + 0.4 * j for i in range(len(names))], [r[b]["ratio"][n] for n in names], 0.4, label=b
                )
            ax.set_xticks([i + 0.2 for i in range(len(names))], names, fontsize=7)
            ax.axhline(0.95, color="r", ls="--", lw=1, label="target 0.95")
            ax.set_ylim(
                min(0.8, min(min(r[b]["ratio"].values()) for b in ("batch 1", "batch 8")) - 0.05), 1.1
            )
            ax.set_title("steered / unsteered tokens/s", fontsize=9)
        elif k == "distinct":
            ns = list(r)
            ax.plot([int(n) for n in ns], [r[n]["ratio"] for n in ns], "o-", label="steerserve")
            ax.axhline(0.95, color="r", ls="--", lw=1, label="target 0.95")
            ax.plot([8], [0.65], "x", color="k", label="EasySteer, 8 configs (reported)")
            ax.set_ylim(0.5, max(1.1, max(r[n]["ratio"] for n in ns) + 0.05))
            ax.set_xlabel("rows = distinct profiles")
            ax.set_title("N distinct / N shared profiles, tokens/s", fontsize=9)
        elif k == "batching":
            names = ["continuous", "static"]
            ax.bar([0, 1], [r[n]["tokens_per_s"] for n in names], 0.4, label="tokens/s")
            ax2 = ax.twinx()
            ax2.bar([0.4, 1.4], [r[n]["p50_short_s"] for n in names], 0.4, color="C1", label="p50 short (s)")
            ax.set_xticks([0.2, 1.2], names)
            ax.set_ylabel("tokens/s")
            ax2.set_ylabel("p50 latency of short requests (s)")
            ax.set_title("staggered arrivals, mixed lengths", fontsize=9)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
        else:
            colors = {"unsteered": "C7", "steerserve": "C0", "steering-vectors": "C2", "repeng": "C3"}
            groups = ["batch 1", "batch 8", "8 requests, 8 different vectors"]
            for gi, gname in enumerate(groups):
                for i, (n, v) in enumerate(r[gname].items()):
                    system = n.split(",")[0].replace(" hooks", "")
                    ax.bar(gi * 5 + i, v, color=colors[system], label=system if gi == 0 else None)
            ax.set_xticks([1.5, 6.5, 11], ["batch 1", "batch 8", "8 requests,\n8 different vectors"])
            ax.set_ylabel("tokens/s (model.generate)")
            ax.set_title("peers: same model, same vector", fontsize=9)
            ax.legend(fontsize=7)
        if k in ("overhead", "distinct"):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the overhead and distinct parts")
    ap.add_argument("--batching-rounds", type=int, default=2)
    ap.add_argument("--peer-rounds", type=int, default=3)
    ap.add_argument("--http-rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--out", type=Path, default=Path("bench/out/serving.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    lm = load_model(None, quantization=args.quantization)
    hooks = install_steering(lm.model)
    engine = Engine(lm.model, lm.tokenizer, hooks, max_batch_size=16)
    engine.eos_ids = set()  # fixed-length runs: every configuration generates exactly its token budget
    prompts = [lm.tokenizer.encode(p) for p in PROMPTS]
    res: dict = {
        "model": lm.model_id,
        "quantization": lm.quantization,
        "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    t_all = time.monotonic()
    if {"overhead", "distinct", "batching"} & set(args.parts):
        engine.start()
        engine_tps(engine, prompts, [None] * 8, 4)  # warm-up
        for part, fn in (("overhead", part_overhead), ("distinct", part_distinct)):
            if part in args.parts:
                t0 = time.monotonic()
                res[part] = fn(engine, lm, prompts, args)
                print(f"[{part}] {time.monotonic() - t0:.0f} s: {json.dumps(res[part])}", flush=True)
        if "batching" in args.parts:
            t0 = time.monotonic()
            res["batching"] = part_batching(engine, lm, hooks, prompts, args)
            print(f"[batching] {time.monotonic() - t0:.0f} s: {json.dumps(res['batching'])}", flush=True)
        engine.stop()
    if "peers" in args.parts:
        t0 = time.monotonic()
        res["peers"] = part_peers(lm, hooks, args)
        print(f"[peers] {time.monotonic() - t0:.0f} s: {json.dumps(res['peers'])}", flush=True)
    if "http" in args.parts:
        t0 = time.monotonic()
        res["http"] = part_http(lm, hooks, args)
        print(f"[http] {time.monotonic() - t0:.0f} s: {json.dumps(res['http'])}", flush=True)
    res["wall_s"] = round(time.monotonic() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
