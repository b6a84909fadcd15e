"""The artifact format (SPEC §4): round trip, version, and one distinct rejection per kind of bad file."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from helpers import PickleCanary, add_artifact, lora_artifact, red_artifact, tiny_llama
from safetensors.torch import save as st_save

from steering_vectors import (
    Artifact,
    ArtifactError,
    IncompatibleArtifactError,
    find_layout,
    load_artifact,
    parse_artifact,
    save_artifact,
)

CANARY = Path("/tmp/steerserve-pickle-canary")


def _meta(**over):
    meta = {
        "format": "steerserve.v1",
        "kind": "add",
        "model_type": "llama",
        "hidden_size": "4",
        "num_layers": "2",
        "method": "mean-diff",
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def _st(tensors, **over) -> bytes:
    return st_save(tensors, metadata=_meta(**over))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("make", [red_artifact, add_artifact, lora_artifact])
def test_round_trip_and_version(tmp_path, model, make):
    art = make(model)
    art.extra["description"] = "unit test"
    path = tmp_path / "a.safetensors"
    sha = save_artifact(art, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == art.sha256
    back = load_artifact(path)
    assert back.sha256 == sha and back.kind == art.kind and back.layers == art.layers
    assert back.lora_alpha == art.lora_alpha and back.extra["description"] == "unit test"
    assert back.tensors.keys() == art.tensors.keys()
    assert all(torch.equal(back.tensors[k], art.tensors[k]) for k in art.tensors)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_serialisation_is_deterministic(model):
    art = lora_artifact(model)
    art.extra.update(description="d", training='{"lr": 0.02}', metrics='{"loss": 1.0}', base_model="x")
    data = art.to_bytes()
    assert all(art.to_bytes() == data for _ in range(5))
    back = parse_artifact(data)
    assert back.sha256 == art.sha256 and back.to_bytes() == data


def test_header_length_with_low_byte_0x80_is_not_mistaken_for_a_pickle():
    for pad in range(300):  # some header length among these has 0x80 as its low byte
        data = _st({"layers.0.direction": torch.ones(4)}, description="x" * pad)
        if data[0] == 0x80:
            assert parse_artifact(data).direction(0).tolist() == [1.0] * 4
            return
    pytest.fail("no header length with low byte 0x80 was produced")


def test_bf16_and_fp16_are_accepted():
    for dt in (torch.float16, torch.bfloat16):
        art = parse_artifact(_st({"layers.0.direction": torch.ones(4, dtype=dt)}))
        assert art.direction(0).dtype == dt


def test_pickle_is_rejected_and_never_executed():
    CANARY.unlink(missing_ok=True)
    data = pickle.dumps({"layers.0.direction": PickleCanary(CANARY)})
    with pytest.raises(ArtifactError, match="pickle"):
        parse_artifact(data)
    buf = io.BytesIO()
    torch.save({"layers.0.direction": torch.ones(4), "x": PickleCanary(CANARY)}, buf)
    with pytest.raises(ArtifactError, match="zip"):
        parse_artifact(buf.getvalue())
    assert not CANARY.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 16, "GGUF"),
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "exceeds"),
        (struct.pack("<Q", 500) + b'{"a": 1}', "header runs past the end"),
        (struct.pack("<Q", 4) + b"abcd", "no JSON header"),
        (_st({"layers.0.direction": torch.ones(4)})[:-3], "truncated"),
        (_st({"layers.0.direction": torch.ones(4)}, kind="steer"), "unknown artifact kind"),
        (_st({"layers.0.direction": torch.ones(5)}), r"shape \[5\] but expected \[4\]"),
        (_st({"layers.0.direction": torch.tensor([1.0, float("nan"), 0, 0])}), "NaN or Inf"),
        (_st({"layers.0.direction": torch.tensor([1.0, float("inf"), 0, 0])}), "NaN or Inf"),
        (_st({"layers.7.direction": torch.ones(4)}), "layer 7 out of range"),
        (_st({"layers.0.direction": torch.ones(4, dtype=torch.float64)}), "dtype"),
        (_st({"layers.0.direction": torch.ones(4, dtype=torch.int32)}), "dtype"),
        (_st({"layers.0.scale": torch.ones(4)}), "not valid for kind 'add'"),
        (_st({"layers.0.scale": torch.ones(4)}, kind="red"), "has no bias"),
        (_st({"layers.0.q_proj.lora_A": torch.ones(2, 4)}, kind="lora", lora_alpha="4"), "lora_B"),
        (
            _st(
                {"layers.0.q_proj.lora_A": torch.ones(2, 4), "layers.0.q_proj.lora_B": torch.ones(4, 3)},
                kind="lora",
                lora_alpha="4",
            ),
            "rank mismatch",
        ),
        (
            _st(
                {"layers.0.q_proj.lora_A": torch.ones(2, 4), "layers.0.q_proj.lora_B": torch.ones(4, 2)},
                kind="lora",
            ),
            "lora_alpha",
        ),
        (_st({"layers.0.direction": torch.ones(4)}, format=None), "format"),
        (_st({"layers.0.direction": torch.ones(4)}, hidden_size=None), "missing 'hidden_size'"),
        (_st({"layers.0.direction": torch.ones(4)}, num_layers="ten"), "not numbers"),
        (_st({"layers.0.direction": torch.ones(4)}, num_layers="10000000"), "out of range"),
        (_st({}), "no tensors"),
    ],
)
def test_bad_artifacts_each_have_their_own_message(data, message):
    with pytest.raises(ArtifactError, match=message):
        parse_artifact(data)


def test_size_cap_before_parsing(tmp_path):
    data = _st({"layers.0.direction": torch.ones(4)})
    with pytest.raises(ArtifactError, match="exceeds"):
        parse_artifact(data, max_bytes=len(data) - 1)
    p = tmp_path / "big.safetensors"
    p.write_bytes(data)
    with pytest.raises(ArtifactError, match="big.safetensors.*exceeds"):
        load_artifact(p, max_bytes=16)


def test_header_offsets_past_end_are_truncation():
    header = json.dumps(
        {
            "layers.0.direction": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "__metadata__": _meta(),
        }
    ).encode()
    data = struct.pack("<Q", len(header)) + header + b"\x00" * 8
    with pytest.raises(ArtifactError, match="truncated"):
        parse_artifact(data)


def test_model_mismatch_is_incompatible(model):
    layout = find_layout(model)
    art = Artifact(
        kind="add",
        tensors={"layers.0.direction": torch.ones(32)},
        hidden_size=32,
        num_layers=2,
        model_type="llama",
        method="mean-diff",
    )
    with pytest.raises(IncompatibleArtifactError, match="hidden_size 32 does not fit.* 64"):
        art.check_compatible(hidden_size=64, num_layers=2)
    art = Artifact(
        kind="add",
        tensors={"layers.0.direction": torch.ones(64)},
        hidden_size=64,
        num_layers=3,
        model_type="llama",
        method="mean-diff",
    )
    with pytest.raises(IncompatibleArtifactError, match="num_layers 3"):
        art.check_compatible(hidden_size=64, num_layers=2)
    lora = Artifact(
        kind="lora",
        tensors={"layers.0.q_proj.lora_A": torch.ones(2, 64), "layers.0.q_proj.lora_B": torch.ones(7, 2)},
        hidden_size=64,
        num_layers=2,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=4.0,
    )
    with pytest.raises(IncompatibleArtifactError, match="64->7"):
        lora.check_compatible(hidden_size=64, num_layers=2, linear_shapes=layout.linear_shapes())
    lora = Artifact(
        kind="lora",
        tensors={"layers.0.nope.lora_A": torch.ones(2, 64), "layers.0.nope.lora_B": torch.ones(64, 2)},
        hidden_size=64,
        num_layers=2,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=4.0,
    )
    with pytest.raises(IncompatibleArtifactError, match="not a linear"):
        lora.check_compatible(hidden_size=64, num_layers=2, linear_shapes=layout.linear_shapes())
    lora_artifact(model).check_compatible(hidden_size=64, num_layers=2, linear_shapes=layout.linear_shapes())
