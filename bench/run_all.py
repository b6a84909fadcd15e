"""`make bench`: the serving benchmarks, one after the other, each printing its side-by-side table.

bench_hooks.py   decode-step cost of idle and steered hooks
bench_engine.py  the engine at its limits: decode step vs context, a long prompt beside running streams,
                 throughput vs transformers' continuous batching, peak RSS with maximal LoRA profiles
                 (bench/out/engine.json)
bench_serving.py steering overhead at batch 1 and 8, distinct profiles, continuous vs static batching,
                 the peer libraries, HTTP vs in-process, resident memory (bench/out/serving.{json,png})
bench_replicas.py Ray Serve scale-out: 2 replicas vs 1 at concurrency 16, the proxy's cost at
                 concurrency 1 (bench/out/replicas.json)
bench_sweep.py   POST /v1/sweep with 8 strengths vs one request of the same length (bench/out/sweep.json)
bench_peers_http.py  steerserve serve vs transformers serve --continuous-batching over HTTP, driven by
                 guidellm at concurrency 1, 8, 16 and with a 3-vector profile (bench/out/peers_http.json)

All run with one OpenMP thread (OMP_NUM_THREADS=1 unless set): on a small shared machine the default
thread team spin-waits against other processes and makes every figure several times noisier.
The training-cost and alignment evaluations are `make eval` (bench/bench_training.py,
bench/eval_alignment.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_hooks.py", "--rounds", "12", "--steps", "32", "--profile"],
    ["bench_engine.py", "--rounds", "3"],
    ["bench_serving.py", "--rounds", "5", "--tokens", "32"],
    ["bench_replicas.py", "--rounds", "3", "--tokens", "32"],
    ["bench_sweep.py", "--rounds", "6", "--tokens", "32"],
    ["bench_peers_http.py", "--rounds", "2"],
]


def main() -> int:
    for script, *args in RUNS:
        t0 = time.monotonic()
        print(f"== {script} {' '.join(args)}", flush=True)
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        rc = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent, env=env).returncode
        print(f"== {script}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
