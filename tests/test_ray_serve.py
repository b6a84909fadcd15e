"""``steerserve serve --replicas 2`` end to end (server/ray_serve.py, server/ray_app.py): a real local Ray
cluster started by the real command, the tiny random Llama loaded by both replicas from a model folder,
requests through Ray Serve's HTTP proxy over a socket.

One cluster for the module (starting one takes 30-60 s on two cores); the tests run in file order and the
last one stops it with SIGTERM. What they prove (SPEC §9.4):

- an upload through one request is used by the next 20, answered by both replicas; a delete is seen by
  both; concurrent uploads of different names through both replicas all survive;
- a real Prometheus reads the sum over both replicas of ``steer_requests_total``, both from the proxy's
  merged ``/metrics`` and from the per-replica endpoints found through the ``file_sd`` file;
- ``ray.kill`` of one replica under load: Serve replaces it, the other replica's requests finish, no
  vector is lost;
- SIGTERM drains every replica: streams in flight finish, new requests get 503, the process exits 0.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import add_artifact, free_port, metric, prometheus_server, tiny_llama, wait_for

from server.replica_registry import REPORT_INTERVAL_S

pytest.importorskip("ray", reason="the Ray tests need the steerserve[ray] extra (make install)")

HEADER = "x-steerserve-replica"
#: tokens per stream in the kill and drain tests: long enough to be in flight when the signal lands
STREAM_TOKENS = 480
#: the replicas' model: the tiny Llama with a wider hidden size, so that those streams last seconds
HIDDEN = 256
START_TIMEOUT = 300.0
ADMIN_KEY = "ray-test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Cluster:
    """A ``steerserve serve --replicas 2`` process (its own local Ray cluster) and a Ray connection to it."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.vector_dir, self.log = root / "vectors", root / "log"
        self.sd_file = root / "sd" / "replicas.json"
        cmd = [
            str(Path(sys.executable).parent / "steerserve"),
            "serve",
            "--replicas",
            "2",
            "--model",
            str(model_dir),
            "--quantization",
            "none",
            "--dtype",
            "float32",
            "--port",
            str(self.port),
            "--vector-dir",
            str(self.vector_dir),
            "--metrics-sd-file",
            str(self.sd_file),
            "--drain-timeout",
            "60",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STEERSERVE_", "RAY_ADDRESS"))}
        env["STEERSERVE_ADMIN_KEY"] = ADMIN_KEY  # reaches the replicas from this process's environment
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            self.address = self._wait_for_log(r"Ray cluster at (\S+)")
            self._wait_for_log(r"2 replicas serving on")
        except BaseException:
            self.close()  # no cluster left behind
            raise

    def _wait_for_log(self, pattern: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text(errors="replace"))
            if found:
                return found.group(found.lastindex or 0)
            assert self.proc.poll() is None, self.tail()
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} in the log after {START_TIMEOUT} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def killer(self) -> subprocess.Popen[str]:
        """A Ray driver of its own (this process stays out of Ray), connected before it is needed: it
        ``ray.kill``s the replica whose id it reads on stdin, and says ``killed``.

        The local cluster has token authentication on; a client of this Ray version must say so."""
        code = (
            "import sys, ray\n"
            "ray.init(address=sys.argv[1], logging_level='WARNING', log_to_driver=False)\n"
            "print('ready', flush=True)\n"
            "replica = sys.stdin.readline().strip()\n"
            "name = f'SERVE_REPLICA::steerserve#SteerserveReplica#{replica}'\n"
            "ray.kill(ray.get_actor(name, namespace='serve'))\n"
            "print('killed', flush=True)\n"
        )
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, self.address],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "the killer did not connect"
        return proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@functools.cache
def served_model() -> Any:
    """The model every replica loads (random, seed 0)."""
    return tiny_llama(hidden=HIDDEN)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    served_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    c = Cluster(tmp_path_factory.mktemp("ray"), tiny_model_dir)
    yield c
    c.close()


