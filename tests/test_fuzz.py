"""Schemathesis against the server's own OpenAPI schema (issue 7): the tiny random model behind the real app,
every operation fuzzed in-process over ASGI, positive and (where there is a body) negative cases.

Checks: no 5xx for any input (``not_a_server_error``), and every response whose status the schema documents
matches the documented body (``response_schema_conformance``): success bodies, the error body of every error
status, and each event of a stream (``test_every_operation_documents_its_bodies`` keeps the schema complete
enough for that check to mean something). Generation stays cheap: a hook caps the
token budget of every generated body at a few tokens (the cap itself is covered by tests/test_limits.py).
Other hooks offer, next to each generated body, a variant nudged past the cheapest rejections and steering
entries or path names that exist, so the fuzzer reaches compilation, the hooks and generation instead of
stopping at 400/404 (``test_fuzzing_reached_generation`` guards that); OpenAI bodies also get parameters
this server does not serve (accepted with their neutral values, refused otherwise), and the vector paths
pinned versions (``name@<sha prefix>``, which DELETE removes one at a time).

Deterministic: Hypothesis ``derandomize`` and a fixed schemathesis seed, so CI sees the same cases every run.
The operations are driven through ``APIOperation.as_strategy`` with ``@given`` rather than
``schemathesis.pytest.from_fixture``, which does not run under pytest 9.2 (it sets ``Node._nodeid``).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from helpers import add_artifact, lora_artifact, red_artifact, tiny_loaded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance
except ImportError:  # pragma: no cover - the dev extra installs it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("schemathesis is not installed (pip install -e '.[dev]')", allow_module_level=True)

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState
from steering_vectors import Profile

STATUSES: dict[str, Counter] = {}
SEED = 20240607
# examples per operation and mode: more where the input space is large
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "10"))
MAX_EXAMPLES_BODY = int(os.environ.get("FUZZ_MAX_EXAMPLES_BODY", "30"))
TOKEN_CAP = 4
VECTORS = ("calm", "redder", "lora1")
PROFILE = "calm-profile"
PINNED: list[str] = []  # "name@<sha prefix>" of stored versions (DELETE one version), set by the fixture
#: OpenAI parameters this server does not serve: the values that ask for nothing, and ones it refuses
OPENAI_EXTRAS = ({"tools": [], "response_format": {"type": "text"}, "zeta": 1}, {"logit_bias": {"1": 5}})

CONFIG = schemathesis.Config.from_dict(
    {"seed": SEED, "generation": {"mode": "all", "max-examples": MAX_EXAMPLES_BODY, "deterministic": True}}
)


@pytest.fixture
def fuzz_schema(tokenizer, tmp_path):
    """A fresh tiny-model server per operation: schemathesis ends the app's lifespan (which stops the
    engine) when each test finishes, and a fresh store keeps every operation's run independent."""
    loaded = tiny_loaded(tokenizer)
    model = loaded.model
    state = ServerState(ServerConfig(vector_dir=tmp_path / "vectors", max_queue=64))
    state.load(loaded)
    store = state.store
    assert store is not None
    store.add("calm", add_artifact(model).to_bytes())
    store.add("redder", red_artifact(model).to_bytes())
    store.add("lora1", lora_artifact(model).to_bytes())
    store.put_profile(PROFILE, Profile.from_dict({"vectors": [{"name": "calm", "strength": 0.5}]}))
    PINNED[:] = [f"{name}@{store.get(name).sha256[:8]}" for name in VECTORS]
    loaded_schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(state), config=CONFIG)
    loaded_schema.hook(flatmap_body)
    loaded_schema.hook(flatmap_path_parameters)
    yield loaded_schema
    assert state.engine is not None
    state.engine.stop(5.0)


GENERATION_ROUTES = ("/generate", "/v1/chat/completions", "/v1/completions")
SWEEP = "/v1/sweep"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cap_tokens(path: str, body: dict) -> dict:
    """At most TOKEN_CAP new tokens; where the body leaves the budget to the route's default, set it."""
    body = dict(body)
    keys = ("max_new_tokens",) if path in ("/generate", SWEEP) else ("max_tokens", "max_completion_tokens")
    for key in keys:
        if _is_number(body.get(key)) and body[key] > TOKEN_CAP:
            body[key] = TOKEN_CAP
    if all(body.get(key) is None for key in keys):
        body[keys[0]] = TOKEN_CAP
    return body


