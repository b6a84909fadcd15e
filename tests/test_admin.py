"""The vectors and profiles routes (server/routes/admin.py) over HTTP, issue 13: profiles pin versions and
keep their description, deleting what a profile uses is 409 naming it unless forced, one version can be
deleted, the store is bounded, listing pages, a profile may not take the served model's name, entries
naming layers a vector lacks (or none, or a huge strength) are refused, artifacts for another model are
409 unless ``--allow-model-mismatch``, and the response's steering block carries layers and positions."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import add_artifact, red_artifact, tiny_llama, tiny_loaded

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState
from steering_vectors import Artifact


@pytest.fixture
def make(tmp_path, tokenizer):
    opened: list[TestClient] = []

    def start(**config: Any) -> TestClient:
        state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "v", **config))
        state.load(tiny_loaded(tokenizer))
        client = TestClient(create_app(state))
        client.__enter__()
        opened.append(client)
        return client

    yield start
    for c in opened:
        c.__exit__(None, None, None)


def upload(client: TestClient, name: str, art: Artifact) -> dict[str, Any]:
    r = client.post("/v1/vectors", data={"name": name}, files={"file": ("v.safetensors", art.to_bytes())})
    assert r.status_code == 201, r.text
    return r.json()


def gen(client: TestClient, steering: Any) -> dict[str, Any]:
    r = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 5, "steering": steering})
    assert r.status_code == 200, r.text
    return r.json()


def test_profiles_pin_versions_and_deletes_respect_them(make):
    client, model = make(), tiny_llama()
    v1 = upload(client, "vec", add_artifact(model, norm=8.0))
    saved = client.put("/v1/profiles/calm", json={"vectors": [{"name": "vec"}], "description": "steady"})
    assert saved.json() == {
        "name": "calm",
        "description": "steady",
        "vectors": [{"name": f"vec@{v1['sha256']}", "strength": 1.0, "positions": "all"}],
    }
    before = gen(client, "calm")
    upload(client, "vec", red_artifact(model))  # the name now holds another kind
    assert gen(client, "calm") == before  # the profile still means what it meant
    assert client.get("/v1/profiles/calm").json()["description"] == "steady"
    r = client.delete("/v1/vectors/vec")
    assert (
        r.status_code == 409
        and "calm" in r.json()["error"]["message"]
        and "force=true" in r.json()["error"]["message"]
    )
    current = client.get("/v1/vectors/vec").json()["sha256"]
    r = client.delete(f"/v1/vectors/vec@{current[:10]}")  # one version: not the pinned one
    assert r.status_code == 200 and r.json()["versions"] == [current]
    assert client.get("/v1/vectors/vec").json()["versions"] == [v1["sha256"]]
    assert client.delete(f"/v1/vectors/vec@{v1['sha256'][:10]}").status_code == 409
    r = client.delete("/v1/vectors/vec?force=true")
    assert r.status_code == 200 and r.json()["versions"] == [v1["sha256"]]
    r = client.post("/generate", json={"prompt": "Hello", "steering": "calm"})
    assert r.status_code == 404 and "vec" in r.json()["error"]["message"]


def test_bounds_paging_and_reserved_names(make):
    client, model = make(max_vectors=3, max_versions=2), tiny_llama()
    for i, name in enumerate(("c", "a", "b")):
        upload(client, name, add_artifact(model, seed=i))
    r = client.post(
        "/v1/vectors", data={"name": "d"}, files={"file": ("v.safetensors", add_artifact(model).to_bytes())}
    )
    assert r.status_code == 409 and "--max-vectors" in r.json()["error"]["message"]
    for seed in (7, 8):
        upload(client, "a", add_artifact(model, seed=seed))
    assert len(client.get("/v1/vectors/a").json()["versions"]) == 2  # the oldest went
    page = client.get("/v1/vectors?limit=2").json()
    assert [v["name"] for v in page["data"]] == ["a", "b"] and page["has_more"] and page["last_id"] == "b"
    rest = client.get(f"/v1/vectors?limit=2&after={page['last_id']}").json()
    assert [v["name"] for v in rest["data"]] == ["c"] and not rest["has_more"]
    assert client.get("/v1/vectors?limit=0").status_code == 422
    r = client.put("/v1/profiles/tiny-llama", json={"vectors": []})
    assert r.status_code == 409 and "served model" in r.json()["error"]["message"]


def test_entries_that_would_be_silent_are_refused(make):
    client, model = make(), tiny_llama()
    upload(client, "one", add_artifact(model, layers=[1]))
    for entry, status, needle in (
        ({"name": "one", "layers": [0]}, 400, "layers [0] are not among the vector's layers [1]"),
        ({"name": "one", "layers": []}, 422, "layers"),
        ({"name": "one", "strength": 1e30}, 422, "strength"),
        ({"name": "one", "strength": -101}, 422, "strength"),
    ):
        for r in (
            client.post("/generate", json={"prompt": "Hi", "steering": {"vectors": [entry]}}),
            client.put("/v1/profiles/p", json={"vectors": [entry]}),
        ):
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert client.get("/v1/profiles").json()["data"] == []


def test_steering_block_carries_layers_and_positions(make):
    client, model = make(), tiny_llama()
    info = upload(client, "vec", add_artifact(model, norm=8.0))
    a = gen(client, {"vectors": [{"name": "vec", "layers": [1], "positions": "generated"}]})["steering"]
    assert a["vectors"] == [
        {"name": "vec", "sha256": info["sha256"], "strength": 1.0, "layers": [1], "positions": "generated"}
    ]
    b = gen(client, {"vectors": [{"name": "vec", "layers": [1], "positions": "prompt"}]})["steering"]
    c = gen(client, {"vectors": [{"name": "vec", "positions": "generated"}]})["steering"]
    assert len({a["fingerprint"], b["fingerprint"], c["fingerprint"]}) == 3  # the fingerprint covers all


def test_artifacts_for_another_model_are_409_unless_allowed(make):
    model = tiny_llama()
    gpt2 = add_artifact(model)
    gpt2.model_type = "gpt2"
    other = add_artifact(model, seed=5)
    other.extra["base_model"] = "meta-llama/Llama-3-8B"
    strict = make()
    for name, art, needle in (
        ("g", gpt2, "model_type 'gpt2'"),
        ("o", other, "base_model 'meta-llama/Llama-3-8B'"),
    ):
        r = strict.post("/v1/vectors", data={"name": name}, files={"file": ("v.safetensors", art.to_bytes())})
        assert r.status_code == 409 and needle in r.json()["error"]["message"], r.text
    lenient = make(allow_model_mismatch=True)
    upload(lenient, "g", gpt2)
    upload(lenient, "o", other)
