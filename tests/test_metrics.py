"""server.metrics: every SPEC §8 metric, with its TYPE and bounded labels."""

from __future__ import annotations

import inspect
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import REJECT_REASONS, UPLOAD_RESULTS, Metrics
from server.observer import EngineObserver

SPEC_TYPES = {
    "steer_requests_total": "counter",
    "steer_request_duration_seconds": "histogram",
    "steer_time_to_first_token_seconds": "histogram",
    "steer_inter_token_latency_seconds": "histogram",
    "steer_queue_wait_seconds": "histogram",
    "steer_prompt_tokens_total": "counter",
    "steer_generation_tokens_total": "counter",
    "steer_batch_size": "histogram",
    "steer_running_requests": "gauge",
    "steer_waiting_requests": "gauge",
    "steer_steered_requests_total": "counter",
    "steer_vectors_loaded": "gauge",
    "steer_vector_uploads_total": "counter",
    "steer_rejected_requests_total": "counter",
    "steer_model_info": "gauge",
}


def _exercised() -> Metrics:
    m = Metrics()
    m.observe_request("/v1/chat/completions", 200, 0.42)
    m.observe_request("/generate", 429)
    m.observe_ttft(0.05)
    m.observe_inter_token(0.01)
    m.observe_queue_wait(0.002)
    m.observe_batch(3)
    m.add_tokens(prompt=11, generated=7)
    m.set_queue(running=2, waiting=5)
    m.steered(["polite", "concise", "polite"])
    m.track_vectors(lambda: {"polite", "concise", "calm", "terse"})
    m.upload("created")
    m.reject("queue_full")
    m.set_model_info(model="SmolLM2-135M-Instruct", quantization="nf4", device="cpu", dtype="bfloat16")
    return m


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_spec_metric_has_its_type_line():
    body, ctype = _exercised().exposition()
    text = body.decode()
    assert ctype.startswith("text/plain")
    for name, kind in SPEC_TYPES.items():
        assert re.search(rf"^# TYPE {name} {kind}$", text, re.M), f"no TYPE line for {name} ({kind})"
    for name in SPEC_TYPES:
        assert re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", text, re.M), f"no sample for {name}"


