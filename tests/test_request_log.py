"""Structured request logs: one JSON line per request, no prompt text unless asked for."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState


def _lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "steerserve.requests"]


def test_one_json_line_per_request_without_prompt(tiny_loaded, tmp_path, caplog):
    state = ServerState(ServerConfig(vector_dir=tmp_path))
    state.load(tiny_loaded)
    with caplog.at_level(logging.INFO, logger="steerserve.requests"), TestClient(create_app(state)) as c:
        c.post("/generate", json={"prompt": "secret words", "max_new_tokens": 3})
        c.post("/generate", json={"prompt": "more secret", "max_new_tokens": 2, "stream": True})
    lines = _lines(caplog)
    assert len(lines) == 2
    for rec in lines:
        assert rec["event"] == "request" and rec["route"] == "/generate" and rec["id"].startswith("req-")
        assert set(rec) >= {"fingerprint", "prompt_tokens", "completion_tokens", "ttft_s", "total_s"}
        assert "prompt" not in rec
    assert [r["completion_tokens"] for r in lines] == [3, 2]
    assert "secret" not in caplog.text


def test_prompt_logged_only_when_asked(tiny_loaded, tmp_path, caplog):
    state = ServerState(ServerConfig(vector_dir=tmp_path, log_prompts=True))
    state.load(tiny_loaded)
    with caplog.at_level(logging.INFO, logger="steerserve.requests"), TestClient(create_app(state)) as c:
        c.post("/generate", json={"prompt": "visible words", "max_new_tokens": 2})
    assert [r["prompt"] for r in _lines(caplog)] == ["visible words"]
