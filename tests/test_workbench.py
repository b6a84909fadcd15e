"""The workbench routes on a tiny random Llama (in-process ASGI, and uvicorn on a real socket where a client
must hang up): sweeps against the same requests sent one by one (tokens, and logits read at the engine's
LM head), strength 0 against the unsteered rows bitwise, vectors computed over HTTP against the library,
norms against an independent computation, the playground's files, and every refusal."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import add_artifact, red_artifact, tiny_loaded, uvicorn_thread, wait_for

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState
from server.workbench import REFERENCE_TEXTS
from steering_vectors import Artifact
from steering_vectors.compute import compute_from_texts, compute_vector, encode_pairs

PROMPT = "Hello there"
STRENGTHS = [-2.0, 0.0, 1.0, 3.0]
PAIRS = [
    {"positive": "I love this, thank you!", "negative": "I hate this, go away."},
    {"positive": "What a wonderful morning.", "negative": "What a miserable morning."},
    {"positive": "You did a great job.", "negative": "You did a terrible job."},
]


def upload(client: TestClient, name: str, art: Artifact, headers: dict | None = None) -> dict:
    files = {"file": ("v.safetensors", art.to_bytes(), "application/octet-stream")}
    resp = client.post("/v1/vectors", data={"name": name}, files=files, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def check_error(resp: httpx.Response, status: int, match: str) -> None:
    assert resp.status_code == status, resp.text
    assert match in resp.json()["error"]["message"], resp.json()


class HeadRecorder:
    """The logits of every forward pass of the engine, read at the LM head: one [rows, V] per pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = model.lm_head.register_forward_hook(self._record)

    def _record(self, _module, _args, out: torch.Tensor) -> None:
        self.calls.append(out.detach().reshape(-1, out.shape[-1]).clone())

    def take(self) -> list[torch.Tensor]:
        calls, self.calls = self.calls, []
        return calls


def sweep(client: TestClient, strengths: list[float], headers: dict | None = None, **extra: Any) -> dict:
    body = {"prompt": PROMPT, "vector": "v", "strengths": strengths, "max_new_tokens": 6, **extra}
    resp = client.post("/v1/sweep", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---- sweep ------------------------------------------------------------------------------------------------
def test_sweep_rows_equal_the_same_requests_one_by_one(make_server):
    state, client = make_server()
    model = state.loaded.model
    info = upload(client, "v", add_artifact(model, norm=8.0))
    head = HeadRecorder(model)
    res = sweep(client, STRENGTHS)
    batched = head.take()
    assert [r["strength"] for r in res["results"]] == STRENGTHS
    assert all(
        r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6 for r in res["results"]
    )
    assert res["steering"] == {
        "name": "v", "sha256": info["sha256"], "kind": "add", "layers": [0, 1], "positions": "all"
    }  # fmt: skip
    # one batch: the prefill and every decode step carry the k rows together
    assert [c.shape[0] for c in batched] == [len(STRENGTHS)] * 6
    for i, (w, row) in enumerate(zip(STRENGTHS, res["results"], strict=True)):
        body = {
            "prompt": PROMPT,
            "max_new_tokens": 6,
            "steering": {"vectors": [{"name": "v", "strength": w}]},
        }
        solo = client.post("/generate", json=body).json()
        solo_calls = head.take()
        assert row["text"] == solo["text"] and row["steering"] == solo["steering"], w
        assert [c.shape[0] for c in solo_calls] == [1] * 6
        for step, (b, s) in enumerate(zip(batched, solo_calls, strict=True)):
            torch.testing.assert_close(b[i], s[0], atol=1e-4, rtol=0, msg=f"strength {w}, step {step}")
    assert len({r["text"] for r in res["results"]}) > 1  # the vector does change the reply
    plain = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6}).json()
    assert res["results"][1]["text"] == plain["text"]  # strength 0 is the unsteered reply
    head.handle.remove()


def test_strength_zero_row_is_bitwise_the_unsteered_row(make_server):
    state, client = make_server()
    model = state.loaded.model
    upload(client, "v", add_artifact(model, norm=8.0))
    head = HeadRecorder(model)
    mixed = sweep(client, STRENGTHS)
    mixed_calls = head.take()
    unsteered = sweep(client, [0.0] * len(STRENGTHS))  # the same batch shape, no row steered
    plain_calls = head.take()
    head.handle.remove()
    assert mixed["results"][1]["text"] == unsteered["results"][1]["text"]
    for m, p in zip(mixed_calls, plain_calls, strict=True):
        assert torch.equal(m[1], p[1])  # the strength-0 row, bitwise
        assert not torch.equal(m[3], p[3])


