"""The README's examples are executed: the Python block, and the curl block against a real server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.slow
def test_python_example_runs():
    block = next(b for b in _blocks("python") if "install_steering" in b)
    subprocess.run([sys.executable, "-c", block], check=True, cwd=ROOT, timeout=300)


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_curl_examples_work_verbatim(tmp_path):
    if not _free(8000):
        pytest.skip("port 8000 is in use; the README's examples address localhost:8000")
    env = {**os.environ, "STEERSERVE_VECTOR_DIR": str(tmp_path / "vectors")}
    env.pop("STEERSERVE_API_KEY", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "steerserve"), "serve", "--port", "8000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:8000/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            time.sleep(0.5)
        else:
            pytest.fail("server did not become ready")
        block = next(b for b in _blocks("bash") if "curl" in b)
        commands = re.split(
            r"\n(?=curl )",
            "\n".join(line for line in block.splitlines() if line.strip() and not line.startswith("#")),
        )
        outputs = []
        for cmd in commands:
            out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, (cmd, out.stderr)
            assert '"error"' not in out.stdout, (cmd, out.stdout)
            outputs.append(out.stdout)
        generate, stream, upload, steered, vectors, profile, profiles, metrics = outputs
        assert json.loads(generate)["finish_reason"] in ("stop", "length")
        assert stream.rstrip().endswith("data: [DONE]")
        assert json.loads(upload)["name"] == "polite"
        assert json.loads(steered)["steering"]["vectors"][0]["name"] == "polite"
        assert [v["name"] for v in json.loads(vectors)["data"]] == ["polite"]
        assert json.loads(profile)["name"] == "kind"
        assert json.loads(profiles)["data"][0]["name"] == "kind"
        assert 'steer_steered_requests_total{vector="polite"} 1.0' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _sweep_example() -> tuple[dict, dict[float, str]]:
    """The request of the README's sweep example and the replies its "Choosing a strength" table shows."""
    block = next(b for b in _blocks("bash") if "/v1/sweep" in b)
    body = json.loads(re.search(r"-d '(.*?)'", block, flags=re.S).group(1))
    section = README.split("### Choosing a strength", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\s*\| (-?[\d.]+) \| (.*) \|$", section, flags=re.M)
    return body, {float(w): text for w, text in rows}


@pytest.mark.slow
def test_the_sweep_shown_is_the_servers_output(tmp_path):
    """The README's sweep table is the default model's real output (float32), row for row."""
    from fastapi.testclient import TestClient

    from basemodel import load_model
    from server.app import create_app
    from server.config import ServerConfig
    from server.state import ServerState

    body, shown = _sweep_example()
    assert sorted(shown) == sorted(body["strengths"])
    state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "vectors"))
    state.load(load_model(quantization="none", dtype="float32"))
    with TestClient(create_app(state)) as client:
        with (ROOT / "examples" / "polite.safetensors").open("rb") as f:
            resp = client.post(
                "/v1/vectors", data={"name": "polite"}, files={"file": ("polite.safetensors", f)}
            )
        assert resp.status_code == 201, resp.text
        res = client.post("/v1/sweep", json=body).json()
    for row in res["results"]:
        assert shown[row["strength"]] == " ".join(row["text"].split()), row["strength"]
