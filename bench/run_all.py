"""`make bench`: the serving benchmarks, one after the other, each printing its side-by-side table.

bench_hooks.py   decode-step cost of idle and steered hooks (issue: foundation)
bench_serving.py engine and HTTP throughput, distinct profiles, concurrency, resident memory
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_hooks.py", "--rounds", "15", "--steps", "32"],
    ["bench_serving.py", "--rounds", "3", "--tokens", "48"],
]


def main() -> int:
    for script, *args in RUNS:
        t0 = time.monotonic()
        print(f"== {script} {' '.join(args)}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent).returncode
        print(f"== {script}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
