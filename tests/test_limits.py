"""Resource limits (issue 7): prompts beyond the context, max_new_tokens beyond the cap, too many vectors,
huge JSON bodies and slow clients each get a clear 4xx quickly, and none of them holds up other requests.

A live tiny-model server (uvicorn in a thread, a real socket) with a 128-token context and a 32-token cap.
Timing: the 4xx answers are timed over several tries on a persistent connection; the median must be under
50 ms (the box these run on is a shared 2-core machine, so single tries are not asserted on).
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from helpers import add_artifact, tiny_llama, tiny_loaded, uvicorn_thread

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState

CONTEXT = 128
CAP = 32
BODY_LIMIT = 1024 * 1024  # the default
BODY_TIMEOUT = 3.0  # for the whole body: room for 0.9 MB bodies on a busy 2-core box
FAST_MS = 50.0
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def live(tokenizer, tmp_path_factory):
    model = tiny_llama()
    model.config.max_position_embeddings = CONTEXT
    loaded = tiny_loaded(tokenizer, model=model)
    cfg = ServerConfig(
        vector_dir=tmp_path_factory.mktemp("limits") / "vectors",
        max_new_tokens=CAP,
        max_body_bytes=BODY_LIMIT,
        body_timeout=BODY_TIMEOUT,
    )
    state = ServerState(cfg)
    state.load(loaded)
    assert state.store is not None
    state.store.add("calm", add_artifact(model).to_bytes())
    for i in range(15):  # a profile names each vector once (SPEC §9.1): 16 distinct ones for the limit
        state.store.add(f"calm{i}", add_artifact(model, seed=100 + i).to_bytes())
    with uvicorn_thread(create_app(state)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client
    if TIMINGS:
        print("\n4xx median latency (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


def _fast_4xx(
    label: str, send: Callable[[], httpx.Response], status: int, pattern: str, tries: int = 9
) -> None:
    """``send`` answers ``status`` with a message containing ``pattern``; median latency under FAST_MS."""
    send()  # warm-up
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        r = send()
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == status, f"{label}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert err["code"] == status and pattern in err["message"], f"{label}: {err}"
    TIMINGS[label] = median = statistics.median(times)
    assert median < FAST_MS, f"{label}: median {median:.1f} ms (all: {[round(t, 1) for t in times]})"


def _words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


# ---- context -----------------------------------------------------------------------------------------------
def test_prompt_beyond_the_context(live):
    prompt = _words(300)  # several hundred tokens against a 128-token context
    _fast_4xx(
        "generate: prompt > context",
        lambda: live.post("/generate", json={"prompt": prompt, "max_new_tokens": 4}),
        400,
        "context length",
    )
    _fast_4xx(
        "chat: prompt > context",
        lambda: live.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
        ),
        400,
        "context length",
    )
    _fast_4xx(
        "completions: prompt > context",
        lambda: live.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}),
        400,
        "context length",
    )


def test_prompt_plus_max_new_tokens_beyond_the_context(live, tokenizer):
    n = 1
    while len(tokenizer.encode(_words(n), add_special_tokens=False)) <= CONTEXT - CAP + 2:
        n += 1
    prompt = _words(n)  # fits the context alone, not with CAP new tokens
    assert len(tokenizer.encode(prompt, add_special_tokens=False)) < CONTEXT
    _fast_4xx(
        "generate: prompt + max_new_tokens > context",
        lambda: live.post("/generate", json={"prompt": prompt, "max_new_tokens": CAP}),
        400,
        "context length",
    )
    assert live.post("/generate", json={"prompt": prompt, "max_new_tokens": 1}).status_code == 200


def test_huge_prompt_is_refused_without_stalling_the_server(live):
    """A prompt near the body limit costs real tokenizer time; it must not hold up the event loop."""
    prompt = _words(BODY_LIMIT // 12)  # ~0.9 MB of text: ~1 s of tokenizer time
    results: list[httpx.Response] = []

    took: list[float] = []

    def send() -> None:
        with httpx.Client(base_url=str(live.base_url), timeout=60) as c:
            t0 = time.perf_counter()
            results.append(c.post("/generate", json={"prompt": prompt, "max_new_tokens": 4}))
            took.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        assert live.get("/health").status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [400] * 3
    assert all("context length" in r.json()["error"]["message"] for r in results)
    TIMINGS["/health during huge prompts (worst)"] = worst * 1000
    TIMINGS["0.9 MB prompt > context (slowest of 3 concurrent)"] = max(took) * 1000
    assert worst < 0.5, f"/health took {worst * 1000:.0f} ms while huge prompts were tokenized"


# ---- max_new_tokens cap ------------------------------------------------------------------------------------
def test_max_new_tokens_beyond_the_cap(live):
    _fast_4xx(
        "generate: max_new_tokens > cap",
        lambda: live.post("/generate", json={"prompt": "Hi", "max_new_tokens": CAP + 1}),
        400,
        f"cap of {CAP}",
    )
    _fast_4xx(
        "chat: max_tokens > cap",
        lambda: live.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6},
        ),
        400,
        f"cap of {CAP}",
    )
    _fast_4xx(
        "completions: max_tokens > cap",
        lambda: live.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10**9}),
        400,
        f"cap of {CAP}",
    )
    _fast_4xx(
        "generate: max_new_tokens absurd",
        lambda: live.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10**30}),
        400,
        f"cap of {CAP}",
    )


def test_route_defaults_respect_a_small_cap(live):
    """Omitting the token budget must not fail just because the route's default exceeds the server cap."""
    r = live.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= CAP
    r = live.post("/generate", json={"prompt": "Hi"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= CAP


# ---- steering ---------------------------------------------------------------------------------------------
def test_too_many_vectors(live):
    entries = [{"name": "calm", "strength": 0.1}] * 17
    _fast_4xx(
        "17 vectors",
        lambda: live.post(
            "/generate", json={"prompt": "Hi", "max_new_tokens": 2, "steering": {"vectors": entries}}
        ),
        400,
        "at most 16",
    )
    _fast_4xx(
        "65 vectors (schema)",
        lambda: live.post(
            "/generate", json={"prompt": "Hi", "max_new_tokens": 2, "steering": {"vectors": entries * 4}}
        ),
        422,
        "at most 64",
    )
    distinct = [{"name": name, "strength": 0.1} for name in ["calm", *(f"calm{i}" for i in range(15))]]
    ok = live.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "steering": {"vectors": distinct}})
    assert ok.status_code == 200, ok.text


