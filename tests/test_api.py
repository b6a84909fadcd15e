"""The HTTP API of SPEC §6 in-process (ASGI) with a tiny random Llama: every error status and its body,
auth on every mutating route, limits, overload, readiness and draining, uploads (pickles never run),
restart persistence, steering semantics, streaming, stop strings and metrics. One test runs uvicorn on
a real socket to prove a client that disconnects mid-stream frees its row."""

from __future__ import annotations

import io
import json
import pickle
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from server.engine import SamplingParams
from server.state import ServerState
from steering_vectors import Artifact
from tests.helpers import (
    TINY_MODEL_ID,
    PickleCanary,
    add_artifact,
    lora_artifact,
    metric,
    red_artifact,
    tiny_llama,
    tiny_loaded,
    uvicorn_thread,
    wait_for,
)

MODEL_ID = TINY_MODEL_ID
ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-secret"}
WRONG = {"Authorization": "Bearer not-the-key"}


# ---- helpers ---------------------------------------------------------------------------------------------
def check_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    """Assert ``status`` and the SPEC §6 error body ``{"error": {"message", "type", "code"}}``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code"}, err
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def upload(
    client: TestClient,
    name: str,
    data: bytes | Artifact,
    headers: dict[str, str] | None = None,
    filename: str = "vector.safetensors",
    description: str | None = None,
) -> httpx.Response:
    raw = data.to_bytes() if isinstance(data, Artifact) else data
    form = {"name": name, **({"description": description} if description is not None else {})}
    return client.post(
        "/v1/vectors", data=form, headers=headers, files={"file": (filename, raw, "application/octet-stream")}
    )


def strong_add(model: Any, seed: int = 2) -> Artifact:
    """An ``add`` artifact strong enough to change the tiny model's greedy text."""
    return add_artifact(model, seed=seed, norm=8.0)


