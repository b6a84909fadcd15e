"""Scale-out on Ray Serve (SPEC §9.4), measured side by side in one run on the default model.

Three real servers, started once and kept up, each given one thread per model copy:

- ``2 replicas``: ``steerserve serve --replicas 2 --replica-cpus 1`` (its own local Ray cluster);
- ``1 replica``:  ``steerserve serve --replicas 1 --replica-cpus 1`` (another local Ray cluster);
- ``direct``:     ``steerserve serve`` with ``OMP_NUM_THREADS=1`` (no Ray), ``--max-batch-size 16``.

Every replica keeps the default ``--max-batch-size`` (8), so at concurrency 16 one replica runs 8 rows
and queues 8 while two replicas run 8 each. ``direct`` at concurrency 16 is the other baseline: one
process that batches all 16 (what one model copy can do with a larger batch on one thread).

1. ``scaling``: 32 greedy requests (the same prompts in every configuration, ``--tokens`` new tokens at
   most, end of sequence on as for any client) from 16 concurrent clients; aggregate completion
   tokens/s. Target: 2 replicas / 1 replica ≥ 1.7.
2. ``proxy``: the same 8 requests one after the other, through Ray's proxy to one replica and to the
   direct server; tokens/s. Target: the proxy costs ≤ 10 % (1 replica / direct ≥ 0.90).

Configurations are interleaved round by round (A B C, C B A, ...); medians. The machine's load average
is recorded before every round, and every run records how many cores the processes holding a model
(the replicas, or the direct server) actually got (their CPU time / wall time): on a shared 2-core
machine two replicas can only scale as far as two cores are free.

Usage:  python bench/bench_replicas.py [--rounds 3] [--tokens 32]      (writes bench/out/replicas.json)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from bench_serving import PROMPTS, _port  # bench/ is on sys.path when a script here runs

STEERSERVE = str(Path(sys.executable).parent / "steerserve")


class Server:
    """One ``steerserve serve`` process (its log in ``log``), ready when /ready says 200."""

    def __init__(self, name: str, options: list[str], workdir: Path, quantization: str) -> None:
        self.name, self.port = name, _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name.replace(' ', '-')}.log"
        cmd = [STEERSERVE, "serve", "--port", str(self.port), "--quantization", quantization, *options]
        cmd += ["--vector-dir", str(workdir / "vectors"), "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def model_processes(self) -> list[psutil.Process]:
        """The processes holding a model: the Ray replicas under this server, else the server itself."""
        root = psutil.Process(self.proc.pid)
        replicas = [p for p in root.children(recursive=True) if "ServeReplica" in " ".join(p.cmdline())]
        return replicas or [root]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _one(url: str, prompt: str, tokens: int) -> tuple[int, str]:
    r = httpx.post(url + "/generate", json={"prompt": prompt, "max_new_tokens": tokens}, timeout=900)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], r.headers.get("x-steerserve-replica", "")


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def run(server: Server, requests: list[str], concurrency: int, tokens: int, seen: dict) -> float:
    """Aggregate completion tokens/s of ``requests`` sent by ``concurrency`` clients at once; records the
    cores the model processes got meanwhile (``seen["cores"]``)."""
    procs = server.model_processes()
    cpu0, t0 = _cpu_seconds(procs), time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda p: _one(server.url, p, tokens), requests))
    wall = time.perf_counter() - t0
    seen.setdefault("cores", []).append((_cpu_seconds(procs) - cpu0) / wall)
    seen.setdefault("completion_tokens", []).append([n for n, _ in done])
    seen.setdefault("replicas", set()).update(r for _, r in done if r)
    return sum(n for n, _ in done) / wall


def interleave(configs: dict[str, Callable[[], float]], rounds: int, loads: list[float]) -> dict:
    """Every config once per round, the order reversed every other round; per-round values and medians."""
    values: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for k in list(configs)[:: -1 if r % 2 else 1]:
            values[k].append(configs[k]())
            print(f"  round {r + 1} {k}: {values[k][-1]:.1f} tokens/s", flush=True)
    return {"median": {k: statistics.median(v) for k, v in values.items()}, "rounds": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--out", type=Path, default=Path("bench/out/replicas.json"))
    args = ap.parse_args()
    t_all = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        options = {
            "2 replicas": ["--replicas", "2", "--replica-cpus", "1"],
            "1 replica": ["--replicas", "1", "--replica-cpus", "1"],
            "direct": ["--max-batch-size", "16"],
        }
        servers = {k: Server(k, v, work, args.quantization) for k, v in options.items()}
        try:
            for s in servers.values():
                s.wait_ready()
            seen: dict[str, dict] = {k: {} for k in servers}
            for s in servers.values():  # warm-up: first requests allocate caches, load code
                run(s, PROMPTS[:4], 4, args.tokens, {})
            loads: list[float] = []
            scaling = interleave(
                {
                    k: (lambda s=s, k=k: run(s, PROMPTS * 4, 16, args.tokens, seen[k]))
                    for k, s in servers.items()
                },
                args.rounds,
                loads,
            )
            proxy_seen: dict[str, dict] = {"1 replica": {}, "direct": {}}
            proxy = interleave(
                {
                    k: (lambda s=servers[k], k=k: run(s, PROMPTS, 1, args.tokens, proxy_seen[k]))
                    for k in proxy_seen
                },
                args.rounds,
                loads,
            )
        finally:
            for s in servers.values():
                s.stop()
    sm, pm = scaling["median"], proxy["median"]
    res = {
        "model": "default (SmolLM2-135M-Instruct)",
        "quantization": args.quantization,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_average_1m": {"before": load_before[0], "per_round": loads, "after": os.getloadavg()[0]},
        "scaling_tokens_per_s": scaling,
        "proxy_tokens_per_s": proxy,
        "two_vs_one_replica": sm["2 replicas"] / sm["1 replica"],
        "two_replicas_vs_direct_batch16": sm["2 replicas"] / sm["direct"],
        "one_replica_vs_direct_concurrency1": pm["1 replica"] / pm["direct"],
        "model_cores_median": {
            part: {k: statistics.median(v["cores"]) for k, v in runs.items()}
            for part, runs in (("scaling", seen), ("proxy", proxy_seen))
        },
        "replicas_seen": {k: sorted(v.get("replicas", ())) for k, v in seen.items()},
        "same_completion_tokens": {
            part: len({tuple(x) for v in runs.values() for x in v["completion_tokens"]}) == 1
            for part, runs in (("scaling", seen), ("proxy", proxy_seen))
        },
        "wall_s": round(time.monotonic() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    shown = ("load_average_1m", "model_cores_median")
    print(json.dumps({k: v for k, v in res.items() if "vs" in k or k in shown}, indent=2))
    print(f"wrote {args.out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
