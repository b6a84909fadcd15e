"""`steerserve serve` as a real process over a real socket, on the real default model (SmolLM2-135M-Instruct):
the official `openai` client (chat, streaming, `extra_body` steering), concurrent greedy requests with
different profiles returning exactly what each returns alone, uploads usable by the very next request
without disturbing requests in flight, and a client that disconnects mid-stream freeing its row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from steering_vectors import Artifact
from tests.helpers import free_port, metric, wait_for

pytestmark = pytest.mark.slow

HIDDEN, LAYERS = 576, 30  # SmolLM2-135M
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
CITY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name a famous city in Italy and say why it is famous."},
]


def direction(seed: int, norm: float = 4.0, layers: range | list[int] = range(LAYERS)) -> Artifact:
    """An ``add`` artifact for the default model: one random direction of L2 norm ``norm`` per layer."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(HIDDEN, generator=g)
    v = norm * v / v.norm()
    return Artifact(
        kind="add",
        tensors={f"layers.{layer}.direction": v.clone() for layer in layers},
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        model_type="llama",
        method="mean-diff",
    )


class Live:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=url, timeout=120)

    def upload(self, name: str, art: Artifact) -> dict[str, Any]:
        files = {"file": (f"{name}.safetensors", art.to_bytes(), "application/octet-stream")}
        resp = self.http.post("/v1/vectors", data={"name": name}, files=files)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        resp = self.http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def metrics(self) -> str:
        return self.http.get("/metrics").text