def generate(
    client: TestClient,
    prompt: str = "Hello there",
    max_new_tokens: int = 6,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    resp = client.post(
        "/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens, **extra}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The ``data:`` payloads of an SSE stream, JSON-decoded except the final ``[DONE]``."""
    out: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture
def server(make_server):
    return make_server()


# ---- 401 / 403: auth ------------------------------------------------------------------------------------
def test_api_key_required_except_health_ready_metrics(make_server):
    _, client = make_server(api_key="user-secret", admin_key="admin-secret")
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200, path
    body = {"prompt": "Hi", "max_new_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    calls = [
        ("POST", "/generate", body),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/vectors", None),
        ("GET", "/v1/vectors/x", None),
        ("GET", "/v1/profiles", None),
        ("GET", "/v1/profiles/x", None),
    ]
    for method, path, payload in calls:
        for headers in ({}, WRONG, {"Authorization": "Basic user-secret"}, {"Authorization": "user-secret"}):
            err = check_error(client.request(method, path, json=payload, headers=headers), 401)
            assert err["type"] == "authentication_error"
    assert generate(client, max_new_tokens=2, headers=USER)["finish_reason"] == "length"
    assert client.get("/v1/models", headers=USER).status_code == 200
    assert client.get("/v1/vectors", headers=USER).json() == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


def test_every_mutating_route_needs_the_admin_key(make_server):
    _, client = make_server(api_key="user-secret", admin_key="admin-secret")
    art = add_artifact(tiny_llama())
    profile = {"vectors": [{"name": "vec", "strength": 0.5}]}

    def attempts(call: Callable[[dict[str, str]], httpx.Response]) -> None:
        for headers, status in (({}, 401), (WRONG, 401), (USER, 403)):
            err = check_error(call(headers), status)
            assert err["type"] == ("authentication_error" if status == 401 else "permission_error")

    # POST /v1/vectors
    attempts(lambda h: upload(client, "vec", art, headers=h))
    assert client.get("/v1/vectors", headers=USER).json()["data"] == []
    resp = upload(client, "vec", art, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    assert resp.json()["sha256"] == art.sha256
    # PUT /v1/profiles/{name}
    attempts(lambda h: client.put("/v1/profiles/p", json=profile, headers=h))
    assert client.get("/v1/profiles", headers=USER).json()["data"] == []
    resp = client.put("/v1/profiles/p", json=profile, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    # DELETE /v1/profiles/{name}
    attempts(lambda h: client.delete("/v1/profiles/p", headers=h))
    assert client.get("/v1/profiles/p", headers=USER).status_code == 200
    assert client.delete("/v1/profiles/p", headers=ADMIN).json() == {"deleted": "p"}
    check_error(client.get("/v1/profiles/p", headers=USER), 404)
    # DELETE /v1/vectors/{name}
    attempts(lambda h: client.delete("/v1/vectors/vec", headers=h))
    assert client.get("/v1/vectors/vec", headers=USER).status_code == 200
    deleted = client.delete("/v1/vectors/vec", headers=ADMIN).json()
    assert deleted == {"deleted": "vec", "versions": [art.sha256]}
    check_error(client.get("/v1/vectors/vec", headers=USER), 404)
    text = client.get("/metrics").text
    assert metric(text, "steer_rejected_requests_total", reason="unauthorized") == 8
    assert metric(text, "steer_rejected_requests_total", reason="forbidden") == 4
    assert metric(text, "steer_vector_uploads_total", result="unauthorized") == 2
    assert metric(text, "steer_vector_uploads_total", result="forbidden") == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_mutating_routes_forbidden_without_admin_key_off_loopback(make_server, host):
    _, client = make_server(host=host)
    art = add_artifact(tiny_llama())
    calls = [
        lambda: upload(client, "vec", art),
        lambda: client.delete("/v1/vectors/vec"),
        lambda: client.put("/v1/profiles/p", json={"vectors": []}),
        lambda: client.delete("/v1/profiles/p"),
    ]
    for call in calls:
        assert check_error(call(), 403)["type"] == "permission_error"
    assert client.get("/v1/vectors").json()["data"] == []
    assert generate(client, max_new_tokens=2)["finish_reason"] == "length"  # reading and generating work
    text = client.get("/metrics").text
    assert metric(text, "steer_rejected_requests_total", reason="forbidden") == 4
    assert metric(text, "steer_vector_uploads_total", result="forbidden") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_mutating_routes_open_without_admin_key_on_loopback(make_server, host):
    _, client = make_server(host=host)
    assert upload(client, "vec", add_artifact(tiny_llama())).status_code == 201
    assert client.put("/v1/profiles/p", json={"vectors": [{"name": "vec"}]}).status_code == 200
    assert client.delete("/v1/profiles/p").status_code == 200
    assert client.delete("/v1/vectors/vec").status_code == 200


# ---- 400 -------------------------------------------------------------------------------------------------
def test_invalid_input_is_400(make_server):
    _, client = make_server(max_new_tokens=64)
    assert upload(client, "vec", strong_add(tiny_llama())).status_code == 201

    def bad(path: str, body: dict[str, Any], needle: str) -> None:
        err = check_error(client.post(path, json=body), 400)
        assert err["type"] == "invalid_request_error"
        assert needle in err["message"], (needle, err["message"])

    msgs = [{"role": "user", "content": "Hi"}]
    bad("/generate", {"prompt": "Hi", "messages": msgs}, "exactly one")
    bad("/generate", {"max_new_tokens": 3}, "exactly one")
    bad(
        "/generate",
        {"prompt": "Hi", "steering": {"vectors": [{"name": "vec", "layers": [10**6]}]}},
        "out of range",
    )
    bad("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "vec", "layers": [-1]}]}}, "layers")
    bad("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "../etc/passwd"}]}}, "invalid name")
    bad("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "vec@XYZ"}]}}, "pin")
    bad("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "vec"}] * 17}}, "at most")
    bad("/generate", {"prompt": "Hi", "max_new_tokens": 65}, "cap")
    bad("/generate", {"prompt": "Hi " * 500, "max_new_tokens": 32}, "context length")
    bad("/generate", {"prompt": "", "max_new_tokens": 3}, "empty")
    bad("/generate", {"prompt": "Hi", "stop": [f"s{i}" for i in range(9)]}, "stop")
    bad("/generate", {"prompt": "Hi", "stop": [""]}, "stop")
    bad("/v1/chat/completions", {"messages": msgs, "n": 2}, "'n'")
    bad("/v1/completions", {"prompt": ["a", "b"]}, "single prompt")
    # bad uploads
    for name, data, needle in (
        ("bad name!", add_artifact(tiny_llama()).to_bytes(), "invalid name"),
        ("junk", b"\x00" * 64, "safetensors"),
        ("short", b"abc", "truncated"),
    ):
        err = check_error(upload(client, name, data), 400)
        assert needle in err["message"], err
    err = check_error(client.post("/v1/vectors", files={"name": (None, "nofile")}), 400)
    assert "file" in err["message"]
    err = check_error(client.post("/v1/vectors", data={"name": "nofile"}), 415)  # not multipart
    assert "multipart/form-data" in err["message"]
    err = check_error(client.post("/v1/vectors", files={"file": ("v.safetensors", b"x")}), 400)
    assert "name" in err["message"]
    err = check_error(client.put("/v1/profiles/bad name", json={"vectors": []}), 400)
    assert "invalid name" in err["message"]
    assert [v["name"] for v in client.get("/v1/vectors").json()["data"]] == ["vec"]


# ---- 404 -------------------------------------------------------------------------------------------------
def test_unknown_vectors_profiles_and_models_are_404(server):
    _, client = server
    art = strong_add(tiny_llama())
    assert upload(client, "vec", art).status_code == 201
    other_pin = "0000" if not art.sha256.startswith("0000") else "ffff"
    cases = [
        client.post("/generate", json={"prompt": "Hi", "steering": {"vectors": [{"name": "nope"}]}}),
        client.post(
            "/generate", json={"prompt": "Hi", "steering": {"vectors": [{"name": f"vec@{other_pin}"}]}}
        ),
        client.post("/generate", json={"prompt": "Hi", "steering": "no-such-profile"}),
        client.post(
            "/v1/chat/completions",
            json={"model": "no-such-profile", "messages": [{"role": "user", "content": "Hi"}]},
        ),
        client.post("/v1/completions", json={"model": "no-such-profile", "prompt": "Hi"}),
        client.get("/v1/vectors/nope"),
        client.delete("/v1/vectors/nope"),
        client.get("/v1/profiles/nope"),
        client.delete("/v1/profiles/nope"),
        client.put("/v1/profiles/p", json={"vectors": [{"name": "nope"}]}),
        client.get("/no/such/route"),
    ]
    for resp in cases:
        check_error(resp, 404)
    assert "no-such-profile" in cases[3].json()["error"]["message"]
    check_error(client.get("/v1/profiles/p"), 404)  # the failed PUT saved nothing


# ---- 409 -------------------------------------------------------------------------------------------------
def test_incompatible_artifact_is_409(server):
    _, client = server
    narrow = Artifact(
        kind="add",
        tensors={"layers.0.direction": torch.ones(32)},
        hidden_size=32,
        num_layers=2,
        model_type="llama",
        method="mean-diff",
    )
    err = check_error(upload(client, "narrow", narrow), 409)
    assert err["type"] == "incompatible_artifact" and "hidden_size" in err["message"]
    deep = add_artifact(tiny_llama(layers=4))
    err = check_error(upload(client, "deep", deep), 409)
    assert "num_layers" in err["message"]
    wide_lora = lora_artifact(tiny_llama(hidden=128))
    check_error(upload(client, "wide", wide_lora), 409)
    assert client.get("/v1/vectors").json()["data"] == []
    # the same kinds that fit are accepted
    assert upload(client, "red", red_artifact(tiny_llama())).status_code == 201
    assert upload(client, "lora", lora_artifact(tiny_llama())).status_code == 201


# ---- 413 -------------------------------------------------------------------------------------------------
def test_too_large_is_413_before_parsing(make_server):
    state, client = make_server(max_upload_bytes=4096, max_body_bytes=8192)
    # an upload body past the cap: garbage that would be a 400 if anything parsed it
    huge = b"x" * (4096 + 1024 * 1024 + 1)
    resp = client.post(
        "/v1/vectors", content=huge, headers={"Content-Type": "multipart/form-data; boundary=zzz"}
    )
    assert check_error(resp, 413)["type"] == "request_too_large"
    # the same without a Content-Length (chunked): counted while reading
    resp = client.post(
        "/v1/vectors",
        content=iter([b"x" * 65536] * 20),
        headers={"Content-Type": "multipart/form-data; boundary=zzz"},
    )
    check_error(resp, 413)
    # a well-formed multipart whose file is over max_upload_bytes (never parsed as an artifact)
    check_error(upload(client, "big", b"\x80" + b"x" * 5000), 413)
    # a JSON body over max_body_bytes on the generation and profile routes
    check_error(client.post("/generate", json={"prompt": "a" * 9000, "max_new_tokens": 1}), 413)
    check_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 9000}]}), 413
    )
    check_error(client.put("/v1/profiles/p", json={"vectors": [], "description": "d" * 9000}), 413)
    check_error(
        client.post(
            "/generate",
            content=iter([b"{" + b" " * 9000 + b"}"]),
            headers={"Content-Type": "application/json"},
        ),
        413,
    )
    text = client.get("/metrics").text
    assert metric(text, "steer_vector_uploads_total", result="too_large") == 3
    assert metric(text, "steer_rejected_requests_total", reason="too_large") == 7
    assert client.get("/v1/vectors").json()["data"] == []
    assert generate(client, max_new_tokens=2)["finish_reason"] == "length"  # a normal body still passes


# ---- 422 -------------------------------------------------------------------------------------------------
def test_schema_errors_are_422(server):
    _, client = server
    msgs = [{"role": "user", "content": "Hi"}]
    bodies = [
        ("/generate", {"prompt": "Hi", "max_new_tokens": 0}),
        ("/generate", {"prompt": "Hi", "max_new_tokens": "many"}),
        ("/generate", {"prompt": 123}),
        ("/generate", {"prompt": "Hi", "temperature": -1}),
        ("/generate", {"prompt": "Hi", "top_p": 0}),
        ("/generate", {"prompt": "Hi", "stream": "maybe"}),
        ("/generate", {"prompt": "Hi", "unknown_field": 1}),
        ("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "v", "positions": "middle"}]}}),
        ("/generate", {"prompt": "Hi", "steering": {"vectors": [{"name": "v", "strength": "strong"}]}}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}),
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 0}),
        ("/v1/completions", {"max_tokens": 3}),
    ]
    for path, body in bodies:
        err = check_error(client.post(path, json=body), 422)
        assert err["type"] == "invalid_request_error", (path, body)
    check_error(
        client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"}), 422
    )
    check_error(client.put("/v1/profiles/p", json={"vectors": [{"name": "v", "positions": "middle"}]}), 422)


# ---- 429 -------------------------------------------------------------------------------------------------
def test_overload_is_429_with_retry_after(make_server, tokenizer):
    state, client = make_server(max_batch_size=1, max_queue=1)
    engine = state.engine
    ids = tokenizer.encode("Hello", add_special_tokens=False)
    long = SamplingParams(max_new_tokens=400)
    running = engine.submit(ids, long)
    wait_for(lambda: engine.running == 1 and engine.waiting == 0, what="the first request to run")
    queued = engine.submit(ids, long)  # fills the queue of one
    try:
        for path, body in (
            ("/generate", {"prompt": "Hi", "max_new_tokens": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
            ("/v1/completions", {"prompt": "Hi"}),
        ):
            resp = client.post(path, json=body)
            err = check_error(resp, 429)
            assert err["type"] == "overloaded"
            assert int(resp.headers["Retry-After"]) >= 1
        text = client.get("/metrics").text
        assert metric(text, "steer_rejected_requests_total", reason="queue_full") == 3
        assert metric(text, "steer_requests_total", route="/generate", status="429") == 1
        assert metric(text, "steer_running_requests") == 1
        assert metric(text, "steer_waiting_requests") == 1
    finally:
        running.cancel()
        queued.cancel()
    assert running.wait(timeout=10).finish_reason == "cancelled"
    assert queued.wait(timeout=10).finish_reason == "cancelled"
    wait_for(engine.idle, what="the engine to go idle")
    assert generate(client, max_new_tokens=2)["finish_reason"] == "length"


# ---- 503 -------------------------------------------------------------------------------------------------
def test_not_loaded_is_503(make_server):
    state, client = make_server(load=False)  # no lifespan: the model is never loaded
    assert client.get("/health").json() == {"status": "ok"}
    resp = client.get("/ready")
    assert check_error(resp, 503)["type"] == "unavailable"
    assert "Retry-After" in resp.headers
    check_error(client.post("/generate", json={"prompt": "Hi"}), 503)
    check_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}), 503
    )
    check_error(client.get("/v1/models"), 503)
    check_error(client.get("/v1/vectors"), 503)
    assert metric(client.get("/metrics").text, "steer_rejected_requests_total", reason="not_ready") == 4


