"""The generation path over HTTP (server/generation.py, server/render.py) with a tiny random Llama: the
sampling settings of SPEC §9.1 reach the engine from every route, log-probabilities and ``n`` samples come
back in each route's shape (whole and streamed), and faults stay in their request — a value that cannot
work is a 400 while the batch runs on, a failing step is a 500 (or an SSE error event) for its request
only, a failed allocation leaks nothing. Concurrent cases run on a real loopback socket."""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import (
    fail_once,
    lora_artifact,
    padded_logits,
    red_artifact,
    tiny_loaded,
    uvicorn_thread,
    wait_for,
)

from server.app import create_app
from server.config import ServerConfig
from server.engine import SamplingParams
from server.state import ServerState
from steering_vectors import Artifact, Profile

PROMPT = "Hello there, how are you"
LONG = {"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture
def make_server(tmp_path, tokenizer):
    """make_server(step_delay=0, **config) -> (state, TestClient); everything is closed at teardown."""
    stack, count = contextlib.ExitStack(), iter(range(100))

    def build(step_delay: float = 0.0, **config: Any) -> tuple[ServerState, TestClient]:
        cfg = ServerConfig(quantization="none", vector_dir=tmp_path / f"v{next(count)}", **config)
        state = ServerState(cfg)
        loaded = tiny_loaded(tokenizer)
        if step_delay:
            loaded.model.register_forward_pre_hook(lambda _m, _a: time.sleep(step_delay))
        state.load(loaded)
        return state, stack.enter_context(TestClient(create_app(state)))

    with stack:
        yield build


def upload(client: TestClient, name: str, art: Artifact) -> None:
    files = {"file": ("v.safetensors", art.to_bytes(), "application/octet-stream")}
    assert client.post("/v1/vectors", data={"name": name}, files=files).status_code == 201


def sse(resp: httpx.Response) -> list[Any]:
    """The JSON payloads of an SSE stream, then the literal ``[DONE]``."""
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def _idle_and_clean(state: ServerState) -> None:
    """Wait until the engine has finished its bookkeeping: no request, every row, page and slot free."""
    engine = state.engine

    def clean() -> bool:
        return (
            engine.idle()
            and engine.cache.free_pages == engine.cache.num_pages
            and engine.scheduler.free_rows == engine.max_batch_size
            and (engine.hooks is None or engine.hooks.slots_in_use == 0)
        )

    wait_for(clean, what="every row, KV page and steering slot to be free")


# ---- faults stay in their request ------------------------------------------------------------------------
def test_huge_top_k_is_a_400_while_the_other_rows_finish_normally(make_server):
    state, client = make_server(step_delay=0.02)
    solo = client.post("/generate", json=LONG).json()
    with uvicorn_thread(client.app) as url, ThreadPoolExecutor(3) as pool:
        http = httpx.Client(base_url=url, timeout=60)
        running = [pool.submit(http.post, "/generate", json=LONG) for _ in range(3)]
        wait_for(lambda: state.engine.running == 3, what="three rows running")
        for path, body in (
            ("/generate", {**LONG, "temperature": 1.0, "top_k": 2**63}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_k": 2**63}),
        ):
            r = http.post(path, json=body)
            assert r.status_code == 400 and "top_k must be" in r.json()["error"]["message"], r.text
        assert state.engine.running == 3  # the refusal never touched the batch
        done = [f.result().json() for f in running]
    assert [(d["finish_reason"], d["text"]) for d in done] == [("length", solo["text"])] * 3
    _idle_and_clean(state)


def test_a_failing_step_fails_only_its_request_and_the_next_one_succeeds(make_server, tokenizer):
    state, client = make_server(step_delay=0.01)
    marker = tokenizer.encode(" zebra", add_special_tokens=False)[-1]
    assert marker not in tokenizer.encode(PROMPT, add_special_tokens=False)

    def poison(_module, args):
        if (args[0] == marker).any():
            raise RuntimeError("poisoned token")

    state.loaded.model.model.embed_tokens.register_forward_pre_hook(poison)
    good = {**LONG, "logit_bias": {str(marker): -100}}  # the good rows never feed the marker back
    solo = client.post("/generate", json=good).json()
    bad = {**LONG, "prompt": PROMPT + " zebra"}
    with uvicorn_thread(client.app) as url, ThreadPoolExecutor(3) as pool:
        http = httpx.Client(base_url=url, timeout=60)
        ok = pool.submit(http.post, "/generate", json=good)
        failed = pool.submit(http.post, "/generate", json=bad)
        chat = {"messages": [{"role": "user", "content": "a zebra"}], "max_tokens": 4, "stream": True}

        def stream() -> list[Any]:
            with http.stream("POST", "/v1/chat/completions", json=chat) as r:
                assert r.status_code == 200
                return sse(r)

        streamed = pool.submit(stream)
        err = failed.result().json()["error"]
        assert failed.result().status_code == 500 and err["type"] == "internal_error"
        assert failed.result().headers["x-request-id"] in err["message"]
        events = streamed.result()
        assert events[-1] == "[DONE]" and set(events[-2]) == {"error"}
        assert events[-2]["error"]["code"] == 500 and "generation failed" in events[-2]["error"]["message"]
        assert ok.result().status_code == 200 and ok.result().json()["text"] == solo["text"]
        nxt = http.post("/generate", json=good)
    assert nxt.status_code == 200 and nxt.json()["text"] == solo["text"]
    _idle_and_clean(state)


def test_a_failed_allocation_leaks_no_slot_and_orphans_no_request(make_server, monkeypatch):
    state, client = make_server()
    upload(client, "lora", lora_artifact(state.loaded.model, rank=4))
    hooks = state.engine.hooks
    failing = fail_once(hooks.tables.stage, MemoryError("no memory for the LoRA tables"))
    monkeypatch.setattr(hooks.tables, "stage", failing)
    body = {**LONG, "max_new_tokens": 4, "steering": {"vectors": [{"name": "lora"}]}}
    r = client.post("/generate", json=body)
    assert r.status_code == 500 and "generation failed" in r.json()["error"]["message"]
    _idle_and_clean(state)
    again = client.post("/generate", json=body)
    assert again.status_code == 200 and again.json()["finish_reason"] == "length"
    _idle_and_clean(state)


def test_steering_is_compiled_off_the_event_loop(make_server, monkeypatch):
    """Reading and stacking a profile's artifacts runs in a worker thread: while one request's steering
    takes a second to compile, /health and another request are answered."""
    state, client = make_server()
    upload(client, "red", red_artifact(state.loaded.model))
    compile_profile = state.store.compile

    def slow_compile(profile: Profile):
        if profile.vectors:  # the steered request only
            time.sleep(1.0)
        return compile_profile(profile)

    monkeypatch.setattr(state.store, "compile", slow_compile)
    steered = {**LONG, "max_new_tokens": 2, "steering": {"vectors": [{"name": "red"}]}}
    with uvicorn_thread(client.app) as url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, url + "/generate", json=steered, timeout=60)
        time.sleep(0.2)  # the steered request is compiling now
        t0 = time.monotonic()
        health = httpx.get(url + "/health", timeout=60)
        plain = httpx.post(url + "/generate", json={**LONG, "max_new_tokens": 2}, timeout=60)
        waited = time.monotonic() - t0
        assert not pending.done()  # still compiling: the loop answered around it
        assert health.status_code == 200 and plain.status_code == 200 and waited < 0.7
        assert pending.result().status_code == 200


# ---- the sampling settings reach the engine ---------------------------------------------------------
def test_every_route_hands_its_sampling_settings_to_the_engine(make_server, monkeypatch):
    state, client = make_server()
    seen: list[SamplingParams] = []
    submit = state.engine.submit

    def spy(ids, params, *a, **k):
        seen.append(params)
        return submit(ids, params, *a, **k)

    monkeypatch.setattr(state.engine, "submit", spy)
    common = {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.05,
        "seed": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"17": 3.5, "42": -100},
        "min_tokens": 2,
        "ignore_eos": True,
    }
    want = SamplingParams(
        max_new_tokens=4,
        **{k: v for k, v in common.items() if k != "logit_bias"},
        logit_bias={17: 3.5, 42: -100.0},
        logprobs=True,
        top_logprobs=2,
    )
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "n": 2}
    for path, body in (
        ("/generate", {"prompt": PROMPT, "max_new_tokens": 4, "logprobs": True, "top_logprobs": 2}),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "n": 2, "logprobs": 2}),
    ):
        r = client.post(path, json={**body, **common})
        assert r.status_code == 200, r.text
    n = [1, 2, 2]
    assert seen == [SamplingParams(**{**vars(want), "n": k}) for k in n]


