"""The ``steerserve`` console script (steerserve/cli.py), issue 13: ``vectors import-gguf`` never guesses a
repeng file's layer count, ``vectors upload`` reports an unreachable server in one line and takes the
OpenAI base URL, ``inspect`` lists layers in numeric order, training errors are one line and
``train rahf --out x.safetensors`` makes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import add_artifact, free_port, tiny_llama, tiny_loaded, uvicorn_thread

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState
from steering_vectors import Artifact, load_artifact, save_artifact
from steerserve.cli import main

D = 576  # the default model's hidden size (30 layers)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "steerserve.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def repeng_file(path: Path, layers: range) -> Path:
    """A control vector laid out as repeng's ControlVector.export_gguf writes it: model hint, the number of
    directions as controlvector.layer_count, direction.{layer} tensors (here layers 1..19 only)."""
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        w.add_tensor(f"direction.{layer}", np.random.default_rng(layer).standard_normal(D).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_import_gguf_never_guesses_the_layer_count(tmp_path, capsys, default_model_dir):
    src = repeng_file(tmp_path / "repeng.gguf", range(1, 20))
    out = tmp_path / "out.safetensors"
    assert main(["vectors", "import-gguf", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-layers" in err[0] and "at least 20" in err[0], err
    assert not out.exists()
    assert main(["vectors", "import-gguf", str(src), str(out), "--model", str(default_model_dir)]) == 0
    art = load_artifact(out)
    assert art.num_layers == 30 and art.layers == list(range(1, 20)) and art.model_type == "llama"
    assert main(["vectors", "import-gguf", str(src), str(out), "--num-layers", "30"]) == 0
    assert load_artifact(out).num_layers == 30


def test_inspect_sorts_layers_numerically(tmp_path, capsys):
    art = Artifact(
        kind="add",
        tensors={f"layers.{n}.direction": torch.ones(8) * n for n in (10, 2, 1)},
        hidden_size=8,
        num_layers=12,
        model_type="llama",
        method="x",
    )
    path = tmp_path / "a.safetensors"
    save_artifact(art, path)
    assert main(["vectors", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["norms"]) == ["layers.1.direction", "layers.2.direction", "layers.10.direction"]
    src = repeng_file(tmp_path / "r.gguf", range(1, 4))
    assert main(["vectors", "inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] is None  # not recorded in the file


def test_upload_without_a_server_is_one_line(tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    save_artifact(add_artifact(tiny_llama()), path)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["vectors", "upload", str(path), "--name", "a", "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("steerserve: error: cannot reach the server at"), err


def test_upload_takes_the_openai_base_url(tmp_path, tokenizer, capsys):
    state = ServerState(ServerConfig(quantization="none", vector_dir=tmp_path / "v"))
    state.load(tiny_loaded(tokenizer))
    path = tmp_path / "a.safetensors"
    save_artifact(add_artifact(state.loaded.model), path)
    with uvicorn_thread(create_app(state)) as url:
        assert main(["vectors", "upload", str(path), "--name", "calm", "--url", url + "/v1/"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "calm"
    assert state.store is not None and state.store.names() == ["calm"]


def test_training_errors_are_one_line_and_rahf_out_is_not_a_folder(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    r = _run("train", "red", "--data", str(bad), "--out", str(tmp_path / "r.safetensors"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot detect the data format" in lines[0], r.stderr
    r = _run(
        "train", "rahf", "--variant", "scit", "--data", str(bad), "--out", str(tmp_path / "x.safetensors")
    )
    assert r.returncode == 2 and "--out-dir" in r.stderr and not (tmp_path / "x.safetensors").exists()
    r = _run(
        "train", "rahf", "--variant", "scit", "--data", str(bad), "--out-dir", str(tmp_path / "y.safetensors")
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "names a folder" in lines[0], r.stderr
    assert not (tmp_path / "y.safetensors").exists()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("STEERSERVE_"):
            monkeypatch.delenv(key)
