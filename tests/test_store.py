"""server.store: vector uploads, versions and pins, profiles, persistence and crash leftovers."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import add_artifact, lora_artifact, red_artifact, tiny_llama

import server.store as store_mod
from server.errors import ArtifactTooLargeError, ConflictError, UnknownProfileError, UnknownVectorError
from server.store import VectorStore
from steering_vectors import Artifact, Profile, VectorRef, find_layout, load_artifact
from steering_vectors.artifact import ArtifactError, IncompatibleArtifactError

HAS_GGUF_IMPORTER = importlib.util.find_spec("steering_vectors.gguf_io") is not None


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def layout(model):
    return find_layout(model)


def open_store(root: Path, layout, **kw) -> VectorStore:
    return VectorStore(root, layout, **kw)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "vectors"


@pytest.fixture
def store(root, layout) -> VectorStore:
    return open_store(root, layout)


#: the directory's lock and change marker (server/vector_dir.py), present whatever the store holds
BOOKKEEPING = {".lock", ".generation"}


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.name not in BOOKKEEPING}


# ---------------------------------------------------------------------------- upload / list / get / delete


def test_upload_list_get_delete(store, root, model):
    red = red_artifact(model)
    info = store.add("polite", red.to_bytes(), filename="polite.safetensors", description="be nice")
    assert info.name == "polite"
    assert info.sha256 == red.sha256
    assert info.kind == "red" and info.method == "red"
    assert info.layers == [0, 1]
    assert info.description == "be nice"
    assert info.versions == [red.sha256]
    assert (info.model_type, info.hidden_size, info.num_layers) == ("llama", 64, 2)
    assert isinstance(info.created, int) and info.created > 0
    d = info.to_dict()
    assert d["name"] == "polite" and d["sha256"] == red.sha256 and d["layers"] == [0, 1]
    json.dumps(d)

    add = add_artifact(model, layers=[1])
    store.add("concise", add.to_bytes(), filename="c.safetensors", description=None)
    lora = lora_artifact(model)
    store.add("aligned", lora.to_bytes(), filename="a.safetensors", description=None)
    assert [v.name for v in store.list()] == ["aligned", "concise", "polite"]
    assert store.get("concise").layers == [1]
    assert store.get("aligned").kind == "lora"
    assert len(store) == 3 and "polite" in store and "nope" not in store

    assert (root / "polite" / f"{red.sha256}.safetensors").is_file()
    assert json.loads((root / "polite" / "index.json").read_text())["current"] == red.sha256
    assert torch.equal(
        store.resolve(VectorRef("polite")).tensors["layers.0.scale"], red.tensors["layers.0.scale"]
    )

    store.delete("polite")
    assert [v.name for v in store.list()] == ["aligned", "concise"]
    assert not (root / "polite").exists()
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(UnknownVectorError, match="polite"):
        store.get("polite")
    with pytest.raises(UnknownVectorError, match="polite"):
        store.resolve(VectorRef("polite"))
    with pytest.raises(UnknownVectorError, match="polite"):
        store.delete("polite")


def test_unknown_vector_error_is_a_key_error_with_a_readable_message(store):
    with pytest.raises(KeyError) as e:
        store.get("ghost")
    assert str(e.value) == "unknown vector 'ghost'"


def test_description_defaults_to_artifact_metadata(store, model):
    art = add_artifact(model)
    art.extra["description"] = "from the file"
    store.add("v", art.to_bytes(), filename="v.safetensors")
    assert store.get("v").description == "from the file"
    with pytest.raises(ValueError, match="description"):
        store.add("w", art.to_bytes(), filename="v.safetensors", description="x" * 5000)


# ---------------------------------------------------------------------------- versions and pins


def test_version_pinning(store, model):
    v1, v2 = add_artifact(model, seed=1), add_artifact(model, seed=2)
    b1, b2 = v1.to_bytes(), v2.to_bytes()  # serialise once: each call sets .sha256 to its bytes' hash
    store.add("tone", b1, filename="t.safetensors", description="first")
    info = store.add("tone", b2, filename="t.safetensors", description="second")
    assert info.sha256 == v2.sha256
    assert info.versions == [v1.sha256, v2.sha256]
    assert info.description == "second"
    assert store.resolve(VectorRef("tone")).sha256 == v2.sha256
    pinned = store.resolve(VectorRef(f"tone@{v1.sha256[:8]}"))
    assert pinned.sha256 == v1.sha256
    assert torch.equal(pinned.direction(0), v1.direction(0))
    assert store.resolve(f"tone@{v2.sha256}").sha256 == v2.sha256  # a full sha256 is a prefix too
    assert store.resolve("tone").sha256 == v2.sha256

    # re-uploading an old version makes it current again, without duplicating it in the history
    info = store.add("tone", b1, filename="t.safetensors")
    assert info.sha256 == v1.sha256
    assert info.versions == [v2.sha256, v1.sha256]


def test_unknown_and_ambiguous_pins(store, model):
    seen: dict[str, tuple[Artifact, bytes]] = {}
    pair = None
    for seed in range(20000):  # two artifacts whose sha256 share the first 4 hex digits (birthday bound)
        art = add_artifact(model, seed=seed, layers=[0])
        data = art.to_bytes()
        other = seen.setdefault(art.sha256[:4], (art, data))
        if other[0] is not art:
            pair = (other, (art, data))
            break
    assert pair is not None
    (a, a_bytes), (b, b_bytes) = pair
    store.add("x", a_bytes, filename="x.safetensors")
    store.add("x", b_bytes, filename="x.safetensors")
    with pytest.raises(ValueError, match="ambiguous"):
        store.resolve(VectorRef(f"x@{a.sha256[:4]}"))
    n = next(i for i in range(4, 65) if a.sha256[:i] != b.sha256[:i])
    assert store.resolve(VectorRef(f"x@{a.sha256[:n]}")).sha256 == a.sha256
    unknown = "0123" if not a.sha256.startswith("0123") else "4567"
    with pytest.raises(UnknownVectorError, match="no version"):
        store.resolve(VectorRef(f"x@{unknown}"))
    with pytest.raises(UnknownVectorError):
        store.resolve(VectorRef(f"nothere@{a.sha256[:8]}"))


def test_resolved_artifact_unchanged_by_reupload_and_delete(store, model):
    old = red_artifact(model, seed=1)
    store.add("r", old.to_bytes(), filename="r.safetensors")
    held = store.resolve(VectorRef("r"))
    before = {k: v.clone() for k, v in held.tensors.items()}
    new = red_artifact(model, seed=7)
    store.add("r", new.to_bytes(), filename="r.safetensors")
    assert store.resolve(VectorRef("r")).sha256 == new.sha256
    assert held.sha256 == old.sha256
    assert all(torch.equal(held.tensors[k], before[k]) for k in before)
    assert store.resolve(VectorRef(f"r@{old.sha256[:10]}")) is held  # served from the cache
    store.delete("r")
    assert held.sha256 == old.sha256
    assert all(torch.equal(held.tensors[k], before[k]) for k in before)


def test_cache_is_bounded(root, model, layout):
    s = open_store(root, layout, cache_bytes=1)
    a, b = add_artifact(model, seed=1), add_artifact(model, seed=2)
    s.add("a", a.to_bytes(), filename="a.safetensors")
    s.add("b", b.to_bytes(), filename="b.safetensors")
    assert len(s._cache) == 1
    assert s.resolve("a").sha256 == a.sha256  # reloaded from disk
    assert s.resolve("b").sha256 == b.sha256


# ---------------------------------------------------------------------------- persistence and crashes


def test_persistence_across_restart(root, model, layout):
    s1 = open_store(root, layout)
    v1, v2 = red_artifact(model, seed=1), red_artifact(model, seed=2)
    s1.add("p", v1.to_bytes(), filename="p.safetensors", description="one")
    s1.add("p", v2.to_bytes(), filename="p.safetensors", description="two")
    s1.add("q", add_artifact(model).to_bytes(), filename="q.safetensors")
    prof = Profile.from_dict(
        {
            "vectors": [
                {"name": "p", "strength": 0.5},
                {"name": f"p@{v1.sha256[:8]}", "layers": [1], "positions": "generated"},
                {"name": "q"},
            ]
        }
    )
    saved = s1.put_profile("mix", prof, "a mix")
    compiled1 = s1.compile(prof)

    s2 = open_store(root, layout)
    assert [v.to_dict() for v in s2.list()] == [v.to_dict() for v in s1.list()]
    assert s2.get("p").sha256 == v2.sha256
    assert s2.get("p").versions == [v1.sha256, v2.sha256]
    assert s2.get("p").description == "two"
    assert s2.resolve(VectorRef(f"p@{v1.sha256[:6]}")).sha256 == v1.sha256
    assert s2.list_profiles() == {"mix": saved} and saved.description == "a mix"
    assert s2.get_profile("mix") == saved.profile
    compiled2 = s2.compile(s2.get_profile("mix"))
    assert compiled2.fingerprint == compiled1.fingerprint
    assert compiled2.resolved == compiled1.resolved


def test_leftover_temp_files_are_removed_and_never_listed(root, model, layout):
    s1 = open_store(root, layout)
    art = add_artifact(model)
    art_bytes = art.to_bytes()
    s1.add("kept", art_bytes, filename="k.safetensors")
    s1.put_profile("prof", Profile((VectorRef("kept"),)))
    # what a crash at various moments leaves behind
    (root / ".half.safetensors.abc123.tmp").write_bytes(b"partial")
    (root / "kept" / f".{'f' * 64}.safetensors.x1.tmp").write_bytes(b"partial")
    (root / "kept" / ".index.json.x2.tmp").write_bytes(b"{")
    (root / ".profiles" / ".prof.json.x3.tmp").write_bytes(b"{")
    deleting = root / ".gone.0a1b.deleting.tmp"
    deleting.mkdir()
    (deleting / "index.json").write_text("{}")
    # a crash after the artifact file of a brand-new name was written but before its index
    (root / "orphan").mkdir()
    (root / "orphan" / f"{art.sha256}.safetensors").write_bytes(art_bytes)
    # a crash after a new version's file was written but before the index was updated
    newer = add_artifact(model, seed=9)
    newer_bytes = newer.to_bytes()
    (root / "kept" / f"{newer.sha256}.safetensors").write_bytes(newer_bytes)

    s2 = open_store(root, layout)
    assert [v.name for v in s2.list()] == ["kept"]
    assert s2.get("kept").sha256 == art.sha256
    assert s2.get("kept").versions == [art.sha256]
    assert list(s2.list_profiles()) == ["prof"]
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(UnknownVectorError):
        s2.get("orphan")
    # the orphan name is still usable
    s2.add("orphan", newer_bytes, filename="o.safetensors")
    assert s2.get("orphan").versions == [newer.sha256]


def test_corrupt_index_and_profile_are_ignored(root, model, layout):
    s1 = open_store(root, layout)
    s1.add("good", add_artifact(model).to_bytes(), filename="g.safetensors")
    (root / "bad").mkdir()
    (root / "bad" / "index.json").write_text("not json")
    (root / ".profiles" / "broken.json").write_text('{"vectors": "nope"}')
    s2 = open_store(root, layout)
    assert [v.name for v in s2.list()] == ["good"]
    assert s2.list_profiles() == {}


def test_stored_file_tampered_is_detected(root, model, layout):
    s1 = open_store(root, layout)
    a, b = add_artifact(model, seed=1), add_artifact(model, seed=2)
    s1.add("t", a.to_bytes(), filename="t.safetensors")
    (root / "t" / f"{a.sha256}.safetensors").write_bytes(b.to_bytes())
    s2 = open_store(root, layout)
    with pytest.raises(ArtifactError, match="corrupt"):
        s2.resolve("t")


def test_reopened_with_another_model_rejects_on_resolve(root, model, layout):
    open_store(root, layout).add("v", add_artifact(model).to_bytes(), filename="v.safetensors")
    other = VectorStore(root, find_layout(tiny_llama(hidden=32)))  # another model: hidden size 32
    assert [v.name for v in other.list()] == ["v"]
    with pytest.raises(IncompatibleArtifactError, match="hidden_size"):
        other.resolve("v")


# ---------------------------------------------------------------------------- validation


def test_size_cap_checked_before_parsing(root, model, layout, monkeypatch):
    s = open_store(root, layout, max_bytes=1000)

    def boom(*a, **k):
        raise AssertionError("parse_artifact must not be called for an oversized upload")

    monkeypatch.setattr(store_mod, "parse_artifact", boom)
    blob = b"\x80" + b"\0" * 5000  # a "pickle" that would be named as such if it were parsed
    with pytest.raises(ArtifactTooLargeError, match="5001 bytes exceeds the 1000-byte limit") as e:
        s.add("big", blob, filename="big.safetensors")
    assert "pickle" not in str(e.value)
    assert isinstance(e.value, ArtifactError)
    with pytest.raises(ArtifactTooLargeError):
        s.add("big", b"GGUF" + b"\0" * 5000, filename="big.gguf")
    assert s.list() == []
    assert files_under(root) == {".profiles"}


def test_pickle_zip_and_garbage_rejected(store, root, model):
    tensors = {k: v for k, v in red_artifact(model).tensors.items()}
    with pytest.raises(ArtifactError, match="pickle"):
        store.add("p", pickle.dumps(tensors), filename="p.safetensors")
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with pytest.raises(ArtifactError, match="zip"):
        store.add("z", buf.getvalue(), filename="z.pt")
    with pytest.raises(ArtifactError):
        store.add("g", b"garbage bytes that are not safetensors at all", filename="g.safetensors")
    with pytest.raises(ArtifactError):
        store.add("e", b"", filename="e.safetensors")
    assert store.list() == []
    assert files_under(root) == {".profiles"}


def test_incompatible_rejected(store, root, model):
    wrong_d = add_artifact(tiny_llama(hidden=32))
    with pytest.raises(IncompatibleArtifactError, match="hidden_size"):
        store.add("w", wrong_d.to_bytes(), filename="w.safetensors")
    wrong_n = red_artifact(tiny_llama(layers=3))
    with pytest.raises(IncompatibleArtifactError, match="num_layers"):
        store.add("w", wrong_n.to_bytes(), filename="w.safetensors")
    g = torch.Generator().manual_seed(0)
    bad_lora = Artifact(
        kind="lora",
        tensors={
            "layers.0.q_proj.lora_A": torch.randn(2, 48, generator=g),
            "layers.0.q_proj.lora_B": torch.randn(64, 2, generator=g),
        },
        hidden_size=64,
        num_layers=2,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=4.0,
    )
    with pytest.raises(IncompatibleArtifactError, match="q_proj"):
        store.add("w", bad_lora.to_bytes(), filename="w.safetensors")
    no_such = Artifact(
        kind="lora",
        tensors={
            "layers.0.nope.lora_A": torch.randn(2, 64, generator=g),
            "layers.0.nope.lora_B": torch.randn(64, 2, generator=g),
        },
        hidden_size=64,
        num_layers=2,
        model_type="llama",
        method="rahf-scit",
        lora_alpha=4.0,
    )
    with pytest.raises(IncompatibleArtifactError, match="nope"):
        store.add("w", no_such.to_bytes(), filename="w.safetensors")
    assert store.list() == []
    assert files_under(root) == {".profiles"}


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        "a/b",
        "/abs",
        "x\n",
        "bad\x00name",
        "",
        ".hidden",
        "a" * 65,
        "tab\tname",
        "sp ace",
        "name@abcd",
        "..\\x",
    ],
)
def test_bad_names_rejected_and_nothing_written(tmp_path, model, layout, name):
    root = tmp_path / "vectors"
    s = open_store(root, layout)
    before = files_under(tmp_path)
    data = add_artifact(model).to_bytes()
    with pytest.raises(ValueError, match="invalid name"):
        s.add(name, data, filename="x.safetensors")
    with pytest.raises(ValueError, match="invalid name"):
        s.put_profile(name, Profile())
    with pytest.raises((ValueError, KeyError)):  # name@abcd names a version: unknown here
        s.delete(name)
    with pytest.raises(ValueError, match="invalid name"):
        s.delete_profile(name)
    assert files_under(tmp_path) == before


def test_hostile_filename_is_harmless(store, root, model):
    data = add_artifact(model).to_bytes()
    info = store.add("ok", data, filename="../../etc/passwd\n.safetensors")
    assert info.name == "ok"
    assert files_under(root) == {".profiles", "ok", "ok/index.json", f"ok/{info.sha256}.safetensors"}


# ---------------------------------------------------------------------------- GGUF


def write_gguf(path: Path, directions: dict[int, np.ndarray], hint: str = "llama") -> bytes:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(path, arch="controlvector")
    w.add_string("controlvector.model_hint", hint)
    w.add_uint32("controlvector.layer_count", len(directions))
    for layer, v in sorted(directions.items()):
        w.add_tensor(f"direction.{layer}", v.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.skipif(not HAS_GGUF_IMPORTER, reason="steering_vectors.gguf_io not available")
def test_gguf_upload(store, root, model, tmp_path):
    v = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    data = write_gguf(tmp_path / "cv.gguf", {1: v})
    info = store.add("cv", data, filename="cv.gguf", description="from llama.cpp")
    assert info.kind == "add" and info.method == "gguf-import" and info.layers == [1]
    assert info.description == "from llama.cpp"
    stored = root / "cv" / f"{info.sha256}.safetensors"
    assert stored.read_bytes()[:4] != b"GGUF"
    art = load_artifact(stored)  # stored as a safetensors artifact, versioned by those bytes
    assert art.sha256 == info.sha256
    assert np.array_equal(art.direction(1).numpy(), v)
    assert np.array_equal(store.resolve("cv").direction(1).numpy(), v)
    # detected by its magic whatever the file name
    v2 = 2 * v
    info2 = store.add("cv2", write_gguf(tmp_path / "b.gguf", {1: v2}), filename="upload.bin")
    assert info2.method == "gguf-import"
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    # persists like any other vector
    s2 = VectorStore(root, find_layout(tiny_llama()))
    assert s2.get("cv").sha256 == info.sha256


@pytest.mark.skipif(not HAS_GGUF_IMPORTER, reason="steering_vectors.gguf_io not available")
def test_gguf_rejections(store, root, tmp_path):
    wrong_d = write_gguf(tmp_path / "d.gguf", {1: np.ones(32, np.float32)})
    with pytest.raises(IncompatibleArtifactError):
        store.add("cv", wrong_d, filename="d.gguf")
    out_of_range = write_gguf(tmp_path / "r.gguf", {5: np.ones(64, np.float32)})
    with pytest.raises(IncompatibleArtifactError):
        store.add("cv", out_of_range, filename="r.gguf")
    with pytest.raises(ArtifactError):
        store.add("cv", b"not a gguf at all", filename="x.gguf")
    with pytest.raises(ArtifactError):
        store.add("cv", b"GGUF\x03\x00\x00\x00truncated", filename="x.bin")
    assert store.list() == []
    assert files_under(root) == {".profiles"}


# ---------------------------------------------------------------------------- profiles


def test_profiles_crud(store, root, model):
    store.add("a", add_artifact(model).to_bytes(), filename="a.safetensors")
    store.add("b", red_artifact(model).to_bytes(), filename="b.safetensors")
    p = Profile.from_dict({"vectors": [{"name": "a", "strength": 2.0}, {"name": "b", "layers": [0]}]})
    saved = store.put_profile("both", p, "two vectors")
    sha_a, sha_b = store.get("a").sha256, store.get("b").sha256
    pinned = Profile.from_dict(
        {"vectors": [{"name": f"a@{sha_a}", "strength": 2.0}, {"name": f"b@{sha_b}", "layers": [0]}]}
    )
    assert saved.profile == pinned and saved.description == "two vectors"  # pinned when saved
    assert store.get_profile("both") == pinned
    assert store.saved_profile("both").description == "two vectors"
    assert store.has_profile("both") and not store.has_profile("none")
    assert json.loads((root / ".profiles" / "both.json").read_text())["vectors"][0]["strength"] == 2.0
    p2 = Profile.from_dict({"vectors": [{"name": "a"}]})
    store.put_profile("both", p2)
    store.put_profile("again", p)
    assert {n: s.profile for n, s in store.list_profiles().items()} == {
        "again": pinned,
        "both": Profile.from_dict({"vectors": [{"name": f"a@{sha_a}"}]}),
    }
    compiled = store.compile(p)
    assert [r["sha256"] for r in compiled.resolved] == [store.get("a").sha256, store.get("b").sha256]
    assert ("resid", 0) in compiled.affine and ("ffn", 0) in compiled.affine
    assert ("ffn", 1) not in compiled.affine

    store.delete_profile("both")
    assert list(store.list_profiles()) == ["again"]
    assert not (root / ".profiles" / "both.json").exists()
    with pytest.raises(UnknownProfileError, match="both"):
        store.get_profile("both")
    with pytest.raises(UnknownProfileError, match="both"):
        store.delete_profile("both")

    # a vector a saved profile uses is deleted only when forced; the profile then fails with a 404-type error
    with pytest.raises(ConflictError, match="again"):
        store.delete("b")
    store.delete("b", force=True)
    with pytest.raises(UnknownVectorError, match="'b'"):
        store.compile(store.get_profile("again"))


def test_profile_referencing_unknown_vector(store, model):
    art = add_artifact(model)
    store.add("a", art.to_bytes(), filename="a.safetensors")
    with pytest.raises(UnknownVectorError, match="ghost"):
        store.put_profile("p", Profile.from_dict({"vectors": [{"name": "a"}, {"name": "ghost"}]}))
    other = "0000" if not art.sha256.startswith("0000") else "1111"
    with pytest.raises(UnknownVectorError):
        store.put_profile("p", Profile.from_dict({"vectors": [{"name": f"a@{other}"}]}))
    with pytest.raises(UnknownVectorError, match="ghost"):
        store.compile(Profile.from_dict({"vectors": [{"name": "ghost"}]}))
    assert store.list_profiles() == {}


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_uploads_and_resolves(store, model):
    arts = [add_artifact(model, seed=i) for i in range(8)]
    blobs = [a.to_bytes() for a in arts]
    store.add("shared", blobs[0], filename="s.safetensors")
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            store.add(f"v{i}", blobs[i], filename="v.safetensors")
            store.add("shared", blobs[i], filename="s.safetensors")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def resolve() -> None:
        try:
            for _ in range(50):
                assert store.resolve("shared").sha256 in {a.sha256 for a in arts}
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store) == 9
    assert sorted(store.get("shared").versions) == sorted(a.sha256 for a in arts)


# ---------------------------------------------------------------------------- several processes (issue 13)


def _hammer(root: str, wid: int, n: int, out: str) -> None:
    """A second server process's worth of changes on the shared directory: uploads (own names and one
    shared name), profiles, deletes; writes what was acknowledged to ``out``."""
    model = tiny_llama()
    store = VectorStore(root, find_layout(model), max_versions=1000)
    kept, deleted, shared = [], [], []
    for i in range(n):
        name, prof = f"w{wid}-{i}", f"p{wid}-{i}"
        art = add_artifact(model, seed=wid * 1000 + i)
        store.add(name, art.to_bytes())
        shared.append(store.add("shared", add_artifact(model, seed=10**6 + wid * 1000 + i).to_bytes()).sha256)
        store.put_profile(prof, Profile.from_dict({"vectors": [{"name": name}, {"name": "shared"}]}))
        if i % 3 == 2:
            store.delete_profile(prof)
            store.delete(name)
            deleted.append(name)
        else:
            kept.append([name, art.sha256, prof])
    Path(out).write_text(json.dumps({"kept": kept, "deleted": deleted, "shared": shared}))


def test_two_processes_share_the_directory_without_losing_anything(root, layout, model, tmp_path):
    import multiprocessing

    first = add_artifact(model, seed=999_999)
    live = open_store(root, layout, max_versions=1000)  # a third process's view, opened before
    live.add("shared", first.to_bytes())
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{w}.json" for w in range(2)]
    procs = [ctx.Process(target=_hammer, args=(str(root), w, 12, str(outs[w]))) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    done = [json.loads(o.read_text()) for o in outs]
    kept = [k for d in done for k in d["kept"]]
    shared = {first.sha256, *(s for d in done for s in d["shared"])}
    for view in (live, open_store(root, layout, max_versions=1000)):  # the old view sees it all at once
        assert set(view.names()) == {"shared", *(k[0] for k in kept)}
        assert set(view.get("shared").versions) == shared  # no concurrent version was lost
        assert set(view.list_profiles()) == {k[2] for k in kept}
        for name, sha, prof in kept:
            assert view.get(name).sha256 == sha
            pinned = view.get_profile(prof).vectors[0].name
            assert pinned == f"{name}@{sha}"
            view.compile(view.get_profile(prof))
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_change_by_another_process_is_seen_by_the_next_call(root, layout, model):
    import subprocess
    import sys

    mine = open_store(root, layout)
    assert mine.names() == []
    script = (
        "import sys; sys.path.insert(0, 'tests');"
        "from helpers import add_artifact, tiny_llama; from server.store import VectorStore;"
        "from steering_vectors import Profile, find_layout;"
        "m = tiny_llama(); s = VectorStore(sys.argv[1], find_layout(m));"
        "s.add('fresh', add_artifact(m, seed=5).to_bytes());"
        "s.put_profile('pf', Profile.from_dict({'vectors': [{'name': 'fresh'}]}))"
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, cwd=Path(__file__).parent.parent)
    assert mine.names() == ["fresh"] and mine.has_profile("pf")  # no reopen: the next call reloads
    assert mine.resolve("fresh").sha256 == add_artifact(model, seed=5).sha256


# ---------------------------------------------------------------------------- lifecycle bounds (issue 13)


def test_max_versions_drops_the_oldest_unpinned_version(root, layout, model):
    s = open_store(root, layout, max_versions=3)
    arts = [add_artifact(model, seed=s_) for s_ in range(10, 16)]
    s.add("v", arts[0].to_bytes())
    s.put_profile("keep", Profile.from_dict({"vectors": [{"name": "v"}]}))  # pins arts[0]
    for a in arts[1:4]:
        s.add("v", a.to_bytes())
    assert s.get("v").versions == [arts[0].sha256, arts[2].sha256, arts[3].sha256]  # arts[1] went first
    assert not (root / "v" / f"{arts[1].sha256}.safetensors").exists()
    s.put_profile("keep2", Profile.from_dict({"vectors": [{"name": "v"}]}))  # pins arts[3]
    s.put_profile("keep3", Profile.from_dict({"vectors": [{"name": f"v@{arts[2].sha256[:12]}"}]}))
    before = files_under(root)
    with pytest.raises(ConflictError, match="--max-versions"):
        s.add("v", arts[4].to_bytes())  # every older version is pinned: nothing is written
    assert files_under(root) == before and len(s.get("v").versions) == 3


def test_max_vectors_bounds_the_names(root, layout, model):
    s = open_store(root, layout, max_vectors=2)
    s.add("a", add_artifact(model, seed=1).to_bytes())
    s.add("b", add_artifact(model, seed=2).to_bytes())
    with pytest.raises(ConflictError, match="--max-vectors"):
        s.add("c", add_artifact(model, seed=3).to_bytes())
    s.add("a", add_artifact(model, seed=4).to_bytes())  # a new version of a known name is fine
    assert s.names() == ["a", "b"] and not (root / "c").exists()


def test_pinned_profiles_survive_reuploads_and_block_deletes(store, root, model):
    v1 = add_artifact(model, seed=1)
    store.add("vec", v1.to_bytes())
    store.put_profile("calm", Profile.from_dict({"vectors": [{"name": "vec", "strength": 0.5}]}))
    store.add("vec", red_artifact(model).to_bytes())  # another kind under the same name
    compiled = store.compile(store.get_profile("calm"))
    assert compiled.resolved[0]["sha256"] == v1.sha256  # the profile still means what it meant
    with pytest.raises(ConflictError, match="calm"):
        store.delete(f"vec@{v1.sha256[:8]}")  # the pinned version
    current = store.get("vec").sha256
    assert store.delete(f"vec@{current[:8]}") == [current]
    assert store.get("vec").versions == [v1.sha256]  # the previous version is current again
    assert store.delete("vec", force=True) == [v1.sha256]
    assert "vec" not in store and not (root / "vec").exists()
    with pytest.raises(UnknownVectorError, match="vec"):
        store.compile(store.get_profile("calm"))


def test_reserved_names_and_model_mismatch(root, layout, model):
    s = open_store(root, layout, model_names=("tiny-llama",), reserved_names=("tiny-llama",))
    s.add("ok", add_artifact(model).to_bytes())
    with pytest.raises(ConflictError, match="served model"):
        s.put_profile("tiny-llama", Profile.from_dict({"vectors": [{"name": "ok"}]}))
    other_type = add_artifact(model)
    other_type.model_type = "gpt2"
    foreign = add_artifact(model, seed=7)
    foreign.extra["base_model"] = "org/other-model"
    same = add_artifact(model, seed=8)
    same.extra["base_model"] = "SomeOrg/Tiny-Llama"
    with pytest.raises(IncompatibleArtifactError, match="model_type 'gpt2'.*--allow-model-mismatch"):
        s.add("x", other_type.to_bytes())
    with pytest.raises(IncompatibleArtifactError, match="base_model 'org/other-model'"):
        s.add("x", foreign.to_bytes())
    s.add("x", same.to_bytes())  # the same model under another spelling
    lenient = open_store(root, layout, model_names=None)
    lenient.add("y", other_type.to_bytes())
    lenient.add("z", foreign.to_bytes())
