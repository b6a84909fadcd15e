"""How ASGI servers hold up at the connection edge (issue 13): which one steerserve runs on, measured.

Each server runs the same trivial ASGI app in its own process, set up with the limits it offers, and gets:

- stall: 200 sockets send a request line and one header, then nothing; a normal client then asks for a
  page (seconds to its answer), and after the header timeout we count how many stalled sockets the server
  closed;
- big header: one client sends a 64 MiB header in 1 MiB chunks; what the server answers, after how many
  bytes, and the server's peak resident memory above idle;
- connections: 300 idle sockets, then a normal client (its status: 200, 503, or none).

Servers: uvicorn with httptools (its default; no header timeout, no header cap), uvicorn with h11
(``h11_max_incomplete_event_size`` 64 KiB, ``limit_concurrency`` 256), hypercorn (``read_timeout``),
granian (``--http1-header-read-timeout``, ``--backpressure``) and steerserve's guarded uvicorn protocol
(server/connection.py: header timeout, 64 KiB header cap, 256 connections). Header timeouts are 2 s here.
hypercorn and granian are optional (``pip install -c constraints.txt '.[bench]'``); absent ones are skipped.

    python bench/bench_edges.py            # prints a table, writes bench/out/edges.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADER_TIMEOUT = 2


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app every server runs: 200 with a short body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


GUARDED = (
    "import sys, uvicorn; sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r});"
    "from bench_edges import app; from server.config import ServerConfig;"
    "from server.serve import uvicorn_config;"
    "cfg = ServerConfig(port={port}, header_timeout={ht}, log_level='warning');"
    "uvicorn.Server(uvicorn_config(app, cfg)).run()"
)


def commands(port: int) -> dict[str, list[str]]:
    py, target = sys.executable, "bench_edges:app"
    uv = [py, "-m", "uvicorn", target, "--app-dir", str(HERE), "--port", str(port), "--log-level", "warning"]
    out = {
        "uvicorn (httptools)": [*uv, "--http", "httptools"],
        "uvicorn (h11, limits)": [
            *uv,
            "--http",
            "h11",
            "--h11-max-incomplete-event-size",
            "65536",
            "--limit-concurrency",
            "256",
        ],
    }
    if importlib.util.find_spec("hypercorn"):
        out["hypercorn (read_timeout)"] = [
            py, "-m", "hypercorn", target, "--bind", f"127.0.0.1:{port}",
            "--read-timeout", str(HEADER_TIMEOUT),
        ]  # fmt: skip
    if importlib.util.find_spec("granian"):
        out["granian (header timeout)"] = [
            py, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
            "--http1-header-read-timeout", str(HEADER_TIMEOUT * 1000), "--backpressure", "256",
            "--log-level", "warning", target,
        ]  # fmt: skip
    guarded = GUARDED.format(root=str(ROOT), here=str(HERE), port=port, ht=HEADER_TIMEOUT)
    out["steerserve guarded uvicorn"] = [py, "-c", guarded]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss(proc: psutil.Process) -> int:
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running())


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def stall(port: int, url: str) -> dict[str, Any]:
    socks = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    t0 = time.monotonic()
    try:
        status = httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        status = None
    latency = time.monotonic() - t0
    time.sleep(HEADER_TIMEOUT + 2)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(65536, socket.MSG_PEEK) is not None
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return {"normal_status": status, "normal_s": round(latency, 3), "stalled_closed": closed}


def big_header(port: int, proc: psutil.Process) -> dict[str, Any]:
    idle = _tree_rss(proc)
    peak, stop = [idle], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(proc))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(64):
                s.sendall(b"a" * (1 << 20))
                sent += 1 << 20
                if select.select([s], [], [], 0)[0]:
                    answer = s.recv(4096)
                    break
            else:
                s.sendall(b"\r\n\r\n")
                answer = s.recv(4096)
        except OSError:
            pass
    time.sleep(0.5)
    stop.set()
    sampler.join()
    status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
    return {"status": status, "sent_mib": sent >> 20, "extra_mb": round((peak[0] - idle) / 1e6, 1)}


def connections(port: int, url: str) -> dict[str, Any]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
    time.sleep(0.3)
    try:
        status = httpx.get(url, timeout=5).status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    for s in socks:
        s.close()
    return {"status_with_300_open": status}


def measure(cmd: list[str], port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(url, popen)
        proc = psutil.Process(popen.pid)
        result = {"stall": stall(port, url), "big_header": big_header(port, proc)}
        time.sleep(0.5)
        result["connections"] = connections(port, url)
        return result
    finally:
        popen.terminate()
        popen.wait(timeout=30)


def main() -> None:
    results = {}
    for name in commands(0):
        port = _free_port()
        results[name] = measure(commands(port)[name], port)
        print(name, json.dumps(results[name]), flush=True)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "edges.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