def test_load_failure_keeps_ready_503(make_server, tmp_path):
    state, client = make_server(load=False, model=str(tmp_path / "no-such-model"))
    with client:  # the lifespan starts loading in the background; it fails
        wait_for(lambda: state.load_error is not None, what="the load to fail")
        err = check_error(client.get("/ready"), 503)
        # /ready names no path and no library error (they are in the log)
        assert err["message"] == "not ready: the model failed to load"
        assert client.get("/health").status_code == 200
        check_error(client.post("/generate", json={"prompt": "Hi"}), 503)


def test_draining_refuses_new_requests_and_finishes_old_ones(server, tokenizer):
    state, client = server
    assert client.get("/ready").status_code == 200
    handle = state.engine.submit(
        tokenizer.encode("Hello", add_special_tokens=False), SamplingParams(max_new_tokens=20)
    )
    state.begin_drain()
    resp = client.get("/ready")
    assert "draining" in check_error(resp, 503)["message"]
    resp = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2})
    check_error(resp, 503)
    assert "Retry-After" in resp.headers
    check_error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}), 503
    )
    assert client.get("/health").status_code == 200
    result = handle.wait(timeout=30)  # the request in flight runs to completion
    assert result.finish_reason == "length" and result.completion_tokens == 20
    assert metric(client.get("/metrics").text, "steer_rejected_requests_total", reason="draining") == 2


