"""Connection limits (server/connection.py), issue 13, against a real ``steerserve serve`` process (the tiny
model, tests/tiny_server.py) over real sockets: the header timeout covers the whole header block however
it is dripped, the header size cap answers 431 without buffering the rest, ``--max-connections`` answers
503 beyond it, and the figures of the issue hold: 16 connections dripping an upload (unauthenticated, or
authenticated and closed by the body timeout) hold < 50 MB of the server's memory, and 200 sockets stalled
mid-headers do not keep a normal client from a 200 within 2 s."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import psutil
import pytest
from tiny_server import TinyServer

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("connection")
    srv = TinyServer(
        tmp / "vectors",
        tmp / "server.log",
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        max_header_bytes=16384,
        max_connections=256,
    )
    env_key = {"STEERSERVE_API_KEY": "user-secret", "STEERSERVE_ADMIN_KEY": "admin-secret"}
    srv.env = env_key
    srv.start()
    yield srv
    srv.stop()
    if FIGURES:
        print("\nedge figures: " + ", ".join(f"{k} {v:.3g}" for k, v in FIGURES.items()))


def _connect(srv: TinyServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent until it closed the connection (or ``timeout`` passed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _rss(srv: TinyServer) -> int:
    assert srv.proc is not None
    return psutil.Process(srv.proc.pid).memory_info().rss


def _drip(sock: socket.socket, first: bytes, piece: bytes, every: float, until: float) -> tuple[bytes, float]:
    """Send ``first``, then ``piece`` every ``every`` seconds until the server answers and closes (or
    ``until`` seconds pass); (its answer, seconds it took)."""
    t0 = time.monotonic()
    sock.sendall(first)
    sock.settimeout(every)
    data = b""
    while time.monotonic() - t0 < until:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        except TimeoutError:
            try:
                sock.sendall(piece)
            except OSError:
                break
        except OSError:
            break
    return data, time.monotonic() - t0


def test_header_timeout_covers_the_whole_header_block(server):
    with _connect(server) as sock:
        answer, took = _drip(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a", 0.2, 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in answer and b"request headers not received" in answer
    assert HEADER_TIMEOUT - 0.1 < took < HEADER_TIMEOUT + 2, took
    with _connect(server) as idle:  # an idle connection is closed silently at the same deadline
        assert _answer(idle, HEADER_TIMEOUT + 3) == b""


def test_header_size_cap_answers_431_without_buffering(server):
    before = _rss(server)
    with _connect(server) as sock:
        answer, _ = _drip(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 65536, 0.01, 10)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"16384 bytes" in answer
    with _connect(server) as sock:  # one huge header line sent at once is refused just the same
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        assert _answer(sock, 10).startswith(b"HTTP/1.1 431")
    assert _rss(server) - before < 20e6
    assert httpx.get(server.url + "/health").status_code == 200


def test_connections_beyond_the_cap_get_503(tmp_path):
    srv = TinyServer(tmp_path / "v", tmp_path / "log", max_connections=4, header_timeout=30)
    srv.start()
    held = []
    try:
        for _ in range(4):
            held.append(_connect(srv))
        time.sleep(0.3)
        with _connect(srv) as extra:
            answer = _answer(extra, 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections 4" in answer, answer[:200]
        held.pop().close()
        time.sleep(0.3)
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
    finally:
        for s in held:
            s.close()
        srv.stop()


UPLOAD_HEAD = (
    b"POST /v1/vectors HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 67108864\r\n"
)
PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="v.safetensors"\r\n\r\n'


def _drip_many(
    server: TinyServer, n: int, first: bytes, piece: bytes, until: float
) -> list[tuple[bytes, float]]:
    out: list[tuple[bytes, float]] = [(b"", 0.0)] * n
    socks = [_connect(server) for _ in range(n)]

    def run(i: int) -> None:
        out[i] = _drip(socks[i], first, piece, 0.25, until)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in socks:
        s.close()
    return out


@pytest.mark.parametrize(
    ("label", "first", "piece", "status"),
    [  # what each of the 16 clients sends first, then drips every 0.25 s; the answer that closes it
        ("unauthenticated upload", UPLOAD_HEAD + b"\r\n" + PART, b"x" * 1024, b"401"),
        (
            "authenticated upload",
            UPLOAD_HEAD + b"Authorization: Bearer admin-secret\r\n\r\n" + PART,
            b"x" * 1024,
            b"408",
        ),
        ("upload headers", UPLOAD_HEAD, b"X-", b"408"),
    ],
)
def test_sixteen_dripping_uploads_hold_little_memory_and_are_closed(server, label, first, piece, status):
    before = _rss(server)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(server))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        results = _drip_many(
            server, 16, first, b"x" * 1024 if status != b"408" or b"Auth" in first else b"X-", 15
        )
    finally:
        stop.set()
        sampler.join()
    for answer, took in results:
        assert answer.startswith(b"HTTP/1.1 " + status), (label, answer[:200])
        assert took < max(HEADER_TIMEOUT, BODY_TIMEOUT) + 3, (label, took)
    extra_mb = (peak[0] - before) / 1e6
    FIGURES[f"{label}: extra MB"] = extra_mb
    FIGURES[f"{label}: closed after s (max)"] = max(t for _, t in results)
    assert extra_mb < 50, f"{label}: {extra_mb:.1f} MB"


def test_two_hundred_stalled_sockets_do_not_lock_out_a_client(server):
    stalled = []
    try:
        for _ in range(200):
            s = _connect(server)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
            stalled.append(s)
        t0 = time.monotonic()
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer user-secret"}, timeout=10)
        took = time.monotonic() - t0
        FIGURES["200 stalled sockets: normal client s"] = took
        assert r.status_code == 200 and took < 2.0, took
    finally:
        for s in stalled:
            s.close()
