"""Serve the tiny random Llama (tests/helpers.py) through ``server.serve.DrainingServer`` in its own process.

Fault tests need a real process to signal (kill -9, SIGTERM) without loading a real model::

    python tests/tiny_server.py --port P --vector-dir D [--drain-timeout S] [--step-delay S] ...

The model loads in milliseconds; the tokenizer is SmolLM2's, from ``basemodel.prepare_default_model()``.
``--step-delay`` sleeps before every forward pass of the model so that generations last long enough to be
interrupted deterministically (a test knob, not a server option).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py sits next to this file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyServer:
    """A ``tiny_server.py`` subprocess, for tests: start, wait for /ready, signal, restart on the same dir."""

    def __init__(self, vector_dir: Path, log: Path, **options: object) -> None:
        self.vector_dir, self.log, self.options = Path(vector_dir), Path(log), options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> TinyServer:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            str(self.port),
            "--vector-dir",
            str(self.vector_dir),
        ]
        for key, value in self.options.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"tiny server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"tiny server not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Best-effort cleanup: SIGTERM, then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def build_state(args: argparse.Namespace):
    import torch
    from helpers import tiny_llama
    from transformers import AutoTokenizer

    from basemodel import LoadedModel, prepare_default_model
    from server.app import ServerConfig, ServerState

    tok = AutoTokenizer.from_pretrained(prepare_default_model(quiet=True), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = tiny_llama()
    if args.context:
        model.config.max_position_embeddings = args.context
    if args.step_delay > 0:
        delay = args.step_delay
        model.register_forward_pre_hook(lambda _module, _args: time.sleep(delay))
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        model_id="tiny-llama",
        path=Path("."),
        quantization="none",
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        vector_dir=args.vector_dir,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens,
        max_upload_bytes=args.max_upload_bytes,
        drain_timeout=args.drain_timeout,
        quantization="none",
    )
    state = ServerState(config)
    state.load(loaded)
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--vector-dir", type=Path, required=True)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--max-upload-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--context", type=int, default=0, help="override max_position_embeddings (0: keep)")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds slept before every forward pass")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    import torch
    import uvicorn

    from server.app import create_app
    from server.serve import DrainingServer

    torch.set_num_threads(1)
    state = build_state(args)
    uv = uvicorn.Config(
        create_app(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=int(args.drain_timeout) + 5,  # as server.serve.serve does
        access_log=False,
    )
    DrainingServer(uv, state).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