def _steerserve() -> str:
    exe = Path(sys.executable).with_name("steerserve")
    if exe.exists():
        return str(exe)
    found = shutil.which("steerserve")
    assert found, "the steerserve console script is not installed"
    return found


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[Live]:
    """`steerserve serve` on the default model (unquantized, float32) in a fresh vector directory."""
    tmp = tmp_path_factory.mktemp("live")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    # On a shared CPU, OpenMP's spin-waiting barriers with two intra-op threads made decoding 3-5x slower
    # than one thread (measured here with other jobs running); an explicit setting is honoured.
    env.setdefault("OMP_NUM_THREADS", "1")
    log = tmp / "server.log"
    cmd = [
        _steerserve(),
        "serve",
        "--port",
        str(port),
        "--vector-dir",
        str(tmp / "vectors"),
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--max-batch-size",
        "8",
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Live(f"http://127.0.0.1:{port}", proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"steerserve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return server.http.get("/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=180, what=f"/ready (log: {log})")
        yield server
    finally:
        server.http.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drains, then exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# ---- the official openai client ----------------------------------------------------------------------------
def test_openai_client_chat_streaming_and_extra_body_steering(live):
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    assert models[0] == "SmolLM2-135M-Instruct"
    base = models[0]

    plain = client.chat.completions.create(model=base, messages=SEA, max_tokens=12, temperature=0)
    assert plain.object == "chat.completion" and plain.model == base
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert text and plain.choices[0].finish_reason in ("length", "stop")
    assert 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.model_extra["steering"]["vectors"] == []

    stream = client.chat.completions.create(
        model=base,
        messages=SEA,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text

    info = live.upload("sea-strong", direction(seed=0))
    steering = {"vectors": [{"name": "sea-strong", "strength": 1.0}]}
    steered = client.chat.completions.create(
        model=base, messages=SEA, max_tokens=12, temperature=0, extra_body={"steering": steering}
    )
    steered_text = steered.choices[0].message.content
    assert steered_text != text
    block = steered.model_extra["steering"]
    assert block == steered.to_dict()["steering"]
    assert block["vectors"] == [
        {"name": "sea-strong", "sha256": info["sha256"], "strength": 1.0, "layers": None, "positions": "all"}
    ]
    assert block["fingerprint"] and block["fingerprint"] != plain.model_extra["steering"]["fingerprint"]

    zero = client.chat.completions.create(
        model=base,
        messages=SEA,
        max_tokens=12,
        temperature=0,
        extra_body={"steering": {"vectors": [{"name": "sea-strong", "strength": 0.0}]}},
    )
    assert zero.choices[0].message.content == text

    completion = client.completions.create(
        model=base, prompt="The sea is", max_tokens=6, temperature=0, extra_body={"steering": steering}
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.model_extra["steering"]["vectors"][0]["name"] == "sea-strong"


# ---- concurrency: a request's text does not depend on what shares its batch ------------------------------
def test_concurrent_requests_with_different_profiles_match_solo(live):
    live.upload("alpha", direction(seed=11))
    live.upload("beta", direction(seed=12, norm=3.0, layers=range(8, 20)))
    saved = live.http.put("/v1/profiles/alpha-half", json={"vectors": [{"name": "alpha", "strength": 0.5}]})
    assert saved.status_code == 200, saved.text
    cases: dict[str, dict[str, Any]] = {
        "unsteered": {"messages": SEA},
        "strength0": {"messages": SEA, "steering": {"vectors": [{"name": "alpha", "strength": 0.0}]}},
        "alpha": {"messages": SEA, "steering": {"vectors": [{"name": "alpha"}]}},
        "profile": {"messages": SEA, "model": "alpha-half"},
        "beta-generated": {
            "messages": CITY,
            "steering": {"vectors": [{"name": "beta", "positions": "generated", "layers": [10, 12, 14]}]},
        },
        "composed": {
            "messages": CITY,
            "steering": {"vectors": [{"name": "beta"}, {"name": "alpha", "strength": -0.5}]},
        },
    }

    def run(name: str) -> str:
        return live.chat(max_tokens=20, **cases[name])["choices"][0]["message"]["content"]

    solo = {name: run(name) for name in cases}
    assert solo["strength0"] == solo["unsteered"]
    assert solo["alpha"] != solo["unsteered"]
    assert len(set(solo.values())) >= 4, solo  # the profiles really steer differently

    def batches_over_one() -> float:
        text = live.metrics()
        return metric(text, "steer_batch_size_count") - metric(text, "steer_batch_size_bucket", le="1.0")

    before = batches_over_one()
    barrier = threading.Barrier(len(cases))

    def together(name: str) -> str:
        barrier.wait(timeout=30)
        return run(name)

    with ThreadPoolExecutor(len(cases)) as pool:
        together_out = dict(zip(cases, pool.map(together, cases), strict=True))
    assert batches_over_one() > before  # the requests really shared forward passes
    assert together_out == solo
    assert together_out["strength0"] == together_out["unsteered"]


# ---- uploads: usable by the very next request; requests in flight keep their version --------------------
def test_upload_is_usable_by_the_next_request_and_does_not_disturb_requests_in_flight(live):
    v1, v2 = direction(seed=21), direction(seed=22)
    sha1 = live.upload("fresh", v1)["sha256"]
    body = {"messages": CITY, "max_new_tokens": 16, "steering": {"vectors": [{"name": "fresh"}]}}
    first = live.http.post("/generate", json=body).json()
    assert first["steering"]["vectors"] == [
        {"name": "fresh", "sha256": sha1, "strength": 1.0, "layers": None, "positions": "all"}
    ]

    with live.http.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        head = next(lines)
        assert head.startswith("data: {")
        sha2 = live.upload("fresh", v2)["sha256"]  # a new version while the stream is in flight
        assert sha2 != sha1
        after = live.http.post("/generate", json=body).json()  # the very next request uses it
        assert after["steering"]["vectors"] == [
            {"name": "fresh", "sha256": sha2, "strength": 1.0, "layers": None, "positions": "all"}
        ]
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in [head, *rest[:-1]]]
    assert events[-1]["steering"] == first["steering"]  # still the version it started with
    assert events[-1]["finish_reason"] == first["finish_reason"]
    assert "".join(e["text"] for e in events) == first["text"]  # and exactly what v1 gives alone
    pin = {"vectors": [{"name": f"fresh@{sha1[:10]}"}]}
    pinned = live.http.post("/generate", json={**body, "steering": pin})
    assert pinned.json()["text"] == first["text"]


# ---- disconnect mid-stream --------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_row(live):
    def running() -> float | None:
        return metric(live.metrics(), "steer_running_requests")

    wait_for(lambda: running() == 0, timeout=30, what="an idle server")
    body = {"messages": SEA, "max_tokens": 300, "temperature": 0, "stream": True}
    with live.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: {")
        wait_for(lambda: running() == 1, timeout=10, what="the request to run")
    # the connection is closed with ~300 tokens still to go
    wait_for(lambda: running() == 0, timeout=10, what="the running gauge to return to 0")
    assert metric(live.metrics(), "steer_waiting_requests") == 0
    after = live.chat(SEA, max_tokens=6)
    assert after["choices"][0]["finish_reason"] == "length" and after["usage"]["completion_tokens"] == 6