def upload(cluster: Cluster, name: str, seed: int = 2, headers: dict[str, str] = ADMIN) -> httpx.Response:
    data = add_artifact(served_model(), seed=seed, norm=8.0).to_bytes()
    return httpx.post(
        cluster.url + "/v1/vectors",
        data={"name": name},
        files={"file": ("v.safetensors", data)},
        headers=headers,
        timeout=60,
    )


def generate(cluster: Cluster, steering: Any = None, **body: Any) -> httpx.Response:
    payload = {"prompt": "The weather today", "max_new_tokens": 8, **body}
    if steering is not None:
        payload["steering"] = steering
    return httpx.post(cluster.url + "/generate", json=payload, timeout=60)


def from_both(call: Callable[[], httpx.Response], check: Callable[[httpx.Response], None]) -> set[str]:
    """Repeat ``call`` until both replicas answered, checking every answer: bursts of 4 at once (Ray's
    router sends a lone request to the replica with fewer requests in flight, always the same one while
    streams keep the other busier), at most 15 bursts."""
    seen: set[str] = set()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(15):
            for r in pool.map(lambda _: call(), range(4)):
                check(r)
                seen.add(r.headers[HEADER])
            if len(seen) == 2:
                return seen
    raise AssertionError(f"only replicas {seen} answered 60 requests")


# ---------------------------------------------------------------------------------------------------
# one vector registry


def test_an_upload_is_used_by_the_next_20_requests_on_both_replicas(cluster):
    plain = generate(cluster)
    assert plain.status_code == 200, plain.text
    created = upload(cluster, "calm")
    assert created.status_code == 201, created.text
    sha = created.json()["sha256"]
    answers = [generate(cluster, {"vectors": [{"name": "calm"}]}) for _ in range(20)]
    for r in answers:
        assert r.status_code == 200, r.text
        assert [(v["name"], v["sha256"]) for v in r.json()["steering"]["vectors"]] == [("calm", sha)]
    assert len({r.headers[HEADER] for r in answers}) == 2, "20 requests reached only one replica"
    texts = {r.json()["text"] for r in answers}
    assert len(texts) == 1 and texts != {plain.json()["text"]}  # steered, and the same on both replicas


def test_a_delete_is_seen_by_both_replicas(cluster):
    assert upload(cluster, "brief", seed=5).status_code == 201
    from_both(lambda: generate(cluster, {"vectors": [{"name": "brief"}]}), lambda r: r.raise_for_status())
    deleted = httpx.delete(cluster.url + "/v1/vectors/brief", headers=ADMIN, timeout=30)
    assert deleted.status_code == 200, deleted.text

    def gone(r: httpx.Response) -> None:
        assert r.status_code == 404, r.text
        assert "brief" in r.json()["error"]["message"]

    from_both(lambda: generate(cluster, {"vectors": [{"name": "brief"}]}), gone)
    from_both(lambda: httpx.get(cluster.url + "/v1/vectors/brief", timeout=30), gone)


def test_concurrent_uploads_through_both_replicas_all_survive(cluster):
    names = [f"v{i:02d}" for i in range(16)]
    answers: dict[str, httpx.Response] = {}

    def one(i: int, name: str) -> None:
        answers[name] = upload(cluster, name, seed=10 + i)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {n: r.status_code for n, r in answers.items()} == dict.fromkeys(names, 201)
    assert len({r.headers[HEADER] for r in answers.values()}) == 2, "the uploads reached only one replica"

    shas = {n: r.json()["sha256"] for n, r in answers.items()}

    def lists_all(r: httpx.Response) -> None:
        assert r.status_code == 200, r.text
        listed = {v["name"]: v["sha256"] for v in r.json()["data"]}
        assert {n: listed.get(n) for n in names} == shas

    from_both(lambda: httpx.get(cluster.url + "/v1/vectors?limit=1000", timeout=30), lists_all)
    files = {p.parent.name for p in cluster.vector_dir.glob("*/index.json")}
    assert set(names) <= files

    # every artifact is whole: one request steered by all 16 loads each of them, on both replicas
    steering = {"vectors": [{"name": n, "strength": 0.1} for n in names]}

    def uses_all(r: httpx.Response) -> None:
        assert r.status_code == 200, r.text
        assert {v["name"]: v["sha256"] for v in r.json()["steering"]["vectors"]} == shas

    from_both(lambda: generate(cluster, steering), uses_all)


