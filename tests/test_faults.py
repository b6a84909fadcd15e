"""Fault tests (issue 7) against real server processes (tests/tiny_server.py: the tiny random model behind
``server.serve.DrainingServer``): kill -9 in the middle of uploads, SIGTERM with requests in flight, clients
that disconnect mid-stream, and malformed or hostile artifacts uploaded over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import signal
import struct
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from helpers import PickleCanary, add_artifact, lora_artifact, tiny_llama
from safetensors.torch import save as st_save
from tiny_server import TinyServer

from steering_vectors.artifact import parse_artifact

MiB = 1024 * 1024
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    """The served tiny model's twin (same seed and shapes), to build artifacts that fit it."""
    return tiny_llama()


def _generate(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 2, **body})


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _counter_total(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


# ---- kill -9 in the middle of uploads -------------------------------------------------------------------
def _check_store(url: str, vdir: Path, acked: dict[str, str], attempted: set[str]) -> list[dict]:
    """Every acknowledged upload is listed with its sha256; every listed vector loads; nothing else shows."""
    with httpx.Client(base_url=url, timeout=60) as c:
        listing = c.get("/v1/vectors").json()["data"]
        by_name = {v["name"]: v for v in listing}
        for name, sha in acked.items():
            assert name in by_name, f"acknowledged upload {name} is gone after kill -9"
            assert by_name[name]["sha256"] == sha, f"{name}: listed version differs from the acknowledged one"
        for name, info in by_name.items():
            assert name in attempted, f"{name} was never uploaded"
            assert not name.startswith(".") and not name.endswith(".tmp")
            data = (vdir / name / f"{info['sha256']}.safetensors").read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"]
            parse_artifact(data, max_bytes=64 * MiB)  # complete and valid
            r = _generate(c, max_new_tokens=1, steering={"vectors": [{"name": name}]})
            assert r.status_code == 200, f"{name} does not load: {r.text}"
    assert not list(vdir.rglob("*.tmp")), "temporary files survived a restart"
    return listing


class _Uploader:
    """Threads uploading artifacts (a 4 MB lora every other time) under fresh names until the server dies."""

    def __init__(self, big: list[bytes], small: list[bytes]) -> None:
        self.big, self.small = big, small
        self.acked: dict[str, str] = {}
        self.attempted: set[str] = set()
        self.interrupted = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.first_ack = threading.Event()

    def run(self, url: str, rnd: int, tid: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for k in range(1000):
                name = f"r{rnd}-t{tid}-{k}"
                i = tid + k
                data = self.big[i % len(self.big)] if i % 2 == 0 else self.small[i % len(self.small)]
                with self.lock:
                    self.attempted.add(name)
                try:
                    r = c.post("/v1/vectors", data={"name": name}, files={"file": ("v.safetensors", data)})
                except httpx.TransportError:  # the server died under this upload
                    with self.lock:
                        self.interrupted += 1
                    return
                if r.status_code != 201 or r.json()["sha256"] != hashlib.sha256(data).hexdigest():
                    self.failures.append(f"{name}: {r.status_code} {r.text[:300]}")
                    return
                with self.lock:
                    self.acked[name] = r.json()["sha256"]
                self.first_ack.set()


def _big_lora(model, seed: int) -> bytes:
    """A valid LoRA artifact over 4 MiB: rank 64 (the largest SPEC §9.1 allows), padded by its description."""
    art = lora_artifact(model, modules=LORA_MODULES, rank=64, seed=seed)
    art.extra["description"] = "x" * (5 * MiB)
    return art.to_bytes()


def test_kill_9_during_uploads_keeps_every_acknowledged_vector(tmp_path: Path, model):
    vdir, log = tmp_path / "vectors", tmp_path / "server.log"
    rng = random.Random(20240607)
    big = [_big_lora(model, seed=s) for s in range(3)]
    assert all(len(b) > 4 * MiB for b in big)
    up = _Uploader(big, [add_artifact(model, seed=s).to_bytes() for s in range(10, 16)])
    for rnd in range(2):
        srv = TinyServer(vdir, log, max_upload_bytes=16 * MiB).start()
        try:
            _check_store(srv.url, vdir, up.acked, up.attempted)  # what the previous kill left
            up.first_ack.clear()
            threads = [threading.Thread(target=up.run, args=(srv.url, rnd, t)) for t in range(4)]
            for t in threads:
                t.start()
            assert up.first_ack.wait(120), f"no upload was acknowledged:\n{srv.tail()}"
            time.sleep(rng.uniform(0.05, 0.6))  # a seeded moment while uploads are in flight
            srv.kill9()
            for t in threads:
                t.join(timeout=60)
            assert not up.failures, up.failures
        finally:
            srv.stop()
    assert up.interrupted > 0, "kill -9 never landed in the middle of an upload"
    srv = TinyServer(vdir, log).start()
    try:
        listing = _check_store(srv.url, vdir, up.acked, up.attempted)
    finally:
        srv.stop()
    print(f"kill -9: {len(up.acked)} acknowledged, {len(listing)} listed, {up.interrupted} interrupted")


# ---- SIGTERM with requests in flight --------------------------------------------------------------------
def _stream(url: str, body: dict, started: threading.Event, out: dict) -> None:
    """POST a streaming /generate; record status, deltas, the finish event and whether [DONE] came."""
    deltas, finish, done = [], None, False
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    started.set()
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        continue
                    ev = json.loads(data)
                    deltas.append(ev["text"])
                    if "finish_reason" in ev:
                        finish = ev
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    finally:
        started.set()
        out.update(text="".join(deltas), finish=finish, done=done)


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path: Path):
    drain = 8.0
    srv = TinyServer(
        tmp_path / "vectors",
        tmp_path / "server.log",
        drain_timeout=drain,
        step_delay=0.02,
        context=4096,
        max_new_tokens=4000,
    ).start()
    try:
        short = {"max_new_tokens": 60}
        longer = {"max_new_tokens": 3000}  # cannot finish within the drain timeout
        results = [dict() for _ in range(4)]
        started = [threading.Event() for _ in range(4)]
        bodies = [{"prompt": f"Story number {i}:", **short} for i in range(3)]
        bodies.append({"prompt": "A very long story:", **longer})
        threads = [
            threading.Thread(target=_stream, args=(srv.url, b, s, o))
            for b, s, o in zip(bodies, started, results, strict=True)
        ]
        plain: dict = {}

        def non_streaming() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                plain["response"] = c.post("/generate", json={"prompt": "Plain:", **short})

        threads.append(threading.Thread(target=non_streaming))
        for t in threads:
            t.start()
        for s in started:
            assert s.wait(60), srv.tail()
        deadline = time.monotonic() + 60
        while True:  # all five requests are in the engine (the non-streaming one has no first event)
            text = httpx.get(srv.url + "/metrics", timeout=10).text
            if _gauge(text, "steer_running_requests") + _gauge(text, "steer_waiting_requests") >= 5:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
        srv.signal(signal.SIGTERM)
        t0 = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            ready = c.get("/ready")
            assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
            fresh = _generate(c)
            assert fresh.status_code == 503, fresh.text
            assert fresh.headers.get("retry-after")
            assert "draining" in fresh.json()["error"]["message"]
            chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 503 and chat.headers.get("retry-after")
        for t in threads:
            t.join(timeout=drain + 60)
        for r in results[:3]:
            assert r.get("status") == 200 and "error" not in r, r
            assert r["done"], f"stream did not end with [DONE]: {r}"
            fin = r["finish"]
            assert fin is not None and fin["finish_reason"] in ("length", "stop"), r
            if fin["finish_reason"] == "length":
                assert fin["usage"]["completion_tokens"] == short["max_new_tokens"]
            assert r["text"], r
        r = plain["response"]
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] in ("length", "stop") and r.json()["text"]
        cut = results[3]
        assert cut.get("status") == 200 and cut["done"], cut
        assert cut["finish"]["finish_reason"] == "cancelled", cut["finish"]
        assert srv.proc is not None
        srv.proc.wait(timeout=drain + 60)
        elapsed = time.monotonic() - t0
        print(f"SIGTERM -> exit in {elapsed:.2f} s (drain timeout {drain} s)")
        assert srv.proc.returncode == 0, srv.tail()
        # the drain timeout, plus the last flush and interpreter teardown on a loaded machine
        assert elapsed < drain + 6.0, f"exit took {elapsed:.1f} s with a {drain} s drain timeout"
    finally:
        srv.stop()