def test_sweep_with_messages_layers_positions_and_a_pinned_version(make_server):
    state, client = make_server()
    model = state.loaded.model
    first = upload(client, "v", add_artifact(model, norm=8.0, seed=2))
    upload(client, "v", add_artifact(model, norm=8.0, seed=5))  # a newer version
    body = {
        "messages": [{"role": "user", "content": "Hi!"}],
        "vector": f"v@{first['sha256'][:12]}",
        "strengths": [0.5, 2.0],
        "layers": [1],
        "positions": "generated",
        "max_new_tokens": 5,
        "temperature": 0.8,
        "seed": 7,
    }
    res = client.post("/v1/sweep", json=body).json()
    assert res["steering"]["sha256"] == first["sha256"] and res["steering"]["layers"] == [1]
    for w, row in zip(body["strengths"], res["results"], strict=True):
        entry = {"name": body["vector"], "strength": w, "layers": [1], "positions": "generated"}
        solo = {k: body[k] for k in ("messages", "max_new_tokens", "temperature", "seed")}
        want = client.post("/generate", json={**solo, "steering": {"vectors": [entry]}}).json()
        assert row["text"] == want["text"] and row["steering"] == want["steering"]


@pytest.mark.parametrize(
    ("change", "status", "match"),
    [
        ({"logprobs": True}, 400, "'logprobs' is not supported"),
        ({"strengths": [1.0] * 9}, 400, "9 rows do not fit one batch of --max-batch-size 8"),
        ({"strengths": [1.0] * 17}, 422, "strengths"),
        ({"strengths": [1e9]}, 422, "within ±100"),
        ({"strengths": []}, 422, "strengths"),
        ({"vector": "missing"}, 404, "missing"),
        ({"layers": [5]}, 400, "layer 5 out of range"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "exactly one of 'prompt' or 'messages'"),
        ({"steering": {"vectors": []}}, 422, "steering"),
        ({"max_new_tokens": 5000}, 400, "exceeds the cap"),
    ],
)
def test_sweep_refusals_name_the_problem(make_server, change, status, match):
    state, client = make_server()
    upload(client, "v", add_artifact(state.loaded.model))
    body = {"prompt": PROMPT, "vector": "v", "strengths": [0.0, 1.0], "max_new_tokens": 4, **change}
    check_error(client.post("/v1/sweep", json=body), status, match)
    assert state.engine.waiting == 0


def test_a_full_queue_refuses_the_whole_sweep(make_server):
    state, client = make_server(max_queue=2, max_batch_size=8)
    upload(client, "v", add_artifact(state.loaded.model))
    body = {"prompt": PROMPT, "vector": "v", "strengths": [0.0, 1.0, 2.0, 3.0], "max_new_tokens": 4}
    resp = client.post("/v1/sweep", json=body)
    check_error(resp, 429, "queue full")
    assert "Retry-After" in resp.headers
    wait_for(lambda: state.engine.idle(), what="the rows queued before the refusal to be dropped")
    assert sweep(client, [1.0])["results"][0]["finish_reason"] == "length"  # the engine carries on


def test_a_client_that_hangs_up_frees_every_row(tokenizer, tmp_path):
    loaded = tiny_loaded(tokenizer)
    loaded.model.register_forward_pre_hook(lambda _m, _a: time.sleep(0.02))
    state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "v", drain_timeout=5.0))
    state.load(loaded)
    state.store.add("v", add_artifact(loaded.model).to_bytes())
    with uvicorn_thread(create_app(state)) as url:
        body = {"prompt": PROMPT, "vector": "v", "strengths": [0, 1, 2], "max_new_tokens": 500}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/sweep", json=body, timeout=1.0)
        wait_for(lambda: state.engine.idle(), timeout=15, what="the sweep's rows to be freed")
    state.engine.stop()


# ---- compute ----------------------------------------------------------------------------------------------
def test_computed_vector_equals_the_library_and_serves_the_next_request(make_server, tokenizer):
    state, client = make_server()
    body = {"name": "kind", "method": "pca", "pairs": PAIRS, "layers": [0, 1], "description": "tone"}
    resp = client.post("/v1/vectors/compute", json=body)
    assert resp.status_code == 201, resp.text
    info = resp.json()
    assert (info["name"], info["kind"], info["method"], info["layers"]) == ("kind", "add", "pca", [0, 1])
    assert info["description"] == "tone"
    ids = encode_pairs(tokenizer, [(p["positive"], p["negative"]) for p in PAIRS], 256)
    want = compute_vector(state.loaded.model, ids, method="pca", layers=[0, 1])
    got = state.store.resolve("kind")
    assert got.sha256 == info["sha256"]
    for layer in (0, 1):
        assert torch.equal(got.direction(layer), want.direction(layer))
    assert got.extra["pairs"] == "3" and got.extra["base_model"] == "tiny-llama"
    assert got.extra["relative_norms"] == want.extra["relative_norms"]
    listed = client.get("/v1/vectors").json()["data"]
    assert [v["name"] for v in listed] == ["kind"]
    body = {"prompt": PROMPT, "vector": "kind", "strengths": [0.0, 50.0], "max_new_tokens": 4}
    rows = client.post("/v1/sweep", json=body).json()["results"]
    assert rows[0]["text"] != rows[1]["text"]