# ---- uploads: pickles are rejected and never executed ---------------------------------------------------
def test_pickle_and_torch_save_uploads_are_rejected_and_never_executed(server, tmp_path):
    state, client = server
    # the canary works: unpickling it does create its file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(PickleCanary(probe)))
    assert probe.exists()

    canary = tmp_path / "canary"
    buf = io.BytesIO()
    torch.save({"layers.0.direction": torch.zeros(64), "x": PickleCanary(canary)}, buf)
    uploads = [
        ("pkl", pickle.dumps(PickleCanary(canary), protocol=5), "evil.safetensors", "pickle"),
        ("pkl2", pickle.dumps(PickleCanary(canary), protocol=2), "evil.pt", "pickle"),
        ("pkl0", pickle.dumps(PickleCanary(canary), protocol=0), "evil.pkl", ""),
        ("zip", buf.getvalue(), "evil.pt", "zip"),
    ]
    for name, data, filename, needle in uploads:
        err = check_error(upload(client, name, data, filename=filename), 400)
        assert needle in err["message"], err
    assert not canary.exists()
    assert client.get("/v1/vectors").json()["data"] == []
    leftovers = [p for p in Path(state.config.vector_dir).rglob("*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []
    assert metric(client.get("/metrics").text, "steer_vector_uploads_total", result="invalid") == 4


# ---- restart persistence ----------------------------------------------------------------------------------
def test_vectors_and_profiles_persist_across_restart(tmp_path, tokenizer):
    vdir = tmp_path / "vectors"
    cfg = {"vector_dir": vdir, "quantization": "none", "drain_timeout": 5.0}
    model = tiny_llama()
    first, second, red = strong_add(model, seed=2), strong_add(model, seed=7), red_artifact(model)
    state = ServerState(ServerConfig(**cfg))
    state.load(tiny_loaded(tokenizer))
    with TestClient(create_app(state)) as client:
        assert upload(client, "vec", first, description="first").status_code == 201
        assert upload(client, "vec", second).status_code == 201
        assert upload(client, "red", red).status_code == 201
        profile = {"vectors": [{"name": "vec", "strength": 0.5}, {"name": "red", "layers": [1]}]}
        assert client.put("/v1/profiles/mix", json=profile).status_code == 200
        vectors = client.get("/v1/vectors").json()["data"]
        profiles = client.get("/v1/profiles").json()["data"]
        by_profile = generate(client, steering="mix")
        pinned = generate(client, steering={"vectors": [{"name": f"vec@{first.sha256[:8]}"}]})

    state2 = ServerState(ServerConfig(**cfg))  # a new process: new model object, same vector_dir
    state2.load(tiny_loaded(tokenizer))
    with TestClient(create_app(state2)) as client:
        assert client.get("/v1/vectors").json()["data"] == vectors
        assert [(v["name"], v["sha256"]) for v in vectors] == [("red", red.sha256), ("vec", second.sha256)]
        assert vectors[1]["versions"] == [first.sha256, second.sha256]
        assert client.get("/v1/profiles").json()["data"] == profiles
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL_ID, "mix"]
        assert generate(client, steering="mix") == by_profile
        assert generate(client, steering={"vectors": [{"name": f"vec@{first.sha256[:8]}"}]}) == pinned
        assert metric(client.get("/metrics").text, "steer_vectors_loaded") == 2


# ---- steering semantics ------------------------------------------------------------------------------------
def test_steering_response_strength_zero_pins_and_profiles(server):
    _, client = server
    model = tiny_llama()
    v1, v2 = strong_add(model, seed=2), strong_add(model, seed=9)
    info = upload(client, "vec", v1, description="a test vector")
    assert info.status_code == 201
    body = info.json()
    assert body["name"] == "vec" and body["sha256"] == v1.sha256 and body["kind"] == "add"
    assert body["layers"] == [0, 1] and body["method"] == "mean-diff"
    assert body["description"] == "a test vector"
    assert client.get("/v1/vectors/vec").json() == body

    plain = generate(client)
    assert plain["steering"]["vectors"] == []
    assert re.fullmatch(r"[0-9a-f]{8,}", plain["steering"]["fingerprint"])
    steered = generate(
        client, steering={"vectors": [{"name": "vec", "strength": 1.0, "layers": None, "positions": "all"}]}
    )
    assert steered["text"] != plain["text"]
    assert steered["steering"]["vectors"] == [
        {"name": "vec", "sha256": v1.sha256, "strength": 1.0, "layers": None, "positions": "all"}
    ]
    assert re.fullmatch(r"[0-9a-f]{8,}", steered["steering"]["fingerprint"])
    assert steered["steering"]["fingerprint"] != plain["steering"]["fingerprint"]
    assert generate(client, steering={"vectors": [{"name": "vec"}]}) == steered  # reproducible

    zero = generate(client, steering={"vectors": [{"name": "vec", "strength": 0}]})
    assert zero["text"] == plain["text"]
    assert zero["steering"]["vectors"] == [
        {"name": "vec", "sha256": v1.sha256, "strength": 0.0, "layers": None, "positions": "all"}
    ]
    assert zero["steering"]["fingerprint"] != steered["steering"]["fingerprint"]

    # a re-upload replaces the current version; the old one stays reachable by pin
    assert upload(client, "vec", v2).json()["versions"] == [v1.sha256, v2.sha256]
    steered2 = generate(client, steering={"vectors": [{"name": "vec"}]})
    assert steered2["steering"]["vectors"][0]["sha256"] == v2.sha256
    assert steered2["text"] != steered["text"]
    pinned = generate(client, steering={"vectors": [{"name": f"vec@{v1.sha256[:8]}"}]})
    assert pinned["text"] == steered["text"]
    assert pinned["steering"]["vectors"] == [
        {"name": "vec", "sha256": v1.sha256, "strength": 1.0, "layers": None, "positions": "all"}
    ]
    assert pinned["steering"]["fingerprint"] == steered["steering"]["fingerprint"]

    # a saved profile, by name in `steering` and as the OpenAI `model`
    profile = {
        "vectors": [{"name": f"vec@{v1.sha256[:8]}", "strength": 1.0, "layers": None, "positions": "all"}]
    }
    saved = client.put("/v1/profiles/calm", json=profile)
    assert saved.status_code == 200 and saved.json()["name"] == "calm"
    assert client.get("/v1/profiles/calm").json()["vectors"][0]["name"] == f"vec@{v1.sha256}"  # pinned
    assert generate(client, steering="calm")["text"] == steered["text"]
    msgs = [{"role": "user", "content": "Tell me a story"}]
    chat = {"messages": msgs, "max_tokens": 6, "temperature": 0}
    base = client.post("/v1/chat/completions", json=chat).json()
    via_model = client.post("/v1/chat/completions", json={**chat, "model": "calm"}).json()
    inline = client.post("/v1/chat/completions", json={**chat, "steering": profile}).json()
    assert via_model["model"] == "calm" and base["model"] == MODEL_ID
    assert via_model["object"] == "chat.completion"
    assert via_model["choices"][0]["message"]["role"] == "assistant"
    assert via_model["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    assert via_model["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert via_model["steering"] == inline["steering"]
    assert via_model["usage"]["total_tokens"] == via_model["usage"]["prompt_tokens"] + 6
    completion = client.post(
        "/v1/completions", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "model": "calm"}
    ).json()
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == steered["text"]

    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_ID, "calm"]
    assert all(m["object"] == "model" for m in models["data"])