def test_label_values_and_counts():
    s = _samples(_exercised().exposition()[0].decode())
    assert s[("steer_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == 1
    assert s[("steer_requests_total", (("route", "/generate"), ("status", "429")))] == 1
    assert s[("steer_request_duration_seconds_count", ())] == 1  # no seconds given for the 429
    assert s[("steer_prompt_tokens_total", ())] == 11
    assert s[("steer_generation_tokens_total", ())] == 7
    assert s[("steer_running_requests", ())] == 2
    assert s[("steer_waiting_requests", ())] == 5
    assert s[("steer_steered_requests_total", (("vector", "polite"),))] == 1  # once per request
    assert s[("steer_steered_requests_total", (("vector", "concise"),))] == 1
    assert s[("steer_vectors_loaded", ())] == 4
    assert s[("steer_vector_uploads_total", (("result", "created"),))] == 1
    assert s[("steer_rejected_requests_total", (("reason", "queue_full"),))] == 1
    info = (
        ("device", "cpu"),
        ("dtype", "bfloat16"),
        ("model", "SmolLM2-135M-Instruct"),
        ("quantization", "nf4"),
    )
    assert s[("steer_model_info", info)] == 1
    assert s[("steer_batch_size_bucket", (("le", "4.0"),))] == 1
    assert s[("steer_batch_size_bucket", (("le", "2.0"),))] == 0


def test_fixed_label_sets_exist_from_the_start():
    s = _samples(Metrics().exposition()[0].decode())
    for result in UPLOAD_RESULTS:
        assert s[("steer_vector_uploads_total", (("result", result),))] == 0
    for reason in REJECT_REASONS:
        assert s[("steer_rejected_requests_total", (("reason", reason),))] == 0


def test_unknown_values_map_to_other():
    m = Metrics()
    m.upload("exploded")
    m.upload("created")
    m.reject("cosmic rays")
    m.observe_request("/v1/vectors/secret-user-content?x=1", 404)
    m.observe_request("/v1/vectors/{name}", "not a status")
    text = m.exposition()[0].decode()
    s = _samples(text)
    assert s[("steer_vector_uploads_total", (("result", "other"),))] == 1
    assert s[("steer_vector_uploads_total", (("result", "created"),))] == 1
    assert s[("steer_rejected_requests_total", (("reason", "other"),))] == 1
    assert s[("steer_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert s[("steer_requests_total", (("route", "/v1/vectors/{name}"), ("status", "other")))] == 1
    assert "exploded" not in text and "cosmic" not in text and "secret-user-content" not in text


def test_model_info_replaced_and_vector_forgotten():
    m = Metrics()
    m.set_model_info(model="a", quantization="none", device="cpu", dtype="float32")
    m.set_model_info(model="b", quantization="int8", device="cuda", dtype="float16")
    m.steered(["gone"])
    m.forget_vector("gone")
    m.forget_vector("never-there")
    s = _samples(m.exposition()[0].decode())
    infos = [k for k in s if k[0] == "steer_model_info"]
    assert infos == [
        (
            "steer_model_info",
            (("device", "cuda"), ("dtype", "float16"), ("model", "b"), ("quantization", "int8")),
        )
    ]
    assert not [k for k in s if k[0] == "steer_steered_requests_total"]


def test_tracked_vectors_are_read_at_every_exposition():
    """Another process (a replica) changes the shared directory: the next exposition follows it."""
    registered = {"calm", "polite"}
    m = Metrics()
    m.track_vectors(lambda: set(registered))
    m.steered(["calm", "polite"])
    s = _samples(m.exposition()[0].decode())
    assert s[("steer_vectors_loaded", ())] == 2
    registered.discard("calm")  # deleted elsewhere
    registered.update({"terse", "bold"})
    s = _samples(m.exposition()[0].decode())
    assert s[("steer_vectors_loaded", ())] == 3
    assert [k for k in s if k[0] == "steer_steered_requests_total"] == [
        ("steer_steered_requests_total", (("vector", "polite"),))
    ]


def test_an_unreadable_vector_directory_keeps_the_last_count(caplog):
    answers: list[object] = [{"a", "b"}, OSError("gone")]

    def names() -> set[str]:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer  # type: ignore[return-value]

    m = Metrics()
    m.track_vectors(names)
    assert _samples(m.exposition()[0].decode())[("steer_vectors_loaded", ())] == 2
    assert _samples(m.exposition()[0].decode())[("steer_vectors_loaded", ())] == 2
    assert "steer_vectors_loaded not updated: gone" in caplog.text


def test_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.upload("created")
    sb = _samples(b.exposition()[0].decode())
    assert sb[("steer_vector_uploads_total", (("result", "created"),))] == 0


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 1e-4, 301.0])
def test_histograms_accept_any_duration(seconds):
    m = Metrics()
    m.observe_ttft(seconds)
    m.observe_inter_token(seconds)
    m.observe_queue_wait(seconds)
    s = _samples(m.exposition()[0].decode())
    assert s[("steer_time_to_first_token_seconds_count", ())] == 1
    assert s[("steer_time_to_first_token_seconds_bucket", (("le", "+Inf"),))] == 1


def test_metrics_implements_the_engine_observer_protocol():
    """The engine reports through :class:`EngineObserver`; Metrics has each of its methods, same signature."""
    methods = [n for n, v in vars(EngineObserver).items() if callable(v) and not n.startswith("_")]
    assert sorted(methods) == [
        "add_tokens",
        "observe_batch",
        "observe_inter_token",
        "observe_queue_wait",
        "observe_ttft",
        "set_queue",
    ]
    assert isinstance(Metrics(), EngineObserver)
    for name in methods:
        assert inspect.signature(getattr(Metrics, name)) == inspect.signature(getattr(EngineObserver, name))