@pytest.mark.parametrize(
    ("change", "status", "match"),
    [
        ({"pairs": PAIRS[:1]}, 422, "pairs"),
        ({"pairs": [{"positive": "a", "negative": ""}] * 2}, 422, "negative"),
        ({"pairs": [{"positive": "a", "negative": "b", "prompt": "c"}] * 2}, 422, "prompt"),
        ({"method": "median"}, 422, "method"),
        ({"layers": [2]}, 400, "layers [2] out of range"),
        ({"name": "bad name!"}, 400, "invalid name"),
        (
            {"pairs": [{"positive": "word " * 40, "negative": "b"}] * 2},
            400,
            "pairs[0].positive: 41 tokens; each text must have 1 to 32",
        ),
    ],
)
def test_compute_refusals_name_the_problem(make_server, change, status, match):
    _, client = make_server(compute_max_tokens=32)
    body = {"name": "v", "pairs": PAIRS, **change}
    check_error(client.post("/v1/vectors/compute", json=body), status, match)
    assert client.get("/v1/vectors").json()["data"] == []


def test_compute_needs_the_admin_key(make_server):
    _, client = make_server(api_key="user", admin_key="admin")
    body = {"name": "v", "pairs": PAIRS}
    check_error(client.post("/v1/vectors/compute", json=body), 401, "missing")
    check_error(client.post("/v1/vectors/compute", json=body, headers=bearer("user")), 403, "admin key")
    assert client.post("/v1/vectors/compute", json=body, headers=bearer("admin")).status_code == 201


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_one_computation_at_a_time_even_when_its_client_hangs_up(tokenizer, tmp_path, monkeypatch):
    import server.workbench as wb

    started, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Artifact:
        started.set()
        release.wait(30)
        return compute_from_texts(*args, **kwargs)

    monkeypatch.setattr(wb, "compute_from_texts", slow)
    state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "v", drain_timeout=5.0))
    state.load(tiny_loaded(tokenizer))
    body = {"name": "one", "pairs": PAIRS}
    with uvicorn_thread(create_app(state)) as url:
        with pytest.raises(httpx.ReadTimeout):  # the first client gives up; its computation goes on
            httpx.post(url + "/v1/vectors/compute", json=body, timeout=1.0)
        assert started.wait(30)
        busy = httpx.post(url + "/v1/vectors/compute", json={**body, "name": "two"})
        check_error(busy, 429, "already running")
        assert busy.headers["Retry-After"] == "5"
        ok = httpx.post(url + "/generate", json={"prompt": PROMPT, "max_new_tokens": 3})
        assert ok.status_code == 200  # the event loop and the engine keep serving meanwhile
        release.set()
        wait_for(lambda: "one" in state.store, timeout=30, what="the first computation to register")
        assert httpx.post(url + "/v1/vectors/compute", json={**body, "name": "two"}).status_code == 201
    state.engine.stop()


# ---- norms ------------------------------------------------------------------------------------------------
def test_relative_norms_against_the_models_hidden_states(make_server, tokenizer):
    state, client = make_server()
    model = state.loaded.model
    art = add_artifact(model, norm=3.0)
    upload(client, "v", art)
    upload(client, "r", red_artifact(model))
    got = client.get("/v1/vectors/v/norms").json()
    assert (got["name"], got["kind"], got["layers"]) == ("v", "add", [0, 1])
    ref = copy.deepcopy(model)
    ref.config.tie_last_hidden_states = False  # the last entry before the final norm, where add applies
    norms: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for text in REFERENCE_TEXTS:
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            hs = ref(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in (0, 1):
                norms[layer].append(float(hs[layer + 1][0, -1].norm()))
    for layer in (0, 1):
        want = float(art.direction(layer).norm()) / np.mean(norms[layer])
        assert got["relative"][str(layer)] == pytest.approx(want, rel=1e-5)
        assert got["norms"][f"layers.{layer}.direction"] == pytest.approx(3.0, rel=1e-5)
    red = client.get("/v1/vectors/r/norms").json()
    assert red["relative"] is None and set(red["norms"]) == {
        f"layers.{i}.{p}" for i in (0, 1) for p in ("scale", "bias")
    }
    check_error(client.get("/v1/vectors/missing/norms"), 404, "missing")


# ---- the playground's files --------------------------------------------------------------------------------
def test_playground_files_are_served_without_a_key_and_load_nothing_external(make_server):
    _, client = make_server(api_key="user")
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, media in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = client.get(f"/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert f"/playground/{name}" in page.text
        assert "://" not in asset.text  # nothing from elsewhere
    assert "://" not in page.text
    for bad in ("index.html", "x.js", "..%2Fapp.py", "%2e%2e"):
        assert client.get(f"/playground/{bad}").status_code == 404
    check_error(client.get("/v1/vectors"), 401, "missing API key")  # the API itself still needs the key
    assert "/playground" not in client.get("/openapi.json", headers=bearer("user")).json()["paths"]
