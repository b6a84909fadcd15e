"""llama.cpp / repeng control vectors (GGUF) to and from ``add`` artifacts (SPEC §4).

A control-vector GGUF has ``general.architecture = "controlvector"``, the keys
``controlvector.model_hint`` (string) and ``controlvector.layer_count`` (integer), and one 1-D F32 tensor
``direction.N`` [n_embd] per steered layer.

Layer numbering (established from llama.cpp's source, ggml-org/llama.cpp, not guessed)
---------------------------------------------------------------------------------------

* Loading, ``common/common.cpp``, ``common_control_vector_load_one`` (called by
  ``common_control_vector_load``; named ``llama_control_vector_load_one`` / ``llama_control_vector_load``
  before the ``common_`` rename): takes N from the text after the first ``.`` of ``direction.N``; an
  unparsable or negative N, and N == 0 ("invalid (zero) direction tensor layer index"), make llama.cpp
  refuse the file, as do a non-F32 tensor, a non-1-D tensor and differing lengths. The whole
  ``--control-vector`` load then fails. Direction N is stored
  at flat offset ``(N - 1) * n_embd`` ("layer 1 at [0]"); repeated layers are summed; layers that are
  absent stay zero. This loader never reads ``controlvector.layer_count``, ``controlvector.model_hint``
  or ``general.architecture``.
* Installing, ``src/llama-adapter.cpp``: ``llama_adapter_cvec::init`` allocates one zeroed tensor per
  layer for ``il = 1 .. n_layer-1`` and never one for ``il = 0``; ``llama_adapter_cvec::apply`` copies
  flat offset ``(il - 1) * n_embd`` into ``tensors[il]``, so ``direction.N`` lands in ``tensors[N]``,
  and a direction with N >= n_layer is silently ignored. ``tensor_for(il)`` returns nothing for
  ``il = 0`` and outside the runtime ``--control-vector-layer-range`` (default 1 .. n_layer, set in
  ``common_init_from_params`` before it calls ``llama_set_adapter_cvec``, formerly
  ``llama_apply_adapter_cvec`` / ``llama_control_vector_apply``). ``apply_to`` adds the tensor.
* Applying, ``src/llama-graph.cpp`` ``llm_graph_context::build_cvec(cur, il)`` calls ``apply_to``; the
  model graphs (e.g. ``src/models/llama.cpp``, ``llama_model_llama::graph``) loop ``il = 0 .. n_layer-1``
  and call ``build_cvec`` after the FFN residual add, on the tensor they name ``l_out`` (the block's
  output, which is the next block's input).

Conclusion: ``direction.N`` is added to the output of **0-based decoder layer N**. In HF terms that is
the output of ``model.layers[N]``, i.e. ``output_hidden_states[N + 1]``. That is exactly where our
``layers.{l}.direction`` goes, so the mapping is the identity: ``direction.l`` <-> ``layers.{l}.direction``.
``direction.0`` is illegal: llama.cpp rejects the whole file, and it has no way to steer layer 0's output.
``controlvector.layer_count`` holds the **number of direction tensors in the file**: repeng
(vgel/repeng, ``repeng/extract.py``, ``ControlVector.export_gguf``) writes the length of its directions
dict as uint32, and llama.cpp's generator (``tools/cvector-generator/cvector-generator.cpp``,
``export_gguf``) writes the number of vectors it made, as int32. Nobody reads it back.

repeng agrees: its ``directions`` keys are 0-based ``model.layers`` indices (``repeng/control.py``,
``ControlModule`` adds to that block's output; ``read_representations`` reads ``hidden_states[layer + 1]``),
written unchanged as ``direction.{layer}``, and its default layers are n-1 .. 1, never 0.
(llama.cpp's own ``cvector-generator``, ``pca.hpp`` ``run_pca`` / ``mean.hpp`` ``mean::run``, names its
vector ``i`` ``direction.{i+1}``, where ``i`` counts the ``l_out`` captures from layer 0 up. So it takes
``direction.N`` from layer N-1's output and the loader adds it after layer N. We follow the loader, which
is what llama.cpp actually does with a file.)

Decisions here
--------------

* Import: ``direction.0`` is rejected, like llama.cpp does. N >= ``num_layers`` is rejected when the served
  model's ``num_layers`` is given (llama.cpp would ignore it silently; SPEC §4 says reject). F16 tensors are
  widened to float32 (llama.cpp itself would take F32 only). Names must be exactly ``direction.N`` with a
  canonical decimal N (llama.cpp's ``stoi`` would also accept ``direction.3x``, and would sum
  ``direction.03`` with ``direction.3``). We reject these, because they are ambiguous.
* All-zero directions are dropped on import by default (``keep_zero=False``). They are exact no-ops in
  llama.cpp (absent layers are zero) and in ``h + w*v``, and keeping them would hook layers that change
  nothing. The dropped layers are listed in ``extra["gguf_zero_layers_dropped"]``. A file with only zero
  directions is an error.
* ``num_layers`` when not given: ``steerserve.num_layers`` if the file carries it (our exports do), else
  :class:`LayerCountUnknownError`. The highest direction is never taken for the model's depth (a repeng
  file for layers 1..19 of a 30-layer model would pass for a 20-layer one), and
  ``controlvector.layer_count`` is not used for it either: it counts tensors, not model layers.
* ``model_type``: the file's ``controlvector.model_hint`` (the source model's type); the argument is the
  fallback for a file without one. The server compares it with the served model.
* Before the ``gguf`` library parses anything, :func:`~steering_vectors.gguf_header.check_gguf_header`
  bounds the header (metadata keys, array items, string lengths, tensor count), so a small file cannot
  declare an enormous metadata array.
* Export: a non-zero direction at layer 0 cannot be expressed. It raises :class:`ArtifactError` unless
  ``drop_layer0=True``, which omits it and reports it in the result. An all-zero layer-0 direction is
  omitted, since absence is zero, and is also reported. Directions are written as float32 (float16 / bfloat16
  widen exactly), ``controlvector.layer_count`` is the number of tensors written, and
  ``steerserve.num_layers`` records the artifact's layer count (llama.cpp ignores unknown keys).
  So ``import_gguf(export_gguf(a))`` gives the same layers, ``num_layers``, ``hidden_size`` and
  ``model_type``, with bitwise-equal float32 tensors.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, ReaderTensor

from .artifact import MAX_ARTIFACT_BYTES, Artifact, ArtifactError, IncompatibleArtifactError, fsync_dir
from .gguf_header import check_gguf_header

__all__ = [
    "CONTROLVECTOR_ARCH",
    "GGUFExportResult",
    "LayerCountUnknownError",
    "export_gguf",
    "import_gguf",
    "import_gguf_bytes",
]

CONTROLVECTOR_ARCH = "controlvector"
_KEY_ARCH = "general.architecture"
_KEY_HINT = f"{CONTROLVECTOR_ARCH}.model_hint"
_KEY_COUNT = f"{CONTROLVECTOR_ARCH}.layer_count"
_KEY_NUM_LAYERS = "steerserve.num_layers"
_NAME = re.compile(r"^direction\.(0|[1-9][0-9]{0,5})$")
_MAX_LAYER = 100_000  # same bound parse_artifact puts on num_layers
_GGUF_MAGIC = b"GGUF"


class LayerCountUnknownError(ArtifactError):
    """The file does not record its model's layer count and none was given; ``bound`` is the smallest
    count its directions allow (the highest direction + 1)."""

    def __init__(self, message: str, bound: int) -> None:
        super().__init__(message)
        self.bound = bound


@dataclass(frozen=True)
class GGUFExportResult:
    """What :func:`export_gguf` wrote.

    ``sha256`` is the hash of the file's bytes. ``layers`` are the 0-based layers written, each as
    ``direction.{l}``. ``dropped`` are the layers left out because llama.cpp cannot express them (layer 0).
    """

    sha256: str
    layers: tuple[int, ...]
    dropped: tuple[int, ...]


_INT_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)


def _field_value(reader: GGUFReader, key: str, kind: str) -> str | int | None:
    """A GGUF key's scalar value: ``str`` for kind "string", ``int`` for kind "int"; None if absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    types = list(field.types)
    if kind == "string":
        if types != [GGUFValueType.STRING]:
            raise ArtifactError(f"GGUF key {key} must be a string, found {[t.name for t in types]}")
        try:
            return bytes(field.parts[-1]).decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f"GGUF key {key} is not valid UTF-8") from None
    if len(types) != 1 or types[0] not in _INT_TYPES:
        raise ArtifactError(f"GGUF key {key} must be an integer, found {[t.name for t in types]}")
    return int(field.parts[-1][0])


