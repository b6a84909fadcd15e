"""The edge middleware (server/edge.py) and authentication (server/auth.py), issue 13: the key is checked
before a byte of the body is read, the docs need the key, ``--host ""`` is not loopback, JSON sent as
text/plain gets 415, every response carries the request id (= the OpenAI id = the log's id), a lone
surrogate gets 400 on a connection that stays open, and the body deadline covers the whole body."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import add_artifact, tiny_loaded, uvicorn_thread

from server.app import create_app
from server.auth import access_of, is_loopback
from server.config import ServerConfig
from server.state import ServerState

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-secret"}


def make_state(tmp_path: Path, tokenizer: Any, **config: Any) -> ServerState:
    config.setdefault("vector_dir", tmp_path / "vectors")
    state = ServerState(ServerConfig(quantization="none", **config))
    state.load(tiny_loaded(tokenizer))
    return state


@pytest.fixture
def keyed(tmp_path, tokenizer):
    state = make_state(tmp_path, tokenizer, api_key="user-secret", admin_key="admin-secret")
    with TestClient(create_app(state)) as client:
        yield state, client


def _call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, int, dict]:
    """Drive ``app`` over raw ASGI; (status, number of receive() calls, response headers)."""
    calls = {"receive": 0}
    sent: list[dict] = []

    async def receive() -> dict:
        calls["receive"] += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}  # an endless body

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], calls["receive"], dict(start["headers"])


def test_unauthenticated_upload_is_refused_without_reading_its_body(keyed):
    state, client = keyed
    headers = [
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-length", str(60 * 1024 * 1024).encode()),
    ]
    for extra, status in (([], 401), ([(b"authorization", b"Bearer user-secret")], 403)):
        code, reads, resp_headers = _call(client.app, "POST", "/v1/vectors", headers + extra)
        assert (code, reads) == (status, 0)  # answered from the headers alone: no body byte read
        assert resp_headers[b"connection"] == b"close"
    # an authorised upload declaring more than the cap is refused from its headers too (413)
    big = [headers[0], (b"content-length", str(70 * 1024 * 1024).encode())]
    code, reads, _ = _call(
        client.app, "POST", "/v1/vectors", [*big, (b"authorization", b"Bearer admin-secret")]
    )
    assert code == 413 and reads == 0
    assert state.store is not None and state.store.list() == []


def test_docs_and_openapi_need_the_key(keyed):
    _, client = keyed
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=USER).status_code == 200, path
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200


def test_access_table_and_empty_host_is_not_loopback(tmp_path, tokenizer):
    assert (
        access_of("POST", "/v1/vectors") == "admin" and access_of("DELETE", "/v1/vectors/a@12ab") == "admin"
    )
    assert access_of("GET", "/v1/vectors") == "api" and access_of("PUT", "/v1/profiles/p") == "admin"
    assert access_of("GET", "/metrics") == "public" and access_of("POST", "/v1/vectorsx") == "api"
    assert not is_loopback("") and not is_loopback("0.0.0.0") and is_loopback("::1")
    state = make_state(tmp_path, tokenizer, host="")  # every interface, no admin key: mutations refused
    with TestClient(create_app(state)) as client:
        art = add_artifact(state.loaded.model).to_bytes()
        r = client.post("/v1/vectors", data={"name": "v"}, files={"file": ("v.safetensors", art)})
        assert r.status_code == 403 and "STEERSERVE_ADMIN_KEY" in r.json()["error"]["message"]
        assert client.get("/v1/vectors").status_code == 200


def test_json_as_text_plain_is_415(keyed):
    _, client = keyed
    body = json.dumps({"prompt": "Hi", "max_new_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/generate", content=body, headers={**USER, "Content-Type": ctype})
        assert r.status_code == 415 and ctype in r.json()["error"]["message"]
    ok = client.post(
        "/generate", content=body, headers={**USER, "Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200
    r = client.put(
        "/v1/profiles/p", content='{"vectors": []}', headers={**ADMIN, "Content-Type": "text/plain"}
    )
    assert r.status_code == 415


def test_request_id_on_every_response_is_the_openai_and_log_id(keyed, caplog):
    _, client = keyed
    with caplog.at_level(logging.INFO, logger="steerserve.requests"):
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json=chat, headers=USER)
        rid = r.headers["x-request-id"]
        assert rid.startswith("chatcmpl-") and r.json()["id"] == rid
        c = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=USER)
        assert c.headers["x-request-id"].startswith("cmpl-") and c.json()["id"] == c.headers["x-request-id"]
        g = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=USER)
    logged = [
        json.loads(rec.getMessage())["id"] for rec in caplog.records if rec.name == "steerserve.requests"
    ]
    assert logged == [rid, c.headers["x-request-id"], g.headers["x-request-id"]]
    # errors, probes and the edge's own refusals carry one too; a plain client id is kept, others replaced
    for resp in (client.get("/health"), client.get("/v1/models"), client.get("/nope", headers=USER)):
        assert resp.headers["x-request-id"].startswith("req-")
    mine = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1},
        headers={**USER, "X-Request-Id": "trace-42.a"},
    )
    assert mine.headers["x-request-id"] == "trace-42.a" == mine.json()["id"]
    odd = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert odd.headers["x-request-id"].startswith("req-")


def _raw_exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request on ``sock`` and read one whole response (Content-Length framed)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _post(path: str, payload: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload.encode())}\r\n\r\n{payload}"
    ).encode()


def test_lone_surrogate_is_400_and_the_connection_stays_open(tmp_path, tokenizer):
    state = make_state(tmp_path, tokenizer)
    with uvicorn_thread(create_app(state)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for path, payload, status in (
                ("/generate", '{"prompt": "a\\ud800b", "max_new_tokens": 2}', 400),
                ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
                ("/v1/completions", '{"prompt": "x", "model": "\\ud83d", "max_tokens": 2}', 404),
            ):
                resp = _raw_exchange(sock, _post(path, payload))
                assert resp.startswith(f"HTTP/1.1 {status}".encode()), resp[:300]
                err = json.loads(resp.partition(b"\r\n\r\n")[2])["error"]
                assert err["code"] == status
                assert status == 404 or "lone UTF-16 surrogate" in err["message"], err
                assert b"connection: close" not in resp.lower()
            resp = _raw_exchange(sock, _post("/generate", '{"prompt": "Hi", "max_new_tokens": 1}'))
            assert resp.startswith(b"HTTP/1.1 200"), resp[:200]  # the same connection serves the next one


def test_body_deadline_covers_the_whole_body(tmp_path, tokenizer):
    state = make_state(tmp_path, tokenizer, body_timeout=1.0, admin_key="admin-secret")
    with uvicorn_thread(create_app(state)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/vectors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer admin-secret\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="v.safetensors"\r\n\r\n'
            )
            t0, answer = time.monotonic(), b""
            sock.settimeout(0.2)
            while time.monotonic() - t0 < 10 and not answer:
                try:
                    sock.sendall(b"x")  # a byte every 0.2 s: each read is quick, the whole body is not
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
            waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"whole body" in answer and 0.9 < waited < 3.0, waited
        assert state.store is not None and state.store.list() == []
        assert httpx.get(url + "/health").status_code == 200
