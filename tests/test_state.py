"""Server state (server/state.py, server/serve.py), issue 13: ``--fold PROFILE`` serves exactly the folded
profile, once, says so, and refuses other steering; a model or fold profile that cannot load makes
``steerserve serve`` exit non-zero within 30 s with a one-line reason."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import add_artifact, free_port, padded_logits, red_artifact, tiny_llama, tiny_loaded

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState
from server.store import VectorStore
from steering_vectors import Profile, find_layout, install_steering

PROMPT = {"prompt": "The weather today", "max_new_tokens": 8}
CALM = {"vectors": [{"name": "red", "strength": 0.8}, {"name": "add", "strength": 1.5, "layers": [1]}]}


@pytest.fixture
def servers(tmp_path, tokenizer):
    """(folded state and client, unfolded state and client) on the same random model and vector dir."""
    model = tiny_llama()
    store = VectorStore(tmp_path / "v", find_layout(model))
    store.add("red", red_artifact(model, spread=0.2).to_bytes())
    store.add("add", add_artifact(model, norm=6.0).to_bytes())
    store.add("other", add_artifact(model, seed=9).to_bytes())
    store.put_profile("calm", Profile.from_dict(CALM))
    store.put_profile("rival", Profile.from_dict({"vectors": [{"name": "other"}]}))
    out = []
    for fold in ("calm", None):
        state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "v", fold=fold))
        state.load(tiny_loaded(tokenizer))
        client = TestClient(create_app(state))
        client.__enter__()
        out.append((state, client))
    yield out
    for _, client in out:
        client.__exit__(None, None, None)


def test_fold_serves_the_profile_once_and_says_so(servers):
    (fstate, folded), (_, hooked) = servers
    want = hooked.post("/generate", json={**PROMPT, "steering": "calm"}).json()
    plain = hooked.post("/generate", json=PROMPT).json()
    assert want["text"] != plain["text"]
    for body in (PROMPT, {**PROMPT, "steering": "calm"}, {**PROMPT, "steering": {"vectors": []}}):
        got = folded.post("/generate", json=body).json()
        assert got["text"] == want["text"]  # the same greedy tokens as the hooked profile, applied once
        assert got["steering"] == {**want["steering"], "folded": "calm"}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    by_model = folded.post("/v1/chat/completions", json={**chat, "model": "calm"}).json()
    by_name = hooked.post("/v1/chat/completions", json={**chat, "model": "calm"}).json()
    assert by_model["choices"][0]["message"] == by_name["choices"][0]["message"]
    assert by_model["steering"]["folded"] == "calm"
    cards = folded.get("/v1/models").json()["data"]
    assert [(c["id"], c.get("folded")) for c in cards] == [("tiny-llama", True), ("calm", True)]
    assert [v["name"].partition("@")[0] for v in cards[0]["steering"]["vectors"]] == ["red", "add"]
    assert fstate.folded is not None


def test_fold_refuses_other_steering_and_changes_to_its_profile(servers):
    _, folded = servers[0]
    for body in (
        {**PROMPT, "steering": "rival"},
        {**PROMPT, "steering": {"vectors": [{"name": "other"}]}},
    ):
        r = folded.post("/generate", json=body)
        assert r.status_code == 409 and "folded" in r.json()["error"]["message"], r.text
    r = folded.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "rival"})
    assert r.status_code == 409
    assert folded.put("/v1/profiles/calm", json={"vectors": []}).status_code == 409
    assert folded.delete("/v1/profiles/calm").status_code == 409
    assert folded.get("/v1/profiles/calm").status_code == 200


def test_folded_weights_equal_the_hooked_profile_within_1e4(servers, tokenizer):
    (fstate, _), (hstate, _) = servers
    assert hstate.store is not None and fstate.loaded is not None
    compiled = hstate.store.compile(hstate.store.get_profile("calm"))
    seqs = [tokenizer.encode("The weather today"), tokenizer.encode("Hello")]
    fresh = tiny_llama()
    with install_steering(fresh) as hooks:
        slot = hooks.acquire(compiled)
        with hooks.batch([slot, slot]):
            hooked = padded_logits(fresh, seqs)
    folded = padded_logits(fstate.loaded.model, seqs)
    torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=0)
    assert torch.equal(folded[:, -1].argmax(-1), hooked[:, -1].argmax(-1))


def _serve(tmp_path: Path, *args: str) -> tuple[int, list[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    cmd = [sys.executable, "-m", "steerserve.cli", "serve", "--port", str(free_port()), *args]
    cmd += ["--vector-dir", str(tmp_path / "v"), "--quantization", "none"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    return proc.returncode, proc.stderr.strip().splitlines(), time.monotonic() - t0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing model", "no such model directory"),
        ("empty model folder", "cannot load the model"),
        ("missing fold profile", "--fold ghost: no saved profile"),
    ],
)
def test_serve_exits_with_a_one_line_reason(tmp_path, case, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing model": ["--model", "/nonexistent"],
        "empty model folder": ["--model", str(empty)],
        "missing fold profile": ["--fold", "ghost", "--model", str(empty)],
    }[case]
    code, lines, took = _serve(tmp_path, *args)
    assert code != 0 and took < 30, (code, took)
    assert lines and lines[-1].startswith("steerserve: error:") and needle in lines[-1], lines[-5:]
    assert not any("Traceback" in line for line in lines), lines


def test_the_open_file_limit_fits_max_connections(monkeypatch):
    import resource

    from server import serve

    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: calls.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (128, 4096))
    serve.ensure_fd_limit(256)  # raised to fit, up to the hard limit
    assert calls == [(256 + 64, 4096)]
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (128, 128))
    with pytest.raises(
        ValueError, match="--max-connections 256 needs 320 file descriptors but the limit is 128"
    ):
        serve.ensure_fd_limit(256)
