"""llama.cpp / repeng control-vector GGUF import and export (steering_vectors.gguf_io)."""

from __future__ import annotations

import hashlib
import struct
import time

import gguf
import numpy as np
import psutil
import pytest
import torch

from steering_vectors import Artifact, ArtifactError, IncompatibleArtifactError, save_artifact
from steering_vectors.gguf_header import MAX_ARRAY_ITEMS, MAX_KV
from steering_vectors.gguf_io import GGUFExportResult, LayerCountUnknownError, export_gguf, import_gguf

D = 16


def add_art(layers: list[int], num_layers: int = 6, d: int = D, seed: int = 0) -> Artifact:
    g = torch.Generator().manual_seed(seed)
    return Artifact(
        kind="add",
        tensors={f"layers.{layer}.direction": torch.randn(d, generator=g) for layer in layers},
        hidden_size=d,
        num_layers=num_layers,
        model_type="llama",
        method="mean-diff",
    )


def write_cvec(
    path,
    directions: dict[str, np.ndarray],
    *,
    arch: str = "controlvector",
    model_hint: str | None = "llama",
    layer_count: int | None = None,
    int32_count: bool = False,
):
    """A control vector written straight with the gguf library, the way repeng's ControlVector.export_gguf
    (and llama.cpp's cvector-generator) lay it out: controlvector.* keys and direction.N tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    if model_hint is not None:
        w.add_string(f"{arch}.model_hint", model_hint)
    count = len(directions) if layer_count is None else layer_count
    if int32_count:
        w.add_int32(f"{arch}.layer_count", count)
    else:
        w.add_uint32(f"{arch}.layer_count", count)
    for name, vec in directions.items():
        w.add_tensor(name, vec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rand(d: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------- round trip


def test_round_trip_is_exact(tmp_path):
    art = add_art([1, 2, 4, 5], num_layers=6)
    res = export_gguf(art, tmp_path / "v.gguf")
    assert isinstance(res, GGUFExportResult)
    assert res.layers == (1, 2, 4, 5) and res.dropped == ()
    assert res.sha256 == hashlib.sha256((tmp_path / "v.gguf").read_bytes()).hexdigest()
    back = import_gguf(tmp_path / "v.gguf")
    assert back.kind == "add" and back.method == "gguf-import"
    assert back.layers == art.layers
    assert (back.num_layers, back.hidden_size, back.model_type) == (6, D, "llama")
    assert back.tensors.keys() == art.tensors.keys()
    for name, t in art.tensors.items():
        assert back.tensors[name].dtype == torch.float32
        assert torch.equal(bits(back.tensors[name]), bits(t)), name
    assert back.extra["source_sha256"] == res.sha256
    # and it survives our own safetensors format too
    save_artifact(back, tmp_path / "v.safetensors")


def test_round_trip_with_served_model_arguments(tmp_path):
    art = add_art([3], num_layers=4, seed=5)
    export_gguf(art, tmp_path / "v.gguf")
    back = import_gguf(tmp_path / "v.gguf", hidden_size=D, num_layers=4, model_type="llama")
    assert back.layers == [3] and back.num_layers == 4
    assert torch.equal(bits(back.direction(3)), bits(art.direction(3)))


def test_export_layout_is_llama_cpp(tmp_path):
    art = add_art([1, 3], num_layers=5)
    export_gguf(art, tmp_path / "v.gguf")
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    assert r.get_field("general.architecture").contents() == "controlvector"
    assert r.get_field("controlvector.model_hint").contents() == "llama"
    # layer_count = number of direction tensors, as repeng and cvector-generator write it
    assert r.get_field("controlvector.layer_count").contents() == 2
    assert [t.name for t in r.tensors] == ["direction.1", "direction.3"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [D]
    # identity numbering: our layers.3.direction is llama.cpp's direction.3
    assert np.array_equal(np.asarray(r.tensors[1].data), art.direction(3).numpy())


def test_export_is_atomic_and_overwrites(tmp_path):
    out = tmp_path / "sub" / "v.gguf"
    export_gguf(add_art([1]), out)
    first = out.read_bytes()
    export_gguf(add_art([2], seed=9), out)
    assert out.read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["v.gguf"]  # no temp file left behind
    assert import_gguf(out).layers == [2]


def test_export_converts_half_precision(tmp_path):
    art = add_art([1, 2])
    half = Artifact(
        kind="add",
        tensors={k: v.to(torch.bfloat16) for k, v in art.tensors.items()},
        hidden_size=D,
        num_layers=6,
        model_type="llama",
        method="x",
    )
    export_gguf(half, tmp_path / "v.gguf")
    back = import_gguf(tmp_path / "v.gguf")
    for k, v in half.tensors.items():
        assert back.tensors[k].dtype == torch.float32 and torch.equal(back.tensors[k], v.float())


# ---------------------------------------------------------------- layer numbering


def test_llama_cpp_layout_maps_onto_the_same_zero_based_layers(tmp_path):
    # llama.cpp: common_control_vector_load_one puts direction.N at flat offset (N-1)*n_embd,
    # llama_adapter_cvec::apply copies that into tensors[N], and build_cvec(cur, il=N) adds it after the
    # FFN residual of 0-based layer N ("l_out"), i.e. HF model.layers[N]'s output = hidden_states[N+1].
    # Our layers.{l}.direction is that same point, so direction.N -> layers.N (no offset).
    vecs = {1: rand(seed=1), 2: rand(seed=2), 7: rand(seed=7)}
    path = write_cvec(tmp_path / "cv.gguf", {f"direction.{n}": v for n, v in vecs.items()})
    with pytest.raises(LayerCountUnknownError, match="at least 8") as err:
        import_gguf(path)  # no steerserve.num_layers key: the model's depth is never guessed
    assert err.value.bound == 8
    art = import_gguf(path, num_layers=8)
    assert art.layers == [1, 2, 7]
    for n, v in vecs.items():
        assert np.array_equal(art.direction(n).numpy(), v)
    assert art.num_layers == 8
    assert art.hidden_size == D and art.model_type == "llama"
    assert art.extra["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert art.extra["gguf_layer_count"] == "3"

    served = import_gguf(path, num_layers=32, hidden_size=D, model_type="mistral")
    # the file's model hint wins over the fallback model_type (the server compares it with its model)
    assert served.layers == [1, 2, 7] and served.num_layers == 32 and served.model_type == "llama"


def test_repeng_default_layers(tmp_path):
    # repeng's read_representations defaults to layers range(-1, -n, -1) -> n-1 .. 1 (0-based model.layers
    # indices; ControlModule adds to that block's output) and export_gguf writes them as direction.{layer}.
    n = 4
    repeng_dirs = {layer: rand(seed=layer) for layer in [i + n for i in range(-1, -n, -1)]}
    path = write_cvec(tmp_path / "repeng.gguf", {f"direction.{k}": v for k, v in repeng_dirs.items()})
    art = import_gguf(path, num_layers=n)
    assert art.layers == [1, 2, 3] and art.num_layers == n
    for layer, v in repeng_dirs.items():
        assert np.array_equal(art.direction(layer).numpy(), v)


def test_cvector_generator_int32_layer_count(tmp_path):
    path = write_cvec(
        tmp_path / "g.gguf", {f"direction.{n}": rand(seed=n) for n in (1, 2, 3)}, int32_count=True
    )
    art = import_gguf(path, num_layers=4)
    assert art.layers == [1, 2, 3] and art.extra["gguf_layer_count"] == "3"


def test_direction_zero_is_rejected(tmp_path):
    path = write_cvec(tmp_path / "z.gguf", {"direction.0": rand(), "direction.1": rand(seed=1)})
    with pytest.raises(ArtifactError, match="direction.0"):
        import_gguf(path)


def test_layer_out_of_range_for_served_model(tmp_path):
    path = write_cvec(tmp_path / "cv.gguf", {"direction.1": rand(), "direction.6": rand(seed=1)})
    with pytest.raises(IncompatibleArtifactError, match="direction.6"):
        import_gguf(path, num_layers=6)
    assert import_gguf(path, num_layers=7).num_layers == 7


def test_hidden_size_mismatch(tmp_path):
    path = write_cvec(tmp_path / "cv.gguf", {"direction.1": rand()})
    with pytest.raises(IncompatibleArtifactError, match="hidden_size"):
        import_gguf(path, hidden_size=D + 1)


def test_export_refuses_nonzero_layer0(tmp_path):
    art = add_art([0, 2])
    with pytest.raises(ArtifactError, match="layer 0"):
        export_gguf(art, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
    res = export_gguf(art, tmp_path / "v.gguf", drop_layer0=True)
    assert res.layers == (2,) and res.dropped == (0,)
    assert import_gguf(tmp_path / "v.gguf").layers == [2]


def test_export_omits_zero_layer0_and_reports_it(tmp_path):
    art = Artifact(
        kind="add",
        tensors={"layers.0.direction": torch.zeros(D), "layers.1.direction": torch.ones(D)},
        hidden_size=D,
        num_layers=3,
        model_type="llama",
        method="x",
    )
    res = export_gguf(art, tmp_path / "v.gguf")
    assert res.layers == (1,) and res.dropped == (0,)


def test_zero_directions_are_dropped(tmp_path):
    path = write_cvec(
        tmp_path / "cv.gguf",
        {
            "direction.1": np.zeros(D, np.float32),
            "direction.2": rand(),
            "direction.3": np.zeros(D, np.float32),
        },
    )
    art = import_gguf(path, num_layers=4)
    assert art.layers == [2] and art.num_layers == 4
    assert art.extra["gguf_zero_layers_dropped"] == "1,3"
    assert import_gguf(path, num_layers=4, keep_zero=True).layers == [1, 2, 3]
    allzero = write_cvec(tmp_path / "z.gguf", {"direction.1": np.zeros(D, np.float32)})
    with pytest.raises(ArtifactError, match="all zeros"):
        import_gguf(allzero, num_layers=4)


def test_f16_is_widened(tmp_path):
    v = rand().astype(np.float16)
    art = import_gguf(write_cvec(tmp_path / "h.gguf", {"direction.2": v}), num_layers=3)
    assert art.direction(2).dtype == torch.float32
    assert np.array_equal(art.direction(2).numpy(), v.astype(np.float32))


# ---------------------------------------------------------------- rejection


def test_rejects_non_gguf(tmp_path):
    st = tmp_path / "a.safetensors"
    save_artifact(add_art([1]), st)
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        import_gguf(st)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world, not a gguf")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        import_gguf(junk)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        import_gguf(empty)


def test_rejects_truncated_gguf(tmp_path):
    path = write_cvec(tmp_path / "cv.gguf", {"direction.1": rand()})
    data = path.read_bytes()
    path.write_bytes(data[:40])
    with pytest.raises(ArtifactError, match="cv.gguf: invalid or truncated GGUF"):
        import_gguf(path)


def test_rejects_other_architecture(tmp_path):
    path = write_cvec(tmp_path / "m.gguf", {"direction.1": rand()}, arch="llama")
    with pytest.raises(ArtifactError, match="'llama'.*not a control vector"):
        import_gguf(path)


def test_rejects_nan(tmp_path):
    v = rand()
    v[3] = np.nan
    path = write_cvec(tmp_path / "nan.gguf", {"direction.1": rand(seed=1), "direction.2": v})
    with pytest.raises(ArtifactError, match="direction.2.*NaN"):
        import_gguf(path)


def test_rejects_mismatched_lengths(tmp_path):
    path = write_cvec(tmp_path / "len.gguf", {"direction.1": rand(D), "direction.2": rand(D + 4)})
    with pytest.raises(ArtifactError, match="length"):
        import_gguf(path)


@pytest.mark.parametrize(
    "name",
    [
        "direction.x",
        "direction.",
        "foo.1",
        "direction.1.2",
        "direction.01",
        "direction.-1",
        "blk.0.direction",
        "direction_1",
    ],
)
def test_rejects_bad_tensor_names(tmp_path, name):
    path = write_cvec(tmp_path / "bad.gguf", {"direction.1": rand(), name: rand(seed=1)})
    with pytest.raises(ArtifactError, match="not named direction.N"):
        import_gguf(path)


def test_rejects_non_float_and_2d_tensors(tmp_path):
    f64 = write_cvec(tmp_path / "f64.gguf", {"direction.1": rand().astype(np.float64)})
    with pytest.raises(ArtifactError, match="F64"):
        import_gguf(f64)
    two_d = write_cvec(tmp_path / "2d.gguf", {"direction.1": np.ones((2, D), np.float32)})
    with pytest.raises(ArtifactError, match="1-D"):
        import_gguf(two_d)


def test_rejects_missing_hint_without_model_type(tmp_path):
    path = write_cvec(tmp_path / "nohint.gguf", {"direction.1": rand()}, model_hint=None)
    with pytest.raises(ArtifactError, match="model_hint"):
        import_gguf(path, num_layers=2)
    assert import_gguf(path, num_layers=2, model_type="qwen2").model_type == "qwen2"


def test_size_is_checked_first(tmp_path):
    path = write_cvec(tmp_path / "cv.gguf", {"direction.1": rand()})
    with pytest.raises(ArtifactError, match="limit"):
        import_gguf(path, max_bytes=16)


def test_export_refuses_red(tmp_path):
    red = Artifact(
        kind="red",
        tensors={"layers.1.scale": torch.ones(D), "layers.1.bias": torch.zeros(D)},
        hidden_size=D,
        num_layers=3,
        model_type="llama",
        method="red",
    )
    with pytest.raises(ArtifactError, match="only 'add'"):
        export_gguf(red, tmp_path / "r.gguf")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bounded header parsing (issue 13)


def _gguf_bytes(kvs: list[bytes], n_kv: int | None = None, n_tensors: int = 0) -> bytes:
    """A hand-made GGUF v3 header: the given key/value records, no tensor infos."""
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_a_huge_metadata_array_is_refused_before_parsing(tmp_path):
    # 4 MB: one uint8 array of 4,000,000 items (the gguf library alone took 42 s and +2 GB on this)
    array = _key("controlvector.junk") + struct.pack("<IIQ", 9, 0, 4_000_000) + bytes(4_000_000)
    path = tmp_path / "huge.gguf"
    path.write_bytes(_gguf_bytes([array]))
    rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match="controlvector.junk.*4000000 items.*limit"):
        import_gguf(path, num_layers=4)
    assert time.perf_counter() - t0 < 1.0
    assert psutil.Process().memory_info().rss - rss < 50e6


def test_other_header_bounds(tmp_path):
    cases = {
        "keys": (_gguf_bytes([], n_kv=MAX_KV + 1), "metadata keys"),
        "tensors": (_gguf_bytes([], n_tensors=10**9), "tensors"),
        "string": (_gguf_bytes([_key("k") + struct.pack("<IQ", 8, 10**9)]), "string of"),
        "truncated": (_gguf_bytes([_key("k") + struct.pack("<IIQ", 9, 0, MAX_ARRAY_ITEMS)]), "past the end"),
        "nested": (
            _gguf_bytes([_key("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 0, 1)]),
            "nested",
        ),
        "version": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "version 7"),
    }
    for label, (data, needle) in cases.items():
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(data)
        with pytest.raises(ArtifactError, match=needle):
            import_gguf(path, num_layers=4)
