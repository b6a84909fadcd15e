"""server.replica_metrics: a replica's own metrics endpoint, and the merged exposition of every replica."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import httpx
import pytest
from helpers import free_port, metric
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from server.replica_metrics import MetricsEndpoint, fetch_expositions, merge_expositions


def _replica(requests: int, vectors: list[str]) -> Metrics:
    m = Metrics()
    for _ in range(requests):
        m.observe_request("/generate", 200, 0.3)
    m.add_tokens(prompt=3 * requests, generated=5 * requests)
    m.steered(vectors)
    m.track_vectors(lambda: set(vectors))
    m.set_model_info(model="tiny", quantization="none", device="cpu", dtype="float32")
    return m


def test_merged_exposition_labels_every_sample_with_its_replica():
    a, b = _replica(3, ["calm"]), _replica(4, ["calm", "terse"])
    body, ctype = merge_expositions({"r-a": a.exposition()[0], "r-b": b.exposition()[0]})
    assert ctype.startswith("text/plain")
    text = body.decode()
    assert metric(text, "steer_requests_total", replica="r-a", route="/generate", status="200") == 3
    assert metric(text, "steer_requests_total", replica="r-b", route="/generate", status="200") == 4
    assert metric(text, "steer_generation_tokens_total", replica="r-b") == 20
    assert metric(text, "steer_steered_requests_total", replica="r-b", vector="terse") == 1
    assert metric(text, "steer_steered_requests_total", replica="r-a", vector="terse") is None
    assert metric(text, "steer_vectors_loaded", replica="r-a") == 1
    assert metric(text, "steer_request_duration_seconds_bucket", replica="r-a", le="0.5") == 3
    # each family once, every sample of both replicas in it, nothing without the label
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(a.exposition()[0].decode())))
    for family in families.values():
        assert all("replica" in s.labels for s in family.samples), family.name
    requests = families["steer_requests"].samples
    assert sum(s.value for s in requests if s.name == "steer_requests_total") == 7


def test_promtool_accepts_the_merged_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    body, _ = merge_expositions({r: _replica(i + 1, ["calm"]).exposition()[0] for i, r in enumerate("abc")})
    done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_label_values_are_escaped_and_lines_without_labels_get_one():
    body, _ = merge_expositions({'we"ird\\id': b"# HELP x_total t\n# TYPE x_total counter\nx_total 2.0\n"})
    assert body == b'# HELP x_total t\n# TYPE x_total counter\nx_total{replica="we\\"ird\\\\id"} 2.0\n'


def test_the_endpoint_serves_its_metrics_and_nothing_else():
    m = _replica(2, ["calm"])
    endpoint = MetricsEndpoint(m, "127.0.0.1")
    try:
        assert endpoint.url.startswith("http://127.0.0.1:") and endpoint.url.endswith("/metrics")
        r = httpx.get(endpoint.url, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert metric(r.text, "steer_requests_total", route="/generate", status="200") == 2
        assert httpx.get(endpoint.url.replace("/metrics", "/ready"), timeout=10).status_code == 404
    finally:
        endpoint.close()


def test_fetch_leaves_out_a_replica_that_does_not_answer(caplog):
    endpoint = MetricsEndpoint(_replica(1, []), "127.0.0.1")
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    try:
        got = asyncio.run(fetch_expositions({"up": endpoint.url, "gone": dead}))
    finally:
        endpoint.close()
    assert set(got) == {"up"} and b"steer_requests_total" in got["up"]
    assert "metrics of replica gone" in caplog.text and "left out of this scrape" in caplog.text