def test_red_and_lora_vectors_steer_and_compose(server):
    _, client = server
    model = tiny_llama()
    for name, art in (
        ("red", red_artifact(model, spread=1.0)),
        ("lora", lora_artifact(model, alpha=64.0)),
        ("add", strong_add(model)),
    ):
        assert upload(client, name, art).status_code == 201
    plain = generate(client)["text"]
    for name in ("red", "lora"):
        out = generate(client, steering={"vectors": [{"name": name}]})
        assert out["text"] != plain, name
        assert generate(client, steering={"vectors": [{"name": name, "strength": 0}]})["text"] == plain
    both = generate(
        client, steering={"vectors": [{"name": "red"}, {"name": "add", "positions": "generated"}]}
    )
    assert [v["name"] for v in both["steering"]["vectors"]] == ["red", "add"]


# ---- streaming ---------------------------------------------------------------------------------------------
def test_generate_streaming_matches_non_streaming(server):
    _, client = server
    assert upload(client, "vec", strong_add(tiny_llama())).status_code == 201
    for steering in (None, {"vectors": [{"name": "vec"}]}):
        body = {"prompt": "Once upon a time", "max_new_tokens": 8, "steering": steering}
        full = client.post("/generate", json=body).json()
        with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp.iter_lines())
        assert events[-1] == "[DONE]"
        last = events[-2]
        assert last["finish_reason"] == "length"
        assert (
            last["usage"]
            == full["usage"]
            == {"prompt_tokens": full["usage"]["prompt_tokens"], "completion_tokens": 8}
        )
        assert last["steering"] == full["steering"]
        assert all(set(e) == {"text"} for e in events[:-2])
        assert "".join(e["text"] for e in events[:-1]) == full["text"]