def import_gguf(
    path: str | os.PathLike[str],
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    model_type: str | None = None,
    keep_zero: bool = False,
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> Artifact:
    """Read a llama.cpp / repeng control-vector GGUF as an ``add`` artifact.

    ``direction.N`` becomes ``layers.{N}.direction``: both are added to the output of 0-based decoder
    layer N (see the module docstring for where that comes from in llama.cpp). ``hidden_size``,
    ``num_layers`` and ``model_type`` describe the served model when given. A direction length or a layer
    that does not fit them raises :class:`IncompatibleArtifactError`. When they are not given, they come
    from the file. The file's size is checked before anything is parsed. ``method`` is ``"gguf-import"``;
    ``extra["source_sha256"]`` is the sha256 of the GGUF file's bytes.

    Raises :class:`ArtifactError` for anything that is not a valid control vector.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ArtifactError(f"{p.name}: cannot read: {e.strerror or e}") from None
    if size > max_bytes:
        raise ArtifactError(f"{p.name}: {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        return _import(p, hidden_size, num_layers, model_type, keep_zero, max_bytes)
    except ArtifactError as e:
        e.args = (f"{p.name}: {e}",)
        raise e from None


def _read_checked(p: Path, max_bytes: int) -> str:
    """The file's sha256, once its size, magic and header bounds are checked."""
    data = p.read_bytes()
    if len(data) > max_bytes:  # the file grew after stat()
        raise ArtifactError(f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    if data[:4] != _GGUF_MAGIC:
        if data[:1] == b"{" or data[8:9] == b"{":
            what = "looks like JSON or safetensors"
        elif data[:4] == b"PK\x03\x04":
            what = "is a zip archive"
        elif data[:1] == b"\x80":
            what = "is a Python pickle"
        else:
            what = f"starts with {data[:4]!r}"
        raise ArtifactError(f"not a GGUF file (no 'GGUF' magic; the file {what})")
    check_gguf_header(data)
    return hashlib.sha256(data).hexdigest()


def _direction(t: ReaderTensor, d: int | None) -> tuple[int, np.ndarray]:
    """(layer, float32 vector) of one ``direction.N`` tensor; ``d``: the length of the others."""
    m = _NAME.match(t.name)
    if m is None:
        raise ArtifactError(
            f"tensor {t.name!r} is not named direction.N (N a decimal layer number without leading zeros)"
        )
    layer = int(m.group(1))
    if layer == 0:
        raise ArtifactError(
            "tensor direction.0 is invalid: llama.cpp numbers control-vector layers from 1 "
            "(direction.N is added to the output of layer N) and rejects files with direction.0"
        )
    if layer >= _MAX_LAYER:
        raise ArtifactError(f"tensor {t.name}: layer {layer} out of range")
    dims = [int(x) for x in t.shape]
    if not dims or any(x != 1 for x in dims[1:]):
        raise ArtifactError(f"tensor {t.name}: shape {dims} is not 1-D")
    if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        raise ArtifactError(f"tensor {t.name}: type {t.tensor_type.name}, expected F32 (or F16)")
    n = dims[0]
    if n <= 0:
        raise ArtifactError(f"tensor {t.name}: empty")
    if d is not None and n != d:
        raise ArtifactError(f"tensor {t.name}: length {n} does not match the other directions' {d}")
    try:
        vec = np.array(t.data, dtype=np.float32).reshape(-1)
    except Exception as e:
        raise ArtifactError(f"tensor {t.name}: cannot read its data: {e}") from None
    if vec.shape != (n,):
        raise ArtifactError(f"tensor {t.name}: holds {vec.size} values, expected {n}")
    if not np.isfinite(vec).all():
        raise ArtifactError(f"tensor {t.name}: contains NaN or Inf values")
    return layer, vec


def _layer_count(top: int, num_layers: int | None, file_layers: int | None, count: int | None) -> int:
    """The model's layer count: the one given (checked against the highest direction ``top``), else the
    file's ``steerserve.num_layers``; never guessed (:class:`LayerCountUnknownError`)."""
    if num_layers is not None:
        if top >= num_layers:
            raise IncompatibleArtifactError(
                f"direction.{top} targets layer {top}, out of range for the served model's "
                f"{num_layers} layers (valid: direction.1 .. direction.{num_layers - 1})"
            )
        return num_layers
    if file_layers is not None:
        if not (top < file_layers <= _MAX_LAYER):
            raise ArtifactError(f"{_KEY_NUM_LAYERS} = {file_layers} but the file has direction.{top}")
        return file_layers
    raise LayerCountUnknownError(
        f"the file does not record its model's layer count ({_KEY_COUNT} = {count} counts direction "
        f"tensors, not model layers); give the model's number of layers (at least {top + 1})",
        bound=top + 1,
    )


def _import(
    p: Path,
    hidden_size: int | None,
    num_layers: int | None,
    model_type: str | None,
    keep_zero: bool,
    max_bytes: int,
) -> Artifact:
    sha = _read_checked(p, max_bytes)
    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # the gguf library raises ValueError, KeyError, IndexError... on bad files
        raise ArtifactError(f"invalid or truncated GGUF file: {e}") from None

    arch = _field_value(reader, _KEY_ARCH, "string")
    if arch is None:
        raise ArtifactError(f"GGUF has no {_KEY_ARCH}; a control vector has '{CONTROLVECTOR_ARCH}'")
    if arch != CONTROLVECTOR_ARCH:
        raise ArtifactError(
            f"GGUF {_KEY_ARCH} is {arch!r}, not {CONTROLVECTOR_ARCH!r}: this is not a control vector"
        )
    hint = _field_value(reader, _KEY_HINT, "string")
    count = _field_value(reader, _KEY_COUNT, "int")
    file_layers = _field_value(reader, _KEY_NUM_LAYERS, "int")

    directions: dict[int, np.ndarray] = {}
    d: int | None = None
    for t in reader.tensors:
        layer, directions[layer] = _direction(t, d)
        d = directions[layer].shape[0]
    del reader
    if d is None:
        raise ArtifactError("GGUF control vector holds no direction tensors")
    if hidden_size is not None and hidden_size != d:
        raise IncompatibleArtifactError(
            f"control vector length {d} does not fit the served model's hidden_size {hidden_size}"
        )
    n_layers = _layer_count(max(directions), num_layers, file_layers, count)
    model_type = hint or model_type
    if not model_type:
        raise ArtifactError(f"GGUF has no {_KEY_HINT}; pass model_type")

    zero = sorted(layer for layer, v in directions.items() if not v.any())
    kept = {layer: v for layer, v in directions.items() if keep_zero or layer not in zero}
    if not kept:
        raise ArtifactError("every direction in the file is all zeros; it steers nothing")
    extra = {"source_format": "gguf-controlvector", "source_sha256": sha}
    if count is not None:
        extra["gguf_layer_count"] = str(count)
    if zero and not keep_zero:
        extra["gguf_zero_layers_dropped"] = ",".join(map(str, zero))
    return Artifact(
        kind="add",
        tensors={f"layers.{layer}.direction": torch.from_numpy(kept[layer]) for layer in sorted(kept)},
        hidden_size=d,
        num_layers=n_layers,
        model_type=model_type,
        method="gguf-import",
        extra=extra,
    )


def import_gguf_bytes(data: bytes, name: str = "upload.gguf", **options: Any) -> Artifact:
    """:func:`import_gguf` of GGUF bytes (written to a private temporary file the reader maps)."""
    with tempfile.TemporaryDirectory(prefix="steerserve-gguf-") as tmp:
        src = Path(tmp) / (Path(name).name or "upload.gguf")
        src.write_bytes(data)
        return import_gguf(src, **options)


def export_gguf(
    artifact: Artifact, path: str | os.PathLike[str], *, drop_layer0: bool = False
) -> GGUFExportResult:
    """Write an ``add`` artifact as a llama.cpp control-vector GGUF, atomically.

    ``layers.{l}.direction`` becomes ``direction.{l}`` as float32. llama.cpp adds both to the output of
    0-based layer l. llama.cpp cannot steer layer 0's output, so a non-zero layer-0 direction raises
    :class:`ArtifactError` unless ``drop_layer0`` is set, which omits it. Either way, what was left out is
    in the result's ``dropped``. The file is written to a temporary file in the same directory, fsynced, and
    renamed over ``path``.
    """
    if artifact.kind != "add":
        raise ArtifactError(
            f"only 'add' artifacts can be exported as llama.cpp control vectors, not {artifact.kind!r}"
        )
    rows: dict[int, np.ndarray] = {}
    dropped: list[int] = []
    for layer in artifact.layers:
        vec = artifact.direction(layer).detach().to("cpu", torch.float32).contiguous().numpy().copy()
        if layer == 0:
            if vec.any() and not drop_layer0:
                raise ArtifactError(
                    "layer 0 has a non-zero direction, which llama.cpp cannot express: its control vectors "
                    "add direction.N to the output of layer N and reject direction.0. Pass drop_layer0=True "
                    "to export without it"
                )
            dropped.append(0)
            continue
        rows[layer] = vec
    if not rows:
        raise ArtifactError("nothing to export: the artifact's only direction is at layer 0")

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch=CONTROLVECTOR_ARCH)
        try:
            writer.add_string(_KEY_HINT, artifact.model_type)
            writer.add_uint32(_KEY_COUNT, len(rows))
            writer.add_uint32(_KEY_NUM_LAYERS, artifact.num_layers)
            for layer in sorted(rows):
                writer.add_tensor(f"direction.{layer}", rows[layer])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return GGUFExportResult(sha256=sha, layers=tuple(sorted(rows)), dropped=tuple(dropped))