def test_the_admin_key_guards_every_replica(cluster):
    def refused(r: httpx.Response) -> None:
        assert r.status_code == 401, r.text

    from_both(lambda: upload(cluster, "intruder", headers={}), refused)
    from_both(lambda: upload(cluster, "intruder", headers={"Authorization": "Bearer wrong"}), refused)
    assert not (cluster.vector_dir / "intruder").exists()


def test_vectors_loaded_follows_the_shared_directory_on_every_replica(cluster):
    body = httpx.get(cluster.url + "/metrics", timeout=30).text
    count = len({p.parent.name for p in cluster.vector_dir.glob("*/index.json")})
    values = re.findall(r'^steer_vectors_loaded\{replica="([^"]+)"\} (\S+)$', body, flags=re.M)
    assert len(values) == 2 and {float(v) for _, v in values} == {count}


# ---------------------------------------------------------------------------------------------------
# one view in Prometheus


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_reads_the_sum_over_both_replicas(cluster, tmp_path):
    jobs = (
        f"  - job_name: proxy\n    static_configs:\n      - targets: ['127.0.0.1:{cluster.port}']\n"
        f"  - job_name: replicas\n    file_sd_configs:\n      - files: ['{cluster.sd_file}']\n"
        "        refresh_interval: 1s\n"
    )
    with prometheus_server(jobs, tmp_path) as (prom, proc):
        sent = 20
        replicas = set()
        for _ in range(sent):
            r = httpx.get(cluster.url + "/v1/models", timeout=30)
            assert r.status_code == 200, r.text
            replicas.add(r.headers[HEADER])
        assert len(replicas) == 2
        # what each replica's own endpoint says (they are listed in the file_sd file)
        targets = json.loads(cluster.sd_file.read_text())
        assert {t["labels"]["replica"] for t in targets} == replicas
        direct = {
            t["labels"]["replica"]: metric(
                httpx.get(f"http://{t['targets'][0]}/metrics", timeout=10).text,
                "steer_requests_total",
                route="/v1/models",
                status="200",
            )
            for t in targets
        }
        assert sum(direct.values()) == sent and all(direct.values())

        def summed(job: str) -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                expr = f'sum by (replica) (steer_requests_total{{job="{job}",route="/v1/models"}})'
                rows = _query(prom, expr)
            except httpx.HTTPError:
                return False
            return {row["metric"].get("replica"): float(row["value"][1]) for row in rows} == direct

        wait_for(lambda: summed("replicas"), timeout=90, what="the file_sd job to see both replicas")
        wait_for(lambda: summed("proxy"), timeout=90, what="the proxy job to see both replicas")
        for job in ("replicas", "proxy"):
            total = _query(prom, f'sum(steer_requests_total{{job="{job}",route="/v1/models"}})')
            assert float(total[0]["value"][1]) == sent
        up = _query(prom, 'up{job="replicas"}')
        assert sorted(float(row["value"][1]) for row in up) == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------
# faults and shutdown