def test_openai_chat_and_completion_streaming_chunks(server):
    _, client = server
    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        "max_tokens": 7,
        "temperature": 0,
    }
    full = client.post("/v1/chat/completions", json=chat).json()
    assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
    assert full["choices"][0]["finish_reason"] == "length"
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**chat, "stream": True, "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.status_code == 200
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["model"] == MODEL_ID
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk, final = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == full["usage"]
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == full["choices"][0]["message"]["content"]

    comp = {"prompt": "Hello there", "max_tokens": 5, "temperature": 0}
    full = client.post("/v1/completions", json=comp).json()
    with client.stream("POST", "/v1/completions", json={**comp, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == full["choices"][0]["text"]


# ---- stop strings and length ------------------------------------------------------------------------------
def test_stop_strings_and_length(server):
    _, client = server
    sample = {"prompt": "Hello", "max_new_tokens": 12, "temperature": 1.0, "seed": 1}
    full = generate(client, **sample)
    assert full["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 12
    assert generate(client, **sample) == full  # seeded sampling is reproducible
    text = full["text"]
    mid = len(text) // 2
    stop = text[mid : mid + 3]
    assert stop.strip(), text
    cut = text.find(stop)
    out = generate(client, **sample, stop=stop)
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:cut]
    assert out["usage"]["completion_tokens"] < 12
    # the earliest of several stop strings wins
    early = text[cut : cut + 2] if cut > 0 else stop
    out2 = generate(client, **sample, stop=["\x00never\x00", stop, early])
    assert out2["text"] == text[: min(text.find(early), cut)]
    assert generate(client, **sample, stop="\x00never\x00") == full
    # streaming never leaks the stop string
    with client.stream("POST", "/generate", json={**sample, "stop": stop, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    assert "".join(e["text"] for e in events[:-1]) == text[:cut]
    assert events[-2]["finish_reason"] == "stop"
    comp = client.post(
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 1, "stop": [stop]},
    ).json()
    assert comp["choices"][0]["finish_reason"] == "stop" and comp["choices"][0]["text"] == text[:cut]
    short = generate(client, max_new_tokens=3)
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3


# ---- metrics ----------------------------------------------------------------------------------------------
def test_metrics_after_requests(server):
    _, client = server
    assert upload(client, "vec", strong_add(tiny_llama())).status_code == 201
    generate(client, max_new_tokens=3)
    generate(client, max_new_tokens=3, steering={"vectors": [{"name": "vec"}]})
    generate(client, max_new_tokens=3, steering={"vectors": [{"name": "vec", "strength": 0.5}]})
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    check_error(client.get("/v1/vectors/nope"), 404)
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert metric(text, "steer_requests_total", route="/generate", status="200") == 3
    assert metric(text, "steer_requests_total", route="/v1/chat/completions", status="200") == 1
    assert metric(text, "steer_requests_total", route="/v1/vectors", status="201") == 1
    assert metric(text, "steer_requests_total", route="/v1/vectors/{name}", status="404") == 1
    assert metric(text, "steer_generation_tokens_total") == 11
    assert metric(text, "steer_prompt_tokens_total") > 0
    assert metric(text, "steer_steered_requests_total", vector="vec") == 2
    assert metric(text, "steer_vectors_loaded") == 1
    assert metric(text, "steer_vector_uploads_total", result="created") == 1
    assert (
        metric(text, "steer_model_info", model=MODEL_ID, quantization="none", device="cpu", dtype="float32")
        == 1
    )
    assert metric(text, "steer_running_requests") == 0 and metric(text, "steer_waiting_requests") == 0
    assert metric(text, "steer_request_duration_seconds_count") >= 6
    assert metric(text, "steer_time_to_first_token_seconds_count") == 4
    assert metric(text, "steer_queue_wait_seconds_count") == 4
    assert metric(text, "steer_inter_token_latency_seconds_count") == 7
    assert metric(text, "steer_batch_size_count") == 11
    # a deleted vector's series goes away (bounded cardinality)
    assert client.delete("/v1/vectors/vec").status_code == 200
    assert metric(client.get("/metrics").text, "steer_steered_requests_total", vector="vec") is None


# ---- real socket: a client that disconnects frees its row -------------------------------------------------
@pytest.fixture
def live_server(tmp_path, tokenizer) -> Iterator[tuple[ServerState, str]]:
    state = ServerState(ServerConfig(vector_dir=tmp_path / "vectors", quantization="none", drain_timeout=5.0))
    state.load(tiny_loaded(tokenizer))
    with uvicorn_thread(create_app(state)) as url:
        yield state, url


def running_gauge(http: httpx.Client) -> float | None:
    return metric(http.get("/metrics").text, "steer_running_requests")


def test_disconnect_mid_stream_frees_the_row(live_server):
    state, url = live_server
    with httpx.Client(base_url=url, timeout=30) as http:
        for path, body in (
            ("/generate", {"prompt": "Hello", "max_new_tokens": 400, "stream": True}),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "stream": True},
            ),
        ):
            with http.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()  # keep the iterator: dropping it would close the connection
                assert next(lines).startswith("data: {")
                wait_for(lambda: running_gauge(http) == 1, timeout=5, what="the request to run")
                time.sleep(0.3)
                assert running_gauge(http) == 1 and state.engine.running == 1  # still generating
            # leaving the block closed the connection mid-stream
            wait_for(lambda: running_gauge(http) == 0, timeout=10, what="the running gauge to return to 0")
            assert state.engine.idle()
        # a non-streaming request whose client gives up (read timeout) is cancelled too
        with pytest.raises(httpx.ReadTimeout):  # 500 tokens (the tiny model's context is 512) take > 0.2 s
            http.post("/generate", json={"prompt": "Hello", "max_new_tokens": 500}, timeout=0.2)
        wait_for(lambda: running_gauge(http) == 0, timeout=10, what="the running gauge to return to 0")
        resp = http.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4})
        assert resp.status_code == 200 and resp.json()["finish_reason"] == "length"
        assert resp.json()["usage"]["completion_tokens"] == 4
