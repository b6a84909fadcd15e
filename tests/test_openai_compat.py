"""OpenAI parameters (server/openai_compat.py), issue 13: every documented parameter this server does not
serve is refused with 400 naming it (its "ask for nothing" value is accepted), non-text content parts and
tool messages are refused, unknown fields are ignored with a warning naming them, ``echo`` works when
streaming, and ``--served-model-name`` sets the model id (a profile may not take it)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import tiny_loaded

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hello there", "max_tokens": 3, "temperature": 0}


@pytest.fixture
def client(tmp_path, tokenizer):
    state = ServerState(
        ServerConfig(quantization="none", vector_dir=tmp_path / "v", served_model_name="my-model")
    )
    state.load(tiny_loaded(tokenizer))
    with TestClient(create_app(state)) as c:
        yield c


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools'"),
    ("chat", {"tool_choice": "auto"}, "'tool_choice'"),
    ("chat", {"functions": [{"name": "f"}]}, "'functions'"),
    ("chat", {"function_call": "auto"}, "'function_call'"),
    ("chat", {"parallel_tool_calls": True}, "'parallel_tool_calls'"),
    ("chat", {"response_format": {"type": "json_object"}}, "'response_format'"),
    ("chat", {"logprobs": True}, "'logprobs'"),
    ("chat", {"top_logprobs": 3}, "'top_logprobs'"),
    ("chat", {"logit_bias": {"42": 5}}, "'logit_bias'"),
    ("chat", {"presence_penalty": 0.5}, "'presence_penalty'"),
    ("chat", {"frequency_penalty": -1}, "'frequency_penalty'"),
    ("chat", {"store": True}, "'store'"),
    ("chat", {"modalities": ["text", "audio"]}, "'modalities'"),
    ("chat", {"service_tier": "flex"}, "'service_tier'"),
    ("chat", {"reasoning_effort": "high"}, "'reasoning_effort'"),
    ("chat", {"min_p": 0.1}, "'min_p'"),
    ("chat", {"n": 2}, "'n'"),
    ("completion", {"best_of": 3}, "best_of > n"),
    ("completion", {"best_of": 0}, "best_of"),
    ("completion", {"suffix": "and then"}, "'suffix'"),
    ("completion", {"logprobs": 2}, "'logprobs'"),
]


@pytest.mark.parametrize(("route", "extra", "needle"), REFUSED)
def test_unserved_parameters_are_refused_by_name(client, route, extra, needle):
    path, body = ("/v1/chat/completions", CHAT) if route == "chat" else ("/v1/completions", COMPLETION)
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_values_that_ask_for_nothing_are_accepted(client):
    neutral = {
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logprobs": False,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k1",
        "user": "u1",
    }
    assert client.post("/v1/chat/completions", json={**CHAT, **neutral}).status_code == 200
    r = client.post("/v1/completions", json={**COMPLETION, "best_of": 1, "suffix": "", "n": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]},
            "'image_url'",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]},
            "'input_audio'",
        ),
        ({"role": "user", "content": "Hi", "name": "alice"}, "messages[0].name"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls"),
    ],
)
def test_content_parts_and_message_fields_that_would_vanish_are_refused(client, message, needle):
    for path, body in (("/v1/chat/completions", {"max_tokens": 2}), ("/generate", {"max_new_tokens": 2})):
        r = client.post(path, json={**body, "messages": [message]})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    text = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    assert client.post("/v1/chat/completions", json={**CHAT, "messages": [text]}).status_code == 200


def test_unknown_fields_are_ignored_with_a_warning(client, caplog):
    with caplog.at_level(logging.WARNING, logger="steerserve"):
        r = client.post("/v1/chat/completions", json={**CHAT, "frobnicate": 1, "zeta": "z"})
    assert r.status_code == 200
    warned = [rec.getMessage() for rec in caplog.records if "ignoring unknown fields" in rec.getMessage()]
    assert warned == [f"request {r.headers['x-request-id']}: ignoring unknown fields frobnicate, zeta"]


def test_echo_works_when_streaming(client):
    whole = client.post("/v1/completions", json={**COMPLETION, "echo": True}).json()
    assert whole["choices"][0]["text"].startswith(COMPLETION["prompt"])
    with client.stream("POST", "/v1/completions", json={**COMPLETION, "echo": True, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert texts[0].startswith(COMPLETION["prompt"])
    assert "".join(texts) == whole["choices"][0]["text"]


def test_served_model_name(client):
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["my-model"]
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "my-model"})
    assert r.status_code == 200 and r.json()["model"] == "my-model"
    assert client.post("/v1/chat/completions", json=CHAT).json()["model"] == "my-model"
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-llama"})
    assert r.status_code == 404 and "my-model" in r.json()["error"]["message"]
    r = client.put("/v1/profiles/my-model", json={"vectors": []})
    assert r.status_code == 409 and "served model" in r.json()["error"]["message"]
