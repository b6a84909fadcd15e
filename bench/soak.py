"""Soak under overload (issue 7): a `steerserve serve` process on the real default model, driven on loopback
at about 4x its measured capacity for --duration seconds with mixed steering profiles, streaming and
non-streaming requests on all three generation routes, and some clients hanging up mid-stream.

1. start `steerserve serve` (a fresh vector directory, --max-queue small so that overload shows as 429);
2. upload three `add` vectors and save a profile that composes two of them;
3. capacity: --max-batch-size closed-loop clients for --capacity-seconds -> requests/s and tokens/s;
4. soak: open-loop (Poisson) arrivals at --overload x the measured requests/s; every request is timed;
5. report: status counts, p50/p95/p99 latency of the 200s (and of the 429s), tokens/s, the server's resident
   memory at the start and the end of the soak (growth %), whether every 429/503 carried Retry-After,
   and whether the gauges went back to 0 afterwards.

Bounded: arrivals stop after --duration seconds or --max-requests requests; in-flight requests then get
--grace seconds; at most --max-in-flight requests are outstanding on the client side (arrivals beyond that
are counted as `client_skipped`, not sent). Not run in CI.

Usage:  python bench/soak.py [--duration 600] [--overload 4] [--tokens 8-32] [--quantization auto]
Writes bench/out/soak.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

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
VECTORS = ("calm", "formal", "brief")
PROFILE = "calm-formal"


@dataclass
class Stats:
    statuses: Counter = field(default_factory=Counter)
    latency_ok: list[float] = field(default_factory=list)
    latency_429: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    missing_retry_after: int = 0
    retry_after_checked: int = 0
    by_kind: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def _steerserve() -> str:
    exe = Path(sys.executable).parent / "steerserve"
    return str(exe) if exe.exists() else (shutil.which("steerserve") or "steerserve")


# ---- requests ---------------------------------------------------------------------------------------------
def _steering(rng: random.Random) -> tuple[str, object | None]:
    """(label, steering field) for one request: unsteered, one vector, a composition, or the saved profile."""
    pick = rng.random()
    if pick < 0.25:
        return "none", None
    if pick < 0.55:
        name = rng.choice(VECTORS)
        return "one", {"vectors": [{"name": name, "strength": round(rng.uniform(0.2, 2.0), 2)}]}
    if pick < 0.8:
        names = rng.sample(VECTORS, 2)
        entries = [{"name": n, "strength": round(rng.uniform(-1.0, 1.0), 2)} for n in names]
        if rng.random() < 0.5:
            entries[0]["positions"] = "generated"
        return "two", {"vectors": entries}
    return "profile", PROFILE


def make_request(rng: random.Random, tokens: tuple[int, int], disconnect_share: float) -> dict:
    route = rng.choice(["/generate", "/generate", "/v1/chat/completions", "/v1/completions"])
    stream = rng.random() < 0.5
    label, steering = _steering(rng)
    n = rng.randint(*tokens)
    prompt = rng.choice(PROMPTS)
    if route == "/generate":
        body: dict = {"prompt": prompt, "max_new_tokens": n}
        if steering is not None:
            body["steering"] = steering
    else:
        key = "messages" if route == "/v1/chat/completions" else "prompt"
        body = {
            key: [{"role": "user", "content": prompt}] if key == "messages" else prompt,
            "max_tokens": n,
            "temperature": 0,
        }
        if steering == PROFILE:
            body["model"] = PROFILE  # OpenAI style: a saved profile as the model
        elif steering is not None:
            body["steering"] = steering
        if stream:
            body["stream_options"] = {"include_usage": True}
    body["stream"] = stream
    return {
        "route": route,
        "body": body,
        "stream": stream,
        "steering": label,
        "disconnect": stream and rng.random() < disconnect_share,
    }


async def send(client: httpx.AsyncClient, req: dict, stats: Stats) -> None:
    kind = f"{req['route']} {'stream' if req['stream'] else 'json'} {req['steering']}"
    t0 = time.perf_counter()
    status: int | str
    try:
        if not req["stream"]:
            r = await client.post(req["route"], json=req["body"])
            status = r.status_code
            if status == 200:
                stats.tokens += r.json()["usage"]["completion_tokens"]
            headers = r.headers
        else:
            async with client.stream("POST", req["route"], json=req["body"]) as r:
                status, headers = r.status_code, r.headers
                if status != 200:
                    await r.aread()
                else:
                    first = True
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if first:
                            stats.ttft.append(time.perf_counter() - t0)
                            first = False
                            if req["disconnect"]:
                                status = "disconnected"  # hang up after the first event
                                break
                        data = line[6:]
                        if data == "[DONE]":
                            break
                        ev = json.loads(data)
                        usage = ev.get("usage")
                        if usage:
                            stats.tokens += usage["completion_tokens"]
    except httpx.HTTPError as e:
        stats.statuses["transport_error"] += 1
        stats.errors[type(e).__name__] += 1
        return
    elapsed = time.perf_counter() - t0
    stats.statuses[status] += 1
    stats.by_kind[(kind, status)] += 1
    if status == 200:
        stats.latency_ok.append(elapsed)
    elif status == 429:
        stats.latency_429.append(elapsed)
    if status in (429, 503):
        stats.retry_after_checked += 1
        if not headers.get("retry-after"):
            stats.missing_retry_after += 1


# ---- phases -----------------------------------------------------------------------------------------------
async def setup_vectors(client: httpx.AsyncClient) -> dict:
    """Three random `add` vectors fitted to the served model, and a saved two-vector profile."""
    import torch

    from steering_vectors import Artifact

    info = (await client.get("/v1/models")).json()["data"][0]
    from transformers import AutoConfig

    from basemodel import prepare_default_model

    cfg = AutoConfig.from_pretrained(prepare_default_model(quiet=True), local_files_only=True)
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    uploaded = {}
    for i, name in enumerate(VECTORS):
        layers = range(n // 3, 2 * n // 3)
        tensors = {}
        for layer in layers:
            v = torch.randn(d, generator=g)
            tensors[f"layers.{layer}.direction"] = (0.5 + i) * v / v.norm()
        art = Artifact(
            kind="add",
            tensors=tensors,
            hidden_size=d,
            num_layers=n,
            model_type=cfg.model_type,
            method="mean-diff",
        )
        r = await client.post(
            "/v1/vectors", data={"name": name}, files={"file": (f"{name}.safetensors", art.to_bytes())}
        )
        r.raise_for_status()
        uploaded[name] = r.json()["sha256"]
    r = await client.put(
        f"/v1/profiles/{PROFILE}",
        json={
            "vectors": [
                {"name": "calm", "strength": 0.8},
                {"name": "formal", "strength": 0.5, "positions": "generated"},
            ]
        },
    )
    r.raise_for_status()
    return {"model": info["id"], "quantization": info.get("quantization"), "vectors": uploaded}


async def measure_capacity(client: httpx.AsyncClient, args: argparse.Namespace) -> dict:
    """max_batch_size closed-loop clients (no disconnects) for capacity_seconds."""
    stats = Stats()
    rng = random.Random(args.seed)
    stop = time.monotonic() + args.capacity_seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            await send(client, make_request(rng, args.tokens, 0.0), stats)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.max_batch_size)))
    wall = time.perf_counter() - t0
    ok = stats.statuses[200]
    return {
        "concurrency": args.max_batch_size,
        "seconds": round(wall, 1),
        "requests": ok,
        "requests_per_s": ok / wall,
        "tokens_per_s": stats.tokens / wall,
        "p50_latency_s": _pct(stats.latency_ok, 50),
        "statuses": {str(k): v for k, v in stats.statuses.items()},
    }


async def soak(client: httpx.AsyncClient, args: argparse.Namespace, rate: float, ps: psutil.Process) -> dict:
    stats = Stats()
    rng = random.Random(args.seed + 1)
    rss: list[tuple[float, int]] = [(0.0, ps.memory_info().rss)]
    in_flight: set[asyncio.Task] = set()
    sent = skipped = 0
    t0 = time.monotonic()
    next_sample = t0 + 5.0
    stop_at = t0 + args.duration
    while time.monotonic() < stop_at and sent + skipped < args.max_requests:
        await asyncio.sleep(rng.expovariate(rate))
        if len(in_flight) >= args.max_in_flight:
            skipped += 1
        else:
            task = asyncio.create_task(send(client, make_request(rng, args.tokens, args.disconnect), stats))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        if time.monotonic() >= next_sample:
            rss.append((time.monotonic() - t0, ps.memory_info().rss))
            next_sample += 5.0
    arrivals_end = time.monotonic()
    pending: set[asyncio.Task] = set()
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=args.grace)
        for task in pending:
            task.cancel()
    wall = arrivals_end - t0
    await asyncio.sleep(2.0)  # let the server settle before the last memory reading
    rss.append((time.monotonic() - t0, ps.memory_info().rss))
    return {
        "stats": stats,
        "sent": sent,
        "skipped": skipped,
        "wall": wall,
        "rss": rss,
        "unfinished": len(pending),
    }


async def gauges_after(client: httpx.AsyncClient, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        for name in ("steer_running_requests", "steer_waiting_requests"):
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            values[name] = float(m.group(1)) if m else float("nan")
        if all(v == 0.0 for v in values.values()):
            break
        await asyncio.sleep(0.5)
    values["ready"] = (await client.get("/ready")).status_code
    return values


async def run(args: argparse.Namespace, url: str, ps: psutil.Process) -> dict:
    limits = httpx.Limits(max_connections=args.max_in_flight + 16, max_keepalive_connections=64)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        setup = await setup_vectors(client)
        await send(client, make_request(random.Random(0), args.tokens, 0.0), Stats())  # warm-up
        cap = await measure_capacity(client, args)
        rate = args.overload * cap["requests_per_s"]
        print(
            f"capacity: {cap['requests_per_s']:.2f} req/s, {cap['tokens_per_s']:.1f} tokens/s at "
            f"concurrency {args.max_batch_size}; soak at {rate:.2f} req/s for {args.duration} s",
            flush=True,
        )
        result = await soak(client, args, rate, ps)
        gauges = await gauges_after(client)
    stats: Stats = result["stats"]
    rss = result["rss"]
    rss_start, rss_end = rss[0][1], rss[-1][1]
    statuses = {str(k): v for k, v in sorted(stats.statuses.items(), key=lambda kv: str(kv[0]))}
    allowed = {"200", "429", "503", "disconnected"}
    other = {k: v for k, v in statuses.items() if k not in allowed}
    return {
        "server": {
            "url": url,
            "max_batch_size": args.max_batch_size,
            "max_queue": args.max_queue,
            "quantization": args.quantization,
            **setup,
        },
        "capacity": cap,
        "soak": {
            "duration_s": round(result["wall"], 1),
            "offered_rate_per_s": round(rate, 3),
            "overload_factor": args.overload,
            "requests_sent": result["sent"],
            "client_skipped": result["skipped"],
            "unfinished_after_grace": result["unfinished"],
            "statuses": statuses,
            "latency_200_s": {f"p{q}": _pct(stats.latency_ok, q) for q in (50, 95, 99)},
            "latency_429_s": {f"p{q}": _pct(stats.latency_429, q) for q in (50, 95, 99)},
            "ttft_s": {f"p{q}": _pct(stats.ttft, q) for q in (50, 95, 99)},
            "tokens": stats.tokens,
            "tokens_per_s": stats.tokens / result["wall"] if result["wall"] else 0.0,
            "retry_after": {"checked": stats.retry_after_checked, "missing": stats.missing_retry_after},
            "transport_errors": dict(stats.errors),
            "by_kind": {f"{k} -> {s}": v for (k, s), v in sorted(stats.by_kind.items(), key=str)},
        },
        "rss_mb": {
            "start": rss_start / 2**20,
            "end": rss_end / 2**20,
            "max": max(v for _, v in rss) / 2**20,
            "growth_pct": 100.0 * (rss_end - rss_start) / rss_start,
            "samples": [(round(t, 1), round(v / 2**20, 1)) for t, v in rss],
        },
        "after": gauges,
        "verdict": {
            "only_2xx_429_503": not other,
            "other_statuses": other,
            "every_429_503_has_retry_after": stats.missing_retry_after == 0,
            "rss_growth_within_10pct": 100.0 * (rss_end - rss_start) / rss_start <= 10.0,
            "gauges_back_to_0": gauges.get("steer_running_requests") == 0.0
            and gauges.get("steer_waiting_requests") == 0.0,
        },
    }


def table(report: dict) -> str:
    s, r, c = report["soak"], report["rss_mb"], report["capacity"]

    def f(x: float | None, unit: str = "s") -> str:
        return "-" if x is None else (f"{x * 1000:.0f} ms" if unit == "s" and x < 1 else f"{x:.2f} {unit}")

    rows = [
        ("capacity", f"{c['requests_per_s']:.2f} req/s, {c['tokens_per_s']:.1f} tok/s @ {c['concurrency']}"),
        (
            "offered load",
            f"{s['offered_rate_per_s']:.2f} req/s ({s['overload_factor']}x) for {s['duration_s']} s",
        ),
        (
            "requests sent",
            f"{s['requests_sent']} (client-skipped {s['client_skipped']}, "
            f"unfinished after grace {s['unfinished_after_grace']})",
        ),
        *((f"  status {k}", str(v)) for k, v in s["statuses"].items()),
        ("latency 200 p50/p95/p99", " / ".join(f(s["latency_200_s"][p]) for p in ("p50", "p95", "p99"))),
        ("latency 429 p50/p95/p99", " / ".join(f(s["latency_429_s"][p]) for p in ("p50", "p95", "p99"))),
        ("TTFT p50/p95/p99 (streams)", " / ".join(f(s["ttft_s"][p]) for p in ("p50", "p95", "p99"))),
        ("tokens/s (200s)", f"{s['tokens_per_s']:.1f}"),
        ("RSS start / end / max", f"{r['start']:.0f} / {r['end']:.0f} / {r['max']:.0f} MiB"),
        ("RSS growth", f"{r['growth_pct']:+.1f} %"),
        (
            "Retry-After on 429/503",
            f"{s['retry_after']['checked'] - s['retry_after']['missing']}/{s['retry_after']['checked']}",
        ),
        (
            "gauges after / ready",
            f"running {report['after'].get('steer_running_requests')}, waiting "
            f"{report['after'].get('steer_waiting_requests')}, /ready "
            f"{report['after'].get('ready')}",
        ),
        *((f"verdict: {k}", str(v)) for k, v in report["verdict"].items()),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of overload (default 600)")
    ap.add_argument("--overload", type=float, default=4.0, help="offered load as a multiple of capacity")
    ap.add_argument("--capacity-seconds", type=float, default=30.0)
    ap.add_argument("--tokens", default="8-32", help="max_new_tokens range per request, e.g. 8-32")
    ap.add_argument("--disconnect", type=float, default=0.15, help="share of streams that hang up early")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=None, help="server queue (default: max batch size)")
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--grace", type=float, default=120.0, help="seconds for in-flight requests at the end")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/soak.json"))
    args = ap.parse_args()
    lo, _, hi = args.tokens.partition("-")
    args.tokens = (int(lo), int(hi or lo))
    args.max_queue = args.max_queue if args.max_queue is not None else args.max_batch_size

    port = args.port or _port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log = Path(tmp) / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
        cmd = [
            _steerserve(),
            "serve",
            "--port",
            str(port),
            "--vector-dir",
            str(Path(tmp) / "vectors"),
            "--quantization",
            args.quantization,
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-queue",
            str(args.max_queue),
            "--log-level",
            "warning",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"steerserve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("steerserve was not ready after 600 s")
                time.sleep(0.5)
            report = asyncio.run(run(args, url, psutil.Process(proc.pid)))
            report["server"]["log_tail"] = log.read_text(errors="replace")[-2000:]
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
    report["server"]["exit_code"] = proc.returncode
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    return 0 if all(v for k, v in report["verdict"].items() if k != "other_statuses") else 1


if __name__ == "__main__":
    sys.exit(main())