# ---- log-probabilities ---------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_the_logits_in_every_shape_and_follow_steering(make_server, tokenizer):
    state, client = make_server()
    model, hooks = state.loaded.model, state.engine.hooks
    upload(client, "red", red_artifact(model, spread=0.3))
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    asked = {"prompt": PROMPT, "max_new_tokens": 5, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    firsts = {}
    for name, steering in (("plain", None), ("steered", {"vectors": [{"name": "red"}]})):
        res = client.post("/generate", json={**asked, "steering": steering}).json()
        lps = res["logprobs"]
        out = tokenizer.encode(res["text"], add_special_tokens=False)
        with contextlib.ExitStack() as stack:
            if steering is not None:
                compiled = state.store.compile(Profile.from_dict(steering))
                slot = hooks.acquire(compiled)
                stack.callback(hooks.release, slot)
                stack.enter_context(hooks.batch([slot]))
            ref = torch.log_softmax(padded_logits(model, [ids + out])[0, len(ids) - 1 : -1].float(), -1)
        got = torch.tensor([x["logprob"] for x in lps])
        torch.testing.assert_close(got, ref[torch.arange(len(out)), torch.tensor(out)], atol=1e-5, rtol=0)
        top = torch.tensor([[t["logprob"] for t in x["top"]] for x in lps])
        torch.testing.assert_close(top, ref.topk(3, -1).values, atol=1e-5, rtol=0)
        assert [x["token"] for x in lps] == [tokenizer.decode([t]) for t in out]
        firsts[name] = got
    assert not torch.allclose(firsts["plain"], firsts["steered"])  # steering moved them

    plain = client.post("/generate", json=asked).json()["logprobs"]
    chat_like = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    comp = client.post("/v1/completions", json={**chat_like, "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert comp["tokens"] == [x["token"] for x in plain]
    assert comp["token_logprobs"] == [x["logprob"] for x in plain]
    assert comp["top_logprobs"] == [{t["token"]: t["logprob"] for t in x["top"]} for x in plain]
    assert comp["text_offset"][0] == 0 and comp["text_offset"][1] == len(plain[0]["token"])
    with client.stream("POST", "/generate", json={**asked, "stream": True}) as r:
        streamed = [lp for ev in sse(r)[:-1] for lp in ev["logprobs"]]
    assert streamed == plain


# ---- n samples -----------------------------------------------------------------------------------------
def test_n_samples_with_a_seed_are_reproducible_choices_whole_and_streamed(make_server):
    state, client = make_server()
    body = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
        "n": 4,
        "ignore_eos": True,
        "logprobs": True,
    }
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert texts == [c["message"]["content"] for c in b["choices"]] and len(set(texts)) > 1
    assert all(len(c["logprobs"]["content"]) == 6 for c in a["choices"])
    assert a["usage"]["completion_tokens"] == 24
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as r:
        events = sse(r)
    assert (
        events[-1] == "[DONE]"
        and events[-2]["choices"] == []
        and events[-2]["usage"]["completion_tokens"] == 24
    )
    parts: dict[int, str] = {}
    for ev in events[:-2]:
        (choice,) = ev["choices"]
        parts[choice["index"]] = parts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert [parts[i] for i in range(4)] == texts
    finished = [ev["choices"][0]["index"] for ev in events[:-2] if ev["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2, 3]
    comp = {"prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 3, "ignore_eos": True}
    choices = client.post("/v1/completions", json=comp).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and all(c["logprobs"] is None for c in choices)
    _idle_and_clean(state)


# ---- the engine's limits are serve options ---------------------------------------------------------------
def test_engine_limits_from_the_serve_options(make_server):
    state, client = make_server(
        kv_cache_tokens=128, max_batched_tokens=32, max_lora_rank=2, max_profile_rank=4
    )
    engine = state.engine
    assert engine.cache.num_pages * engine.cache.page_size == 128 and engine.hooks.max_rank == 4
    assert engine.scheduler.max_batched_tokens == 32
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 200})
    assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"], r.text
    upload(client, "lora", lora_artifact(state.loaded.model, rank=4))
    r = client.post("/generate", json={**LONG, "steering": {"vectors": [{"name": "lora"}]}})
    assert r.status_code == 400 and "max_lora_rank 2" in r.json()["error"]["message"], r.text
    assert client.post("/generate", json={**LONG, "max_new_tokens": 4}).status_code == 200