# ---- one shared server for the disconnect and malformed-upload tests ------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tiny")
    srv = TinyServer(tmp / "vectors", tmp / "server.log", step_delay=0.01, max_upload_bytes=4 * MiB).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_fifty_mid_stream_disconnects_free_their_rows(tiny):
    with httpx.Client(base_url=tiny.url, timeout=60) as c:
        tokens_before = _counter_total(c.get("/metrics").text, "steer_generation_tokens_total")
    max_new = 400
    errors: list[str] = []

    def disconnect(i: int) -> None:
        try:
            with httpx.Client(base_url=tiny.url, timeout=60) as c:
                body = {"prompt": f"Count to {i}:", "max_new_tokens": max_new, "stream": True}
                with c.stream("POST", "/generate", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.read()!r}")
                        return
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            break  # first event read: hang up
        except httpx.HTTPError as e:
            errors.append(repr(e))

    for wave in range(5):
        threads = [threading.Thread(target=disconnect, args=(wave * 10 + i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    with httpx.Client(base_url=tiny.url, timeout=60) as c:
        r = _generate(c, max_new_tokens=8)
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] in ("length", "stop")
        deadline = time.monotonic() + 30
        while True:
            text = c.get("/metrics").text
            running = _gauge(text, "steer_running_requests")
            waiting = _gauge(text, "steer_waiting_requests")
            if running == 0.0 and waiting == 0.0:
                break
            assert time.monotonic() < deadline, f"gauges stuck: running={running} waiting={waiting}"
            time.sleep(0.1)
        generated = _counter_total(text, "steer_generation_tokens_total") - tokens_before
    # 50 rows that ran to the end would have produced 50 * 400 tokens; disconnected rows stop early
    assert generated < 50 * max_new / 4, f"{generated} tokens generated: disconnects did not free rows"


# ---- malformed and hostile artifacts --------------------------------------------------------------------
def _st(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    base = {
        "format": "steerserve.v1",
        "kind": "add",
        "model_type": "llama",
        "hidden_size": "64",
        "num_layers": "2",
        "method": "mean-diff",
    }
    return st_save(tensors, metadata={**base, **meta})


def _vec(d: int = 64) -> torch.Tensor:
    return torch.linspace(-1, 1, d)


def _malformed(case: str, model, canary: Path) -> tuple[bytes, list[int], str]:
    """(file bytes, accepted statuses, regex the error message must match) for one hostile upload."""
    valid = add_artifact(model).to_bytes()
    if case == "pickle-canary":
        return pickle.dumps({"x": PickleCanary(canary)}, protocol=4), [400], r"pickle"
    if case == "pickle-protocol-0":
        return pickle.dumps(PickleCanary(canary), protocol=0), [400], r"header|safetensors"
    if case == "torch-save-canary":
        buf = io.BytesIO()
        torch.save({"x": PickleCanary(canary)}, buf)
        return buf.getvalue(), [400], r"zip"
    if case == "header-claims-1TiB":
        return struct.pack("<Q", 1 << 40) + b'{"a":1}' + b" " * 64, [400], r"header of \d+ bytes exceeds"
    if case == "header-claims-past-end":
        return struct.pack("<Q", 8 * MiB) + b"{" + b" " * 1024, [400], r"truncated"
    if case == "truncated-data":
        return valid[: len(valid) - 100], [400], r"truncated"
    if case == "truncated-to-5-bytes":
        return valid[:5], [400], r"truncated|too short"
    if case == "empty-file":
        return b"", [400], r"truncated|too short|empty"
    if case == "header-not-json":
        return struct.pack("<Q", 16) + b"{not json at all", [400], r"JSON"
    if case == "nan":
        t = _vec()
        t[3] = float("nan")
        return _st({"layers.0.direction": t}), [400], r"NaN"
    if case == "inf":
        t = _vec()
        t[5] = float("inf")
        return _st({"layers.1.direction": t}), [400], r"NaN or Inf"
    if case == "wrong-dims":
        return _st({"layers.0.direction": _vec(63)}), [400], r"shape \[63\].*\[64\]"
    if case == "wrong-rank":
        return _st({"layers.0.direction": torch.ones(2, 64)}), [400], r"shape \[2, 64\]"
    if case == "hidden-size-mismatch":
        return _st({"layers.0.direction": _vec(128)}, hidden_size="128"), [409], r"hidden_size 128"
    if case == "10000-layers":
        tensors = {f"layers.{i}.direction": _vec().half() for i in range(10_000)}
        return _st(tensors, num_layers="10000"), [409], r"num_layers 10000"
    if case == "layer-beyond-model":
        return _st({"layers.9999.direction": _vec()}), [400], r"layer 9999 out of range"
    if case == "absurd-num-layers":
        return _st({"layers.0.direction": _vec()}, num_layers=str(10**12)), [400], r"out of range"
    if case == "int-dtype":
        return _st({"layers.0.direction": torch.arange(64, dtype=torch.int32)}), [400], r"dtype"
    if case == "unknown-kind":
        return _st({"layers.0.direction": _vec()}, kind="pickle"), [400], r"kind"
    if case == "lora-rank-mismatch":
        tensors = {"layers.0.q_proj.lora_A": torch.ones(4, 64), "layers.0.q_proj.lora_B": torch.ones(64, 3)}
        return _st(tensors, kind="lora", lora_alpha="8.0"), [400], r"rank mismatch"
    if case == "lora-not-a-linear":
        tensors = {"layers.0.evil.lora_A": torch.ones(4, 64), "layers.0.evil.lora_B": torch.ones(64, 4)}
        return _st(tensors, kind="lora", lora_alpha="8.0"), [409], r"not a linear"
    if case == "gguf-garbage":
        return b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(256), [400], r"GGUF|gguf"
    if case == "over-upload-cap":  # past the store's 4 MiB cap, within the edge's cap + 1 MiB
        return valid + b"\0" * (4 * MiB + 10 - len(valid)), [413], r"exceeds"
    if case == "far-over-upload-cap":  # past the edge cap: refused before it is parsed
        return b"\0" * (6 * MiB), [413], r"exceeds"
    raise AssertionError(case)


MALFORMED = [
    "pickle-canary",
    "pickle-protocol-0",
    "torch-save-canary",
    "header-claims-1TiB",
    "header-claims-past-end",
    "truncated-data",
    "truncated-to-5-bytes",
    "empty-file",
    "header-not-json",
    "nan",
    "inf",
    "wrong-dims",
    "wrong-rank",
    "hidden-size-mismatch",
    "10000-layers",
    "layer-beyond-model",
    "absurd-num-layers",
    "int-dtype",
    "unknown-kind",
    "lora-rank-mismatch",
    "lora-not-a-linear",
    "gguf-garbage",
    "over-upload-cap",
    "far-over-upload-cap",
]

BAD_NAMES = {
    "nul": "calm\x00evil",
    "newline": "calm\nevil",
    "trailing-newline": "calm\n",
    "escape": "\x1b[31mred",
    "cr": "calm\r",
    "tab": "calm\tx",
    "dotdot-slash": "../x",
    "dotdot": "..",
    "dot": ".",
    "slash": "a/b",
    "backslash": "..\\x",
    "absolute": "/etc/passwd",
    "percent-encoded": "%2e%2e",
    "percent-slash": "a%2fb",
    "hidden": ".hidden",
    "empty": "",
    "too-long": "a" * 65,
    "unicode": "cälm",
    "space": "calm evil",
}


def _snapshot(root: Path) -> dict[str, int]:
    """Files (with sizes) and folders under ``root``, less the directory's lock and change marker."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (".lock", ".generation")]
    return {str(p.relative_to(root)): p.stat().st_size for p in files} | {
        str(p.relative_to(root)) + "/": 0 for p in root.rglob("*") if p.is_dir()
    }


def _upload(url: str, name: str, filename: str, data: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/vectors", data={"name": name}, files={"file": (filename, data)}, timeout=120)


def _assert_rejected(tiny, name: str, filename: str, data: bytes, statuses: list[int], pattern: str) -> None:
    vdir = tiny.vector_dir
    before, listed = _snapshot(vdir), httpx.get(tiny.url + "/v1/vectors").json()["data"]
    t0 = time.monotonic()
    r = _upload(tiny.url, name, filename, data)
    elapsed = time.monotonic() - t0
    assert r.status_code in statuses, f"{r.status_code} {r.text[:500]}"
    message = r.json()["error"]["message"]
    assert re.search(pattern, message, re.I), f"message {message!r} does not name the problem ({pattern})"
    assert _snapshot(vdir) == before, "a rejected upload left something in the vector directory"
    assert httpx.get(tiny.url + "/v1/vectors").json()["data"] == listed
    assert elapsed < 30


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_artifact_is_rejected_and_nothing_is_stored(tiny, model, case, tmp_path: Path):
    canary = tmp_path / f"canary-{uuid.uuid4().hex}"
    data, statuses, pattern = _malformed(case, model, canary)
    _assert_rejected(tiny, f"bad-{case}"[:64], "v.safetensors", data, statuses, pattern)
    assert not canary.exists(), "the pickle ran on the server"


@pytest.mark.parametrize("label", list(BAD_NAMES))
def test_hostile_vector_name_is_rejected(tiny, model, label):
    pattern = r"name" if label != "empty" else r"'name' is required"
    _assert_rejected(tiny, BAD_NAMES[label], "v.safetensors", add_artifact(model).to_bytes(), [400], pattern)


@pytest.mark.parametrize("ext", [".safetensors", ".gguf"])
@pytest.mark.parametrize("style", ["relative", "absolute", "dotdot-only"])
def test_upload_filename_is_never_used_as_a_path(tiny, model, tmp_path: Path, ext: str, style: str):
    from steering_vectors import export_gguf

    marker = f"escape-{uuid.uuid4().hex[:12]}"
    filename = {
        "relative": f"../../../{marker}{ext}",
        "absolute": f"{tmp_path}/{marker}{ext}",
        "dotdot-only": "..",
    }[style]
    art = add_artifact(model, layers=[1])
    if ext == ".gguf":
        path = tmp_path / "cv.gguf"
        export_gguf(art, path)
        data = path.read_bytes()
    else:
        data = art.to_bytes()
    name = f"fn-{style}-{ext.strip('.')}"
    before = _snapshot(tiny.vector_dir)
    r = _upload(tiny.url, name, filename, data)
    assert r.status_code == 201, r.text
    sha = r.json()["sha256"]
    added = set(_snapshot(tiny.vector_dir)) - set(before)
    assert added == {f"{name}/", f"{name}/index.json", f"{name}/{sha}.safetensors"}, added
    places = [Path.cwd(), tmp_path, *list(tiny.vector_dir.parents)[:4], Path("/tmp")]
    leaked = [p for place in places for p in place.glob(f"{marker}*")]
    assert not leaked, leaked
    assert httpx.delete(f"{tiny.url}/v1/vectors/{name}").status_code == 200
