"""Serve the tiny random Llama (tests/helpers.py) through ``server.serve.serve`` in its own process.

Fault tests need a real process to signal (kill -9, SIGTERM) without loading a real model::

    python tests/tiny_server.py --port P --vector-dir D [--drain-timeout S] [--step-delay S] ...

Every ``steerserve serve`` option is accepted, with the same defaults (``server.config.ServerConfig``); the
model loads in milliseconds; the tokenizer is SmolLM2's, from ``basemodel.prepare_default_model()``.
``--step-delay`` sleeps before every forward pass of the model so that generations last long enough to be
interrupted deterministically, and ``--context`` overrides the model's context length (test knobs, not
server options).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py sits next to this file

from helpers import free_port  # noqa: E402

#: What the fault tests run with unless they say otherwise: a shorter drain than a real server's, so a
#: test that stops a server with requests in flight does not wait long, and a quieter log.
HARNESS_OPTIONS = {"drain_timeout": 10.0, "log_level": "warning"}


class TinyServer:
    """A ``tiny_server.py`` subprocess, for tests: start, wait for /ready, signal, restart on the same dir."""

    def __init__(self, vector_dir: Path, log: Path, **options: object) -> None:
        self.vector_dir, self.log, self.options = Path(vector_dir), Path(log), {**HARNESS_OPTIONS, **options}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # extra environment (e.g. STEERSERVE_API_KEY)

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
            flag = f"--{key.replace('_', '-')}"
            cmd += [flag] if value is True else [flag, str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **self.env)
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


def tiny_model(args: argparse.Namespace):
    """The served model: tests/helpers.py's tiny Llama with SmolLM2's tokenizer, and the test knobs."""
    from helpers import smollm2_tokenizer, tiny_llama, tiny_loaded

    model = tiny_llama()
    if args.context:
        model.config.max_position_embeddings = args.context
    if args.step_delay > 0:
        delay = args.step_delay
        model.register_forward_pre_hook(lambda _module, _args: time.sleep(delay))
    return tiny_loaded(smollm2_tokenizer(), model=model)


def main(argv: list[str] | None = None) -> int:
    from server.config import add_serve_options, config_from_args

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_serve_options(p)
    p.add_argument("--context", type=int, default=0, help="override max_position_embeddings (0: keep)")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds slept before every forward pass")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    import torch

    from server.serve import serve

    torch.set_num_threads(1)
    serve(config_from_args(args), tiny_model(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
