"""Shared test helpers: tiny random models (served or not), random artifacts, padded forward passes,
a pickle canary, servers in a thread, Prometheus samples and a real Prometheus server."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from basemodel import LoadedModel
from steering_vectors import Artifact

TINY_VOCAB = 49152  # SmolLM2's tokenizer
TINY_MODEL_ID = "tiny-llama"


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 random Llama with SmolLM2's vocabulary (loads in milliseconds)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (from the provisioned default model), left padding, pad token set."""
    from transformers import AutoTokenizer

    from basemodel import prepare_default_model

    tok = AutoTokenizer.from_pretrained(prepare_default_model(quiet=True), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_loaded(tokenizer: Any, seed: int = 0, model: LlamaForCausalLM | None = None) -> LoadedModel:
    """A :class:`LoadedModel` around a tiny random Llama (``model``, else ``tiny_llama(seed)``)."""
    return LoadedModel(
        model=model if model is not None else tiny_llama(seed),
        tokenizer=tokenizer,
        model_id=TINY_MODEL_ID,
        path=Path("."),
        quantization="none",
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def red_artifact(model, layers: list[int] | None = None, seed: int = 1, spread: float = 0.3) -> Artifact:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    tensors = {}
    for layer in layers if layers is not None else range(n):
        tensors[f"layers.{layer}.scale"] = 1.0 + spread * torch.randn(d, generator=g)
        tensors[f"layers.{layer}.bias"] = spread * torch.randn(d, generator=g)
    return Artifact(
        kind="red", tensors=tensors, hidden_size=d, num_layers=n, model_type=cfg.model_type, method="red"
    )


def add_artifact(model, layers: list[int] | None = None, seed: int = 2, norm: float = 2.0) -> Artifact:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    tensors = {}
    for layer in layers if layers is not None else range(n):
        v = torch.randn(d, generator=g)
        tensors[f"layers.{layer}.direction"] = norm * v / v.norm()
    return Artifact(
        kind="add",
        tensors=tensors,
        hidden_size=d,
        num_layers=n,
        model_type=cfg.model_type,
        method="mean-diff",
    )


def lora_artifact(
    model, modules=("q_proj", "v_proj"), rank: int = 4, seed: int = 3, alpha: float = 8.0
) -> Artifact:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, block in enumerate(model.model.layers):
        for m in modules:
            lin = getattr(block.self_attn, m, None) or getattr(block.mlp, m)
            tensors[f"layers.{layer}.{m}.lora_A"] = 0.2 * torch.randn(rank, lin.in_features, generator=g)
            tensors[f"layers.{layer}.{m}.lora_B"] = 0.2 * torch.randn(lin.out_features, rank, generator=g)
    return Artifact(
        kind="lora",
        tensors=tensors,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        model_type=cfg.model_type,
        method="rahf-scit",
        lora_alpha=alpha,
    )


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each [B, T], left padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.no_grad()
def padded_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Logits [B, T, V] of a left-padded batch in one forward pass."""
    ids, mask, pos = left_pad(seqs)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@torch.no_grad()
def greedy(model, seqs: list[list[int]], steps: int, hooks=None, slots=None) -> list[list[int]]:
    """Greedy continuation without a cache (re-runs the whole padded batch each step)."""
    seqs = [list(s) for s in seqs]
    n0 = [len(s) for s in seqs]
    for _ in range(steps):
        if hooks is not None:
            ids, mask, pos = left_pad(seqs)
            T = ids.shape[1]
            gen = torch.zeros_like(ids, dtype=torch.bool)
            for i, s in enumerate(seqs):
                gen[i, T - len(s) + n0[i] :] = True
            with hooks.batch(slots, generated=gen):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        else:
            logits = padded_logits(model, seqs)
        nxt = logits[:, -1].argmax(-1).tolist()
        for s, t in zip(seqs, nxt, strict=False):
            s.append(t)
    return [s[n:] for s, n in zip(seqs, n0, strict=False)]


def metric(text: str, name: str, **labels: str) -> float | None:
    """Value of the sample ``name{labels}`` (exact label set) in a Prometheus exposition, else None."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return None


class PickleCanary:
    """Unpickling this creates the file ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def fail_once(fn: Callable[..., Any], error: BaseException) -> Callable[..., Any]:
    """``fn`` that raises ``error`` on its first call and behaves as ``fn`` afterwards (fault injection)."""
    pending = [error]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if pending:
            raise pending.pop()
        return fn(*args, **kwargs)

    return wrapper


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` as ``steerserve serve`` does (uvicorn, the guarded connection protocol, the app's
    config) on a real loopback socket in a thread; yields its URL."""
    import uvicorn

    from server.serve import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = app.state.steerserve.config
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def require_prometheus() -> str:
    """The path of Debian's ``prometheus``; the test skips without it (fails in CI, where `make test`
    installs it)."""
    import pytest

    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus missing: `make test` installs Debian's prometheus package")
        pytest.skip("prometheus not installed")
    return path


@contextmanager
def prometheus_server(scrape_configs: str, folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real Prometheus scraping every second: ``scrape_configs`` is the YAML under ``scrape_configs:``;
    config and data go to ``folder``. Yields its URL and process."""
    cfg = folder / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n" + scrape_configs
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            require_prometheus(),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