# ---- bodies -----------------------------------------------------------------------------------------------
def test_huge_json_body(live):
    body = json.dumps({"prompt": "x" * (2 * BODY_LIMIT), "max_new_tokens": 1}).encode()
    headers = {"content-type": "application/json"}
    _fast_4xx(
        "huge JSON (Content-Length)",
        lambda: live.post("/generate", content=body, headers=headers),
        413,
        "exceeds",
    )

    def chunked() -> httpx.Response:
        def gen():
            for i in range(0, len(body), 64 * 1024):
                yield body[i : i + 64 * 1024]

        return live.post("/generate", content=gen(), headers=headers)  # no Content-Length: chunked

    _fast_4xx("huge JSON (chunked)", chunked, 413, "exceeds")
    assert live.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 200


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


def _read_response(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                break
    except TimeoutError:
        pass
    return b"".join(chunks)


def test_slow_client_does_not_block_others_and_gets_408(live):
    port = live.base_url.port
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    stalled = [_raw(port, head + b'{"prompt": "') for _ in range(5)]  # a few body bytes, then nothing
    headers_only = _raw(port, b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # stalls inside the headers
    t0 = time.monotonic()
    try:
        for _ in range(3):  # meanwhile the server answers others normally
            t = time.perf_counter()
            r = live.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4})
            assert r.status_code == 200, r.text
            assert time.perf_counter() - t < 5
        assert live.get("/health").status_code == 200
        for s in stalled:
            raw = _read_response(s, timeout=BODY_TIMEOUT + 10)
            assert raw.startswith(b"HTTP/1.1 408"), raw[:200]
            assert b"connection: close" in raw.lower() and b"request body not received" in raw
        waited = time.monotonic() - t0
        assert waited < BODY_TIMEOUT + 5, f"the stalled clients were answered after {waited:.1f} s"
    finally:
        for s in [*stalled, headers_only]:
            s.close()
    assert live.post("/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 200
