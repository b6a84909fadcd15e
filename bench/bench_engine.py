"""The engine at its limits, in-process on the default model (float32, one thread, interleaved rounds).

1. ``context``      decode step time at batch 8 vs context length 64..2048: this engine (paged KV cache)
                    vs the engine before it (``git show main~N:server/engine.py``, a DynamicCache grown by
                    concatenation every step). The rows' caches are filled with random keys/values instead
                    of prefilled (a step's cost depends on shapes only); ``step()`` / ``_decode_step()``
                    are timed whole.
2. ``interference`` 7 streams decode; a 2,000-token prompt arrives, and right behind it a short request:
                    the streams' p99 inter-token latency while the long prompt is prefilled vs their median,
                    and the short request's time to first token; both engines.
3. ``throughput``   greedy tokens/s at batch 1, 8, 16 (64-token prompts, 64 new tokens): this engine, the
                    old one, and transformers' ContinuousBatchingManager (paged cache, in-process).
5. ``hf_context``   (not in ``make bench``: slow) the decode step time of transformers'
                    ContinuousBatchingManager at batch 8 vs context 64..2048, real prefills, timed by
                    forward hooks on its own thread.
4. ``lora_rss``     16 concurrent requests, each with its own profile of the largest allowed LoRA rank
                    (two rank-64 LoRAs on q_proj/v_proj of every layer: 128 stacked), through a real
                    ``steerserve serve`` (``bench_engine_rss.py``): the server's peak RSS against the
                    budget formula, and /health's slowest answer throughout against 100 ms.

Usage: python bench/bench_engine.py [--parts context ...] [--rounds 3] [--old-ref main]
Writes bench/out/engine.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from basemodel import load_model
from server.engine import Engine, SamplingParams
from server.engine.sequence import Group, Sequence

HERE = Path(__file__).resolve().parent
KV_TOKENS = 8 * (2048 + 64)  # eight rows of 2,048 tokens of context and the steps timed
PARTS = ("context", "interference", "throughput", "lora_rss", "hf_context")
TEXT = (
    "The history of clocks spans thousands of years, from sundials and water clocks to pendulums, "
    "quartz oscillators and atomic standards that keep the world's time. "
)


def old_engine_module(ref: str):
    """The engine as it was at ``ref`` (a single module), imported from a temporary copy."""
    src = subprocess.run(
        ["git", "show", f"{ref}:server/engine.py"], capture_output=True, text=True, check=True
    )
    path = Path(tempfile.mkdtemp()) / "engine_before.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("engine_before", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr] - dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def prompt_of(tok, n: int, salt: int = 0) -> list[int]:
    ids = tok.encode(f"({salt}) " + TEXT * (n // 20 + 2))
    return ids[:n]


# ---- 1. decode step vs context ---------------------------------------------------------------------
def new_step_time(engine: Engine, tok_id: int, batch: int, context: int, steps: int) -> float:
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True).resolved()
    groups = []
    for _ in range(batch):
        g = Group(_NullHandle(), [tok_id] * context, params, None, 0.0, pages_per_seq=0)
        seq = Sequence(g, 0, detok=_NullDetok(), generator=None)
        g.seqs.append(seq)
        engine.scheduler.start(g)
        seq.pages = engine.cache.allocate(engine.cache.pages_for(context + steps + 2))
        seq.cached, seq.out = context, [tok_id]
        groups.append(g)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    for g in groups:
        engine.scheduler.remove(g.seqs[0])
    return statistics.median(times[1:])


class _NullDetok:
    def add(self, _tok, check_stop=True):
        return "", False


class _NullHandle:
    id, cancelled, timings = "bench", False, {}

    def _push(self, _ev):
        pass


def old_step_time(mod, engine, cfg, tok_id: int, batch: int, context: int, steps: int) -> float:
    from transformers import DynamicCache

    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(batch, H, context, D), torch.randn(batch, H, context, D), layer)
    params = mod.SamplingParams(max_new_tokens=steps + 8)
    engine._rows = [
        mod._Seq(_NullHandle(), [tok_id] * context, params, None, 0.0, None, out=[tok_id], pos=context)
        for _ in range(batch)
    ]
    engine._cache, engine._mask = cache, torch.ones(batch, context, dtype=torch.long)
    engine.eos_ids = set()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine._decode_step()
        times.append(time.perf_counter() - t)
    engine._rows, engine._cache, engine._mask = [], None, None
    return statistics.median(times[1:])


def part_context(new: Engine, old, mod, cfg, args) -> dict:
    out: dict = {"batch": 8, "new_ms": {}, "old_ms": {}}
    for ctx in (64, 256, 512, 1024, 2048):
        a, b = [], []
        for r in range(args.rounds):
            order = [("new", a), ("old", b)] if r % 2 == 0 else [("old", b), ("new", a)]
            for name, acc in order:
                if name == "new":
                    acc.append(new_step_time(new, 1000, 8, ctx, args.steps))
                else:
                    acc.append(old_step_time(mod, old, cfg, 1000, 8, ctx, args.steps))
        out["new_ms"][ctx], out["old_ms"][ctx] = 1e3 * statistics.median(a), 1e3 * statistics.median(b)
        print(
            f"context {ctx:5d}: new {out['new_ms'][ctx]:7.1f} ms  old {out['old_ms'][ctx]:7.1f} ms",
            flush=True,
        )
    for k in ("new_ms", "old_ms"):
        out[k.replace("_ms", "_ratio_2048_vs_64")] = out[k][2048] / out[k][64]
    return out


# ---- 2. a long prompt arriving beside running streams ------------------------------------------------
def _timestamps(handle, sink: list[float]) -> None:
    while True:
        ev = handle._tq.get()
        sink.append(time.monotonic())
        if ev.finish_reason is not None:
            return


def interference(engine, params_cls, tok, long_tokens: int = 2000) -> dict:
    stream_params = params_cls(max_new_tokens=1000)
    streams = [engine.submit(prompt_of(tok, 24, i), stream_params) for i in range(7)]
    stamps: list[list[float]] = [[] for _ in streams]
    threads = [
        threading.Thread(target=_timestamps, args=(h, s), daemon=True)
        for h, s in zip(streams, stamps, strict=True)
    ]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 12:
        time.sleep(0.01)
    t_long = time.monotonic()
    long = engine.submit(prompt_of(tok, long_tokens, 99), params_cls(max_new_tokens=4))
    short = engine.submit(prompt_of(tok, 12, 98), params_cls(max_new_tokens=4))
    first: dict[str, float] = {}

    def first_event(name, h):
        h._tq.get()
        first[name] = time.monotonic()

    waits = [threading.Thread(target=first_event, args=(n, h)) for n, h in (("long", long), ("short", short))]
    for w in waits:
        w.start()
    for w in waits:
        w.join(600)
    t_end = first["long"]
    time.sleep(3.0)  # the gap that ends after the prefill is recorded
    for h in streams:
        h.cancel()
    for t in threads:
        t.join(60)
    before = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b <= t_long]
    # every gap that overlaps the prefill (an engine that stalls shows one long gap ending after it)
    during = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b > t_long and a < t_end]
    med = statistics.median(before)
    p99 = statistics.quantiles(during, n=100)[98] if len(during) >= 2 else max(during)
    return {
        "median_itl_ms": 1e3 * med,
        "p99_itl_during_prefill_ms": 1e3 * p99,
        "ratio": p99 / med,
        "long_ttft_s": first["long"] - t_long,
        "short_ttft_s": first["short"] - t_long,
    }


def part_interference(new: Engine, old, mod, tok, args) -> dict:
    out = {}
    for name, eng, cls in (("new", new, SamplingParams), ("old", old, mod.SamplingParams)):
        eng.start()
        kw = {"ignore_eos": True} if name == "new" else {}
        if name == "old":
            eng.eos_ids = set()
        res = interference(eng, lambda **k: cls(**k, **kw), tok)  # noqa: B023 - used at once
        eng.stop(timeout=60)
        out[name] = res
        print(f"interference {name}: {json.dumps({k: round(v, 3) for k, v in res.items()})}", flush=True)
    return out


# ---- 3. throughput against transformers' continuous batching ------------------------------------------
def tps_engine(engine, params, prompts) -> float:
    t = time.perf_counter()
    hs = [engine.submit(p, params) for p in prompts]
    n = sum(h.wait(600).completion_tokens for h in hs)
    return n / (time.perf_counter() - t)


def tps_hf(manager, prompts, tokens: int) -> float:
    t = time.perf_counter()
    manager.add_requests(inputs=prompts, max_new_tokens=tokens)
    n = done = 0
    while done < len(prompts):
        r = manager.get_result(timeout=600)
        if r is not None and r.is_finished():
            done += 1
            n += len(r.generated_tokens)
    return n / (time.perf_counter() - t)


def part_throughput(new: Engine, old, mod, hf_model, tok, args) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=-1, pad_token_id=2)
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512, max_requests_per_batch=16)
    manager = hf_model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    new.start()
    old.start()
    old.eos_ids = set()
    out: dict = {}
    for batch in (1, 8, 16):
        prompts = [prompt_of(tok, 64, i) for i in range(batch)]
        runs = {
            "new": lambda p=prompts: tps_engine(
                new, SamplingParams(max_new_tokens=args.tokens, ignore_eos=True), p
            ),
            "old": lambda p=prompts: tps_engine(old, mod.SamplingParams(max_new_tokens=args.tokens), p),
            "hf_cb": lambda p=prompts: tps_hf(manager, p, args.tokens),
        }
        res: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for name in list(runs)[r % 3 :] + list(runs)[: r % 3]:  # rotate the order every round
                res[name].append(runs[name]())
        out[batch] = {k: statistics.median(v) for k, v in res.items()}
        out[batch]["new_vs_hf"] = out[batch]["new"] / out[batch]["hf_cb"]
        print(
            f"throughput batch {batch:2d}: " + "  ".join(f"{k} {v:.2f}" for k, v in out[batch].items()),
            flush=True,
        )
    manager.stop(block=True, timeout=10)
    new.stop()
    old.stop()
    return out


def part_hf_context(hf_model, tok, args) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=2)
    cb = ContinuousBatchingConfig(num_blocks=160, max_batch_tokens=512, max_requests_per_batch=8)
    manager = hf_model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    steps: list[tuple[int, float]] = []
    t0: list[float] = [0.0]

    def pre(_m, args_, kwargs):
        t0[0] = time.perf_counter()

    def post(_m, args_, kwargs, _out):
        steps.append((kwargs["input_ids"].shape[1], time.perf_counter() - t0[0]))

    handles = [hf_model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles.append(hf_model.register_forward_hook(post, with_kwargs=True))
    manager.start()
    out = {}
    for ctx in (64, 512, 1024, 2048):
        steps.clear()
        tps_hf(manager, [prompt_of(tok, ctx, i) for i in range(8)], 3 * args.steps + 8)  # 8 decode at last
        decode = [dt for n, dt in steps if n == 8]  # every row decoding one token
        out[ctx] = 1e3 * statistics.median(decode[1:])
        print(f"hf_cb context {ctx:5d}: {out[ctx]:7.1f} ms per decode step", flush=True)
    manager.stop(block=True, timeout=10)
    for h in handles:
        h.remove()
    return {"batch": 8, "hf_cb_ms": out, "hf_cb_ratio_2048_vs_64": out[2048] / out[64]}


# ---- 4. peak RSS with 16 maximal LoRA profiles (child process) ----------------------------------------
def part_lora_rss(args) -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "bench_engine_rss.py"), "--tokens", str(args.tokens // 2)],
        capture_output=True,
        text=True,
        cwd=HERE.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"lora_rss: {json.dumps(res)}", flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS[:4]), choices=PARTS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="decode steps timed per context and round")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--old-ref",
        default="019b2b8",
        help="a git revision whose server/engine.py is the engine before this one",
    )
    p.add_argument("--out", type=Path, default=HERE / "out" / "engine.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    results: dict = {"threads": 1}
    needs_models = set(args.parts) - {"lora_rss"}
    if needs_models:
        mod = old_engine_module(args.old_ref)
        lm_new, lm_old = (load_model(quantization="none", dtype="float32") for _ in range(2))
        tok, cfg = lm_new.tokenizer, lm_new.model.config
        new = Engine(lm_new.model, tok, None, max_batch_size=16, kv_cache_tokens=KV_TOKENS)
        old = mod.Engine(lm_old.model, tok, None, max_batch_size=16)
        results["engine"] = {
            "kv_cache_tokens": new.cache.capacity_tokens,
            "max_batched_tokens": new.scheduler.max_batched_tokens,
            "page_size": new.cache.page_size,
        }
        if "context" in args.parts:
            results["context"] = part_context(new, old, mod, cfg, args)
        if "interference" in args.parts:
            results["interference"] = part_interference(new, old, mod, tok, args)
            new = Engine(lm_new.model, tok, None, max_batch_size=16, kv_cache_tokens=KV_TOKENS)
            old = mod.Engine(lm_old.model, tok, None, max_batch_size=16)
        lm_hf = (
            load_model(quantization="none", dtype="float32")
            if {"throughput", "hf_context"} & set(args.parts)
            else None
        )
        if "throughput" in args.parts:
            results["throughput"] = part_throughput(new, old, mod, lm_hf.model, tok, args)
        if "hf_context" in args.parts:
            results["hf_context"] = part_hf_context(lm_hf.model, tok, args)
    if "lora_rss" in args.parts:
        results["lora_rss"] = part_lora_rss(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