class Stream:
    """One streamed /generate in a thread: the replica that answers, its events, when the last came."""

    def __init__(self, cluster: Cluster, steering: Any = None) -> None:
        self.replica: str | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.last_event_at = 0.0
        self.started = threading.Event()
        body = {"prompt": "Once", "max_new_tokens": STREAM_TOKENS, "stream": True}
        if steering is not None:
            body["steering"] = steering
        self.thread = threading.Thread(target=self._run, args=(cluster.url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
                self.replica = r.headers.get(HEADER)
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.last_event_at = time.monotonic()
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.started.set()

    @property
    def completed(self) -> bool:
        if self.error is not None or len(self.events) < 2 or self.events[-1] != "[DONE]":
            return False
        last = json.loads(self.events[-2])
        return last.get("finish_reason") == "length" and last["usage"]["completion_tokens"] == STREAM_TOKENS


def _start_streams(cluster: Cluster, n: int, steering: Any = None) -> list[Stream]:
    streams = [Stream(cluster, steering) for _ in range(n)]
    for s in streams:
        assert s.started.wait(60), "a stream did not start"
    return streams


def test_killing_a_replica_under_load_loses_nothing(cluster):
    steering = {"vectors": [{"name": "calm"}]}
    killer = cluster.killer()
    streams = _start_streams(cluster, 8, steering)
    on = {s.replica for s in streams}
    assert len(on) == 2, "the streams reached only one replica"
    victim = streams[0].replica
    assert victim is not None and killer.stdin is not None and killer.stdout is not None
    killer.stdin.write(victim + "\n")
    killer.stdin.flush()
    assert killer.stdout.readline().strip() == "killed"
    killed_at = time.monotonic()
    assert killer.wait(timeout=60) == 0
    for s in streams:
        s.thread.join(timeout=120)
    survivors = [s for s in streams if s.replica != victim]
    assert survivors and all(s.completed for s in survivors), [(s.error, s.events[-2:]) for s in survivors]
    assert any(s.last_event_at > killed_at for s in survivors), "the survivor's streams ended before the kill"

    # Serve replaces the replica; the new one serves every vector uploaded before
    def replaced() -> bool:
        r = httpx.get(cluster.url + "/ready", timeout=30)
        return r.status_code == 200 and r.headers[HEADER] not in on

    wait_for(replaced, timeout=240, what="Serve to start a replacement replica")
    names = {"calm", *(f"v{i:02d}" for i in range(16))}

    def serves_all(r: httpx.Response) -> None:
        assert r.status_code == 200, r.text
        assert names <= {v["name"] for v in r.json()["data"]}

    seen = from_both(lambda: httpx.get(cluster.url + "/v1/vectors?limit=1000", timeout=30), serves_all)
    assert victim not in seen
    steered = from_both(lambda: generate(cluster, steering), lambda r: r.raise_for_status())
    assert victim not in steered


def test_sigterm_drains_every_replica(cluster):
    streams = _start_streams(cluster, 6)
    assert len({s.replica for s in streams}) == 2, "the streams reached only one replica"
    cluster.proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()

    def not_ready() -> bool:
        return httpx.get(cluster.url + "/ready", timeout=30).status_code == 503

    wait_for(not_ready, timeout=10, what="/ready to answer 503")
    refused: set[str] = set()

    def both_refuse() -> bool:
        # each replica learns of the drain at its next report to the registry (every REPORT_INTERVAL_S):
        # one may still take a request right after the other has begun to refuse
        try:
            refused.update(from_both(lambda: generate(cluster), assert_draining))
        except AssertionError:
            return False
        return True

    wait_for(both_refuse, timeout=10 * REPORT_INTERVAL_S, what="both replicas to answer new requests 503")
    assert refused == {s.replica for s in streams}
    for s in streams:
        s.thread.join(timeout=120)
    assert all(s.completed for s in streams), [(s.error, s.events[-2:]) for s in streams]
    assert any(s.last_event_at > signalled_at for s in streams), "the streams ended before the signal"
    assert cluster.proc.wait(timeout=120) == 0, cluster.tail()
    assert "every replica is drained" in cluster.tail()


def assert_draining(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert "draining" in r.json()["error"]["message"]


def test_a_model_that_cannot_load_stops_serve_with_the_replicas_reason(tmp_path):
    """SPEC §9.3 with replicas: no application that is alive but never ready; the reason in one line."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()  # exists (the driver's own check passes), but holds no model: the replicas fail
    cmd = [str(Path(sys.executable).parent / "steerserve"), "serve", "--replicas", "1", "--model", str(empty)]
    cmd += ["--port", str(free_port()), "--vector-dir", str(tmp_path / "vectors")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEERSERVE_", "RAY_ADDRESS"))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=START_TIMEOUT)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("steerserve: error: the replicas did not start: cannot load the model:"), last
    assert str(empty) in last and "no config.json" in last