def _plausible(path: str, body: dict) -> dict:
    """The same body nudged past the cheapest rejections, so that most cases reach generation."""
    body = dict(body)
    if path in ("/generate", SWEEP):
        if body.get("prompt") is not None and body.get("messages") is not None:
            body.pop("messages")
        elif body.get("prompt") is None and body.get("messages") is None:
            body["prompt"] = "Hello"
    if "n" in body:
        body["n"] = 1
    if path == SWEEP:
        body["vector"] = VECTORS[len(str(body.get("vector"))) % len(VECTORS)]
        if isinstance(body.get("strengths"), list):
            body["strengths"] = body["strengths"][:8] or [0.0]
    if path == "/v1/completions" and isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:1] or ["Hello"]
    if path in ("/v1/chat/completions", "/v1/completions") and isinstance(body.get("model"), str):
        body["model"] = "tiny-llama"
    return body


def flatmap_body(context, body):
    """Keep generation cheap; offer, next to the generated body, variants that get past the cheap checks and
    steering entries that name registered vectors (or the saved profile)."""
    op = context.operation
    if op is None or not isinstance(body, dict):
        return st.just(body)
    path = op.path
    bodies = [body]
    if path in (*GENERATION_ROUTES, SWEEP):
        bodies = [_cap_tokens(path, body), _plausible(path, _cap_tokens(path, body))]
    options = [st.just(b) for b in bodies]
    for b in bodies:
        steering = b if path == "/v1/profiles/{name}" else b.get("steering")
        entries = steering.get("vectors") if isinstance(steering, dict) else None
        if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
            options.append(_renamed(path, b, steering, entries))
        elif path in GENERATION_ROUTES:
            options.append(st.just({**b, "steering": PROFILE}))
    if path in GENERATION_ROUTES[1:]:
        options += [st.just({**bodies[-1], **extra}) for extra in OPENAI_EXTRAS]
    return st.one_of(options)


def _renamed(path: str, body: dict, steering: dict, entries: list[dict]):
    def rename(names: list[str]) -> dict:
        new = [{**e, "name": n} if n else e for e, n in zip(entries, names, strict=False)]
        if path == "/v1/profiles/{name}":
            return {**body, "vectors": new}
        return {**body, "steering": {**steering, "vectors": new}}

    picks = st.lists(st.sampled_from([*VECTORS, ""]), min_size=len(entries), max_size=len(entries))
    return picks.map(rename)


def flatmap_path_parameters(context, path_parameters):
    """Sometimes name a vector or profile that exists (or, for PUT, a valid new name)."""
    op = context.operation
    name = path_parameters.get("name") if isinstance(path_parameters, dict) else None
    if op is None or not isinstance(name, str):
        return st.just(path_parameters)
    known = (*VECTORS, *PINNED) if op.path.startswith("/v1/vectors/") else (PROFILE, "fresh-profile")
    return st.sampled_from([path_parameters] + [{**path_parameters, "name": n} for n in known])


def _cases() -> list[tuple[str, str]]:
    """(operation, mode) for every operation of the app's OpenAPI document (building it loads no model);
    negative cases only where the operation takes input."""
    spec = create_app(ServerState(ServerConfig())).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            out.append((label, "positive"))
            if op.get("requestBody"):  # a path string cannot be made invalid
                out.append((label, "negative"))
    return out


@pytest.mark.parametrize(("label", "mode"), _cases())
def test_no_server_errors_and_documented_responses(fuzz_schema, label, mode):
    operation = fuzz_schema.find_operation_by_label(label)
    assert operation is not None, label

    @settings(
        max_examples=MAX_EXAMPLES_BODY if label.split()[0] in ("POST", "PUT") else MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(GenerationMode(mode)))
    def run(case):
        response = case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
        STATUSES.setdefault(label, Counter())[(mode, response.status_code)] += 1

    run()


def test_every_operation_documents_its_bodies():
    """What the conformance check compares against: a schema for every success body, the SPEC error body
    for every error status, and the event stream of every generation route."""
    spec = create_app(ServerState(ServerConfig())).openapi()
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # 422 is the SPEC error body too
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            label, responses = f"{method.upper()} {path}", op["responses"]
            assert any(status.startswith("2") for status in responses), label
            for status, response in responses.items():
                content = response.get("content") or {}
                assert content and all(m.get("schema") for m in content.values()), f"{label} {status}"
                if status[0] in "45":
                    assert content == {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                    }
            if path not in ("/health", "/ready", "/metrics"):  # no key needed there
                assert {"401", "503"} <= set(responses), label
            if path in GENERATION_ROUTES:
                assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}, label


def test_fuzzing_reached_generation():
    """Guard against a silent loss of depth: the hooks must get cases through to real generation."""
    ran = [route for route in (*GENERATION_ROUTES, SWEEP) if f"POST {route}" in STATUSES]
    if not ran:
        pytest.skip("the fuzz tests did not run in this session")
    for route in ran:
        assert STATUSES[f"POST {route}"][("positive", 200)] > 0, STATUSES[f"POST {route}"]
