"""Steering artifacts: the safetensors file format of SPEC §4, its validation and its version.

A file holds one kind of edit:

- ``red``:  ``layers.{l}.scale`` [d] and ``layers.{l}.bias`` [d], applied to the FFN output as ``h*s + b``;
- ``add``:  ``layers.{l}.direction`` [d], added to the decoder layer output as ``h + w*v``;
- ``lora``: ``layers.{l}.{module}.lora_A`` [r, d_in] and ``layers.{l}.{module}.lora_B`` [d_out, r],
  added to the output of that linear as ``w*(alpha/r)*B(A x)``.

The version of an artifact is the sha256 of its file bytes. Nothing here ever unpickles: the bytes are
checked to be a safetensors container (and nothing else) before the safetensors library parses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load

if TYPE_CHECKING:
    from .arch import ModelLayout

__all__ = [
    "FORMAT",
    "KINDS",
    "MAX_ARTIFACT_BYTES",
    "Artifact",
    "ArtifactError",
    "IncompatibleArtifactError",
    "atomic_write_bytes",
    "fsync_dir",
    "load_artifact",
    "parse_artifact",
    "save_artifact",
]

FORMAT = "steerserve.v1"
KINDS = ("red", "add", "lora")
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
_MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAME = {
    "red": re.compile(r"^layers\.(\d+)\.(scale|bias)$"),
    "add": re.compile(r"^layers\.(\d+)\.(direction)$"),
    "lora": re.compile(r"^layers\.(\d+)\.([A-Za-z_][A-Za-z0-9_.]*)\.(lora_A|lora_B)$"),
}


class ArtifactError(ValueError):
    """The bytes or tensors are not a valid steering artifact (HTTP 400)."""


class IncompatibleArtifactError(ArtifactError):
    """A valid artifact that does not fit the served model (HTTP 409)."""


@dataclass
class Artifact:
    """One steering artifact: its kind, tensors by SPEC §4 name, and string metadata.

    ``sha256`` is the version: the hash of the file bytes it was loaded from or saved as.
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    hidden_size: int
    num_layers: int
    model_type: str
    method: str
    lora_alpha: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    def __post_init__(self) -> None:
        _validate(self)
        if not self.sha256:
            self.to_bytes()  # sets sha256: an in-memory artifact is versioned like its file would be

    @classmethod
    def for_model(
        cls, layout: ModelLayout, kind: str, tensors: dict[str, torch.Tensor], method: str, **fields: Any
    ) -> Artifact:
        """An artifact of ``kind`` for the model ``layout`` describes (its hidden size, layer count and
        type); ``fields`` are the other fields (``lora_alpha``, ``extra``)."""
        return cls(
            kind,
            tensors,
            hidden_size=layout.hidden_size,
            num_layers=layout.num_layers,
            model_type=layout.model_type,
            method=method,
            **fields,
        )

    @property
    def layers(self) -> list[int]:
        """Sorted decoder layers this artifact touches."""
        return sorted({int(name.split(".")[1]) for name in self.tensors})

    def red(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, bias) of a ``red`` artifact at ``layer``, each [d]."""
        return self.tensors[f"layers.{layer}.scale"], self.tensors[f"layers.{layer}.bias"]

    def direction(self, layer: int) -> torch.Tensor:
        """Direction [d] of an ``add`` artifact at ``layer``."""
        return self.tensors[f"layers.{layer}.direction"]

    @property
    def lora_rank(self) -> int:
        """The largest rank of a ``lora`` artifact's modules (0 for other kinds)."""
        return max((t.shape[0] for n, t in self.tensors.items() if n.endswith(".lora_A")), default=0)

    def lora_modules(self, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A [r, d_in], B [d_out, r])} of a ``lora`` artifact at ``layer``."""
        prefix = f"layers.{layer}."
        mods = {
            n[len(prefix) : -len(".lora_A")]
            for n in self.tensors
            if n.startswith(prefix) and n.endswith(".lora_A")
        }
        return {
            m: (self.tensors[f"{prefix}{m}.lora_A"], self.tensors[f"{prefix}{m}.lora_B"])
            for m in sorted(mods)
        }

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` block of SPEC §4 (all values strings)."""
        meta = dict(self.extra)
        meta.update(
            format=FORMAT,
            kind=self.kind,
            model_type=self.model_type,
            hidden_size=str(self.hidden_size),
            num_layers=str(self.num_layers),
            method=self.method,
        )
        if self.lora_alpha is not None:
            meta["lora_alpha"] = repr(float(self.lora_alpha))
        return meta

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes (and set ``sha256`` to their hash).

        The header is written with sorted keys, so equal artifacts give equal bytes and equal versions.
        """
        header: dict[str, object] = {"__metadata__": dict(sorted(self.metadata().items()))}
        blobs, offset = [], 0
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().contiguous().cpu()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            header[name] = {
                "dtype": _ST_DTYPE[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + len(raw)],
            }
            blobs.append(raw)
            offset += len(raw)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # safetensors aligns the data section to 8 bytes
        data = struct.pack("<Q", len(head)) + head + b"".join(blobs)
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data

    def norms(self) -> dict[str, float]:
        """L2 norm of every tensor, by name (for ``vectors inspect``)."""
        return {k: float(v.float().norm()) for k, v in sorted(self.tensors.items())}

    def check_compatible(
        self,
        *,
        hidden_size: int,
        num_layers: int,
        linear_shapes: dict[tuple[int, str], tuple[int, int]] | None = None,
    ) -> None:
        """Raise :class:`IncompatibleArtifactError` unless this artifact fits the model.

        ``linear_shapes`` maps (layer, module) to (d_in, d_out) of the linears a ``lora`` may target.
        """
        if self.hidden_size != hidden_size:
            raise IncompatibleArtifactError(
                f"artifact hidden_size {self.hidden_size} does not fit the served model's {hidden_size}"
            )
        if self.num_layers != num_layers:
            raise IncompatibleArtifactError(
                f"artifact num_layers {self.num_layers} does not fit the served model's {num_layers}"
            )
        if self.kind != "lora" or linear_shapes is None:
            return
        for layer in self.layers:
            for module, (a, b) in self.lora_modules(layer).items():
                shape = linear_shapes.get((layer, module))
                if shape is None:
                    raise IncompatibleArtifactError(
                        f"lora targets layers.{layer}.{module}, which is not a linear of the served model"
                    )
                if (a.shape[1], b.shape[0]) != shape:
                    raise IncompatibleArtifactError(
                        f"lora layers.{layer}.{module} maps {a.shape[1]}->{b.shape[0]} but the model's "
                        f"linear maps {shape[0]}->{shape[1]}"
                    )


def _validate(art: Artifact) -> None:
    if art.kind not in KINDS:
        raise ArtifactError(f"unknown artifact kind {art.kind!r}; expected one of {', '.join(KINDS)}")
    if art.hidden_size <= 0 or art.num_layers <= 0:
        raise ArtifactError("hidden_size and num_layers must be positive integers")
    if not art.tensors:
        raise ArtifactError("artifact holds no tensors")
    pattern = _NAME[art.kind]
    d = art.hidden_size
    for name, t in art.tensors.items():
        m = pattern.match(name)
        if m is None:
            raise ArtifactError(f"tensor name {name!r} is not valid for kind {art.kind!r}")
        layer = int(m.group(1))
        if layer >= art.num_layers:
            raise ArtifactError(f"tensor {name}: layer {layer} out of range (num_layers={art.num_layers})")
        if t.dtype not in _DTYPES:
            raise ArtifactError(f"tensor {name}: dtype {t.dtype} not allowed (float32, float16, bfloat16)")
        if art.kind in ("red", "add") and tuple(t.shape) != (d,):
            raise ArtifactError(f"tensor {name}: shape {list(t.shape)} but expected [{d}] (hidden_size)")
        if art.kind == "lora" and t.dim() != 2:
            raise ArtifactError(f"tensor {name}: lora tensors must be 2-D, got shape {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"tensor {name}: contains NaN or Inf values")
    if art.kind == "red":
        for layer in art.layers:
            for part in ("scale", "bias"):
                if f"layers.{layer}.{part}" not in art.tensors:
                    raise ArtifactError(f"red artifact: layer {layer} has no {part}")
    if art.kind == "lora":
        if art.lora_alpha is None or not (art.lora_alpha == art.lora_alpha) or art.lora_alpha <= 0:
            raise ArtifactError("lora artifact needs a positive lora_alpha in its metadata")
        for layer in art.layers:
            prefix = f"layers.{layer}."
            mods = {n[len(prefix) :].rsplit(".", 1)[0] for n in art.tensors if n.startswith(prefix)}
            for mod in mods:
                a, b = art.tensors.get(f"{prefix}{mod}.lora_A"), art.tensors.get(f"{prefix}{mod}.lora_B")
                if a is None or b is None:
                    raise ArtifactError(f"lora {prefix}{mod}: needs both lora_A and lora_B")
                if a.shape[0] != b.shape[1]:
                    raise ArtifactError(
                        f"lora {prefix}{mod}: rank mismatch, lora_A {list(a.shape)} vs lora_B {list(b.shape)}"
                    )


def _sniff_container(data: bytes) -> None:
    """Reject anything but a safetensors container, naming what it looks like instead."""
    if data[:1] == b"\x80" and data[8:9] != b"{":  # 0x80 may also be the low byte of a header length
        raise ArtifactError("file is a Python pickle, not safetensors; pickles are never loaded")
    if data[:4] == b"PK\x03\x04":
        raise ArtifactError("file is a zip archive (e.g. torch.save output), not safetensors")
    if data[:4] == b"GGUF":
        raise ArtifactError("file is GGUF; import control vectors with the GGUF importer")
    if len(data) < 10:
        raise ArtifactError("file is truncated: too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER_BYTES:
        raise ArtifactError(f"safetensors header of {n} bytes exceeds the {_MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(data):
        raise ArtifactError("file is truncated: the safetensors header runs past the end")
    if data[8:9] != b"{":
        raise ArtifactError("file is not safetensors: no JSON header")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ArtifactError("safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise ArtifactError(f"safetensors header: tensor {name!r} has no valid data_offsets")
        end = max(end, offs[1])
    if 8 + n + end > len(data):
        raise ArtifactError("file is truncated: tensor data runs past the end of the file")


def parse_artifact(data: bytes, *, max_bytes: int = MAX_ARTIFACT_BYTES) -> Artifact:
    """Parse and validate safetensors bytes into an :class:`Artifact` (raises :class:`ArtifactError`)."""
    if len(data) > max_bytes:
        raise ArtifactError(f"artifact of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    _sniff_container(data)
    try:
        tensors = st_load(data)
    except Exception as e:  # the safetensors library raises its own error types
        raise ArtifactError(f"invalid safetensors file: {e}") from None
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError("__metadata__ must map strings to strings")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("kind", "model_type", "hidden_size", "num_layers", "method"):
        if key not in meta:
            raise ArtifactError(f"metadata is missing {key!r}")
    try:
        hidden, layers = int(meta["hidden_size"]), int(meta["num_layers"])
        alpha = float(meta["lora_alpha"]) if "lora_alpha" in meta else None
    except ValueError:
        raise ArtifactError("metadata hidden_size/num_layers/lora_alpha are not numbers") from None
    if layers > 100_000 or hidden > 1_000_000:
        raise ArtifactError(f"metadata num_layers={layers} / hidden_size={hidden} out of range")
    fixed = {"format", "kind", "model_type", "hidden_size", "num_layers", "method", "lora_alpha"}
    return Artifact(
        kind=meta["kind"],
        tensors=tensors,
        hidden_size=hidden,
        num_layers=layers,
        model_type=meta["model_type"],
        method=meta["method"],
        lora_alpha=alpha,
        extra={k: v for k, v in meta.items() if k not in fixed},
        sha256=hashlib.sha256(data).hexdigest(),
    )


def load_artifact(path: str | os.PathLike[str], *, max_bytes: int = MAX_ARTIFACT_BYTES) -> Artifact:
    """Read and validate an artifact file; its size is checked before anything is parsed."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ArtifactError(f"{p.name}: {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        return parse_artifact(p.read_bytes(), max_bytes=max_bytes)
    except ArtifactError as e:
        raise type(e)(f"{p.name}: {e}") from None


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half.

    Temp file in the same directory, fsync, rename, fsync of the directory.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_artifact(artifact: Artifact, path: str | os.PathLike[str]) -> str:
    """Atomically write ``artifact`` as safetensors; returns its sha256 version."""
    atomic_write_bytes(path, artifact.to_bytes())
    return artifact.sha256
