"""Metrics checked by a real Prometheus: promtool on /metrics, and a Prometheus server that scrapes a
running steerserve and answers queries through its HTTP API."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import add_artifact, prometheus_server, uvicorn_thread

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState

PROMTOOL = shutil.which("promtool")
REQUIRED = os.environ.get("CI") == "true"  # in CI `make test` installs Debian's prometheus: never skip


@pytest.fixture
def live_server(tiny_loaded, tmp_path):
    """A tiny-model steerserve over a real socket (uvicorn in a thread)."""
    state = ServerState(ServerConfig(vector_dir=tmp_path / "vectors"))
    state.load(tiny_loaded)
    with uvicorn_thread(create_app(state)) as url:
        yield url, tiny_loaded.model


def _traffic(url: str, model, name: str = "calm") -> None:
    files = {"file": ("v.safetensors", add_artifact(model).to_bytes())}
    assert httpx.post(url + "/v1/vectors", data={"name": name}, files=files).status_code == 201
    for i in range(3):
        r = httpx.post(
            url + "/generate",
            json={"prompt": f"Hello {i}", "max_new_tokens": 5, "steering": {"vectors": [{"name": name}]}},
            timeout=60,
        )
        assert r.status_code == 200


def test_promtool_accepts_the_exposition(live_server):
    if PROMTOOL is None:
        if REQUIRED:
            pytest.fail("promtool missing: `make test` installs Debian's prometheus package")
        pytest.skip("promtool not installed")
    url, model = live_server
    _traffic(url, model)
    body = httpx.get(url + "/metrics").content
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def _query(prom: str, expr: str) -> float | None:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_real_prometheus_scrapes_steerserve(live_server, tmp_path: Path):
    url, model = live_server
    target = url.removeprefix("http://")
    jobs = f"  - job_name: steerserve\n    static_configs:\n      - targets: ['{target}']\n"
    with prometheus_server(jobs, tmp_path) as (prom_url, proc):

        def wait_for(expr: str, cond, timeout: float = 60.0) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                try:
                    value = _query(prom_url, expr)
                except httpx.HTTPError:
                    value = None
                if value is not None and cond(value):
                    return value
                time.sleep(0.5)
            raise AssertionError(f"prometheus never saw {expr} satisfy the condition")

        before = wait_for('steer_generation_tokens_total{job="steerserve"}', lambda v: v >= 0)
        assert before == 0
        _traffic(url, model)
        after = wait_for('steer_generation_tokens_total{job="steerserve"}', lambda v: v > before)
        assert after >= 3  # three requests, at least one token each
        steered = wait_for('steer_steered_requests_total{vector="calm"}', lambda v: v >= 3)
        assert steered == 3
        assert wait_for('up{job="steerserve"}', lambda v: v == 1) == 1
