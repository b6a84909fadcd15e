"""Steering profiles (SPEC §5): strength semantics, in-order composition, compilation per site.

A profile is a list of vector references. Compiling it against the resolved artifacts yields, per
decoder layer, one affine edit per site and position class, plus the stacked LoRA deltas:

- site ``ffn`` (FFN output):  ``h -> S*h + B``   (all ``red`` entries, composed in list order)
- site ``resid`` (layer out): ``h -> h + B``     (all ``add`` entries, summed)
- LoRA on linear (l, m):      ``y -> y + (B' (A x)) * mask``  (all ``lora`` entries, stacked by rank)

Strength w:  red ``s' = 1 + w(s-1), b' = w b``;  add ``w v``;  lora ``w * alpha / r``.
Composition of affine maps f2(f1(h)) with f_i(h) = s_i h + b_i:  ``S = s2 s1``, ``B = s2 b1 + b2``.
Position classes: index 0 = prompt tokens, 1 = generated tokens (a token is "generated" when the model
sampled it; during decoding every new input token is generated).

Bounds (SPEC §9.1): |strength| <= 100, a vector at most once per profile, a LoRA artifact's rank at most
``max_lora_rank`` (default 64) and the ranks of a profile's LoRA entries summed at most
``max_profile_rank`` (default 128). Compiling is thread-safe and shared: while a compiled profile is
alive, compiling the same composition (same fingerprint) returns that object instead of a new copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .artifact import Artifact

__all__ = [
    "MAX_LORA_RANK",
    "MAX_PROFILE_RANK",
    "MAX_STRENGTH",
    "MAX_VECTORS",
    "POSITIONS",
    "CompiledProfile",
    "Profile",
    "VectorRef",
    "check_lora_ranks",
    "check_name",
    "compile_profile",
    "fingerprint",
]

POSITIONS = ("all", "prompt", "generated")
MAX_VECTORS = 16
MAX_STRENGTH = 100.0
MAX_LORA_RANK = 64
MAX_PROFILE_RANK = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_PIN_RE = re.compile(r"[0-9a-f]{4,64}")


def check_name(name: str) -> str:
    """Validate a vector or profile name: 1-64 characters of ``[A-Za-z0-9_.-]``, starting alphanumeric."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-64 characters A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VectorRef:
    """One entry of a profile: a registered vector (optionally pinned ``name@sha-prefix``) and its use."""

    name: str
    strength: float = 1.0
    layers: tuple[int, ...] | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        base, _, pin = self.name.partition("@")
        check_name(base)
        if "@" in self.name and not _PIN_RE.fullmatch(pin):
            raise ValueError(f"invalid version pin in {self.name!r}: expected @<4-64 lowercase hex digits>")
        if (
            isinstance(self.strength, bool)
            or not isinstance(self.strength, (int, float))
            or not math.isfinite(self.strength)
        ):
            raise ValueError(f"strength of {self.name!r} must be a finite number")
        if abs(self.strength) > MAX_STRENGTH:
            raise ValueError(
                f"strength of {self.name!r} must be within ±{MAX_STRENGTH:g}, got {self.strength}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions of {self.name!r} must be one of {', '.join(POSITIONS)}")
        if self.layers is not None:
            if not self.layers:
                raise ValueError(
                    f"layers of {self.name!r} is empty: omit it to steer every layer of the vector"
                )
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
                raise ValueError(f"layers of {self.name!r} must be non-negative integers")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    @property
    def base_name(self) -> str:
        return self.name.partition("@")[0]

    @property
    def pin(self) -> str | None:
        """The sha256 prefix this entry is pinned to, if any."""
        return self.name.partition("@")[2] or None


@dataclass(frozen=True)
class Profile:
    """An ordered composition of vector references."""

    vectors: tuple[VectorRef, ...] = ()

    def __post_init__(self) -> None:
        if len(self.vectors) > MAX_VECTORS:
            raise ValueError(f"a profile may hold at most {MAX_VECTORS} vectors, got {len(self.vectors)}")
        _check_once([r.name for r in self.vectors])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Build from ``{"vectors": [{"name", "strength"?, "layers"?, "positions"?}, ...]}``."""
        vectors = data.get("vectors", [])
        if not isinstance(vectors, list):
            raise ValueError("'vectors' must be a list")
        refs = []
        for v in vectors:
            if not isinstance(v, Mapping) or "name" not in v:
                raise ValueError("each vector entry must be an object with a 'name'")
            layers = v.get("layers")
            refs.append(
                VectorRef(
                    name=v["name"],
                    strength=v.get("strength", 1.0),
                    layers=tuple(layers) if layers is not None else None,
                    positions=v.get("positions", "all"),
                )
            )
        return cls(tuple(refs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "vectors": [
                {
                    "name": r.name,
                    "strength": r.strength,
                    "positions": r.positions,
                    **({"layers": list(r.layers)} if r.layers is not None else {}),
                }
                for r in self.vectors
            ]
        }


@dataclass
class CompiledProfile:
    """A profile resolved against artifacts and compiled into per-site tensors (float32, CPU).

    ``affine[(site, layer)] = (scale [2, d], bias [2, d])`` with row 0 for prompt tokens and row 1 for
    generated ones (``scale`` is all ones at site ``resid``). ``lora[(layer, module)] = (A [R, d_in],
    B [d_out, R], mask [2, R])`` with strength and alpha/r folded into B.
    """

    fingerprint: str
    resolved: list[dict[str, Any]]
    affine: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return not self.affine and not self.lora

    @property
    def lora_rank(self) -> int:
        """The largest stacked LoRA rank at any site (0 without LoRA)."""
        return max((a.shape[0] for a, _, _ in self.lora.values()), default=0)

    @property
    def position_dependent(self) -> bool:
        """True when prompt and generated tokens get different edits."""
        return any(
            not torch.equal(s[0], s[1]) or not torch.equal(b[0], b[1]) for s, b in self.affine.values()
        ) or any(not torch.equal(m[0], m[1]) for _, _, m in self.lora.values())


def _check_once(names: Sequence[str]) -> None:
    """A vector (a name at one version) appears at most once; two versions of a name are two vectors."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"vector {name!r} appears more than once in the profile")
        seen.add(name)


def check_lora_ranks(
    entries: Sequence[tuple[VectorRef, Artifact]],
    *,
    max_lora_rank: int = MAX_LORA_RANK,
    max_profile_rank: int = MAX_PROFILE_RANK,
) -> int:
    """Check the LoRA bounds of resolved entries; returns the summed rank of their LoRA entries."""
    total = 0
    for ref, art in entries:
        if art.kind != "lora":
            continue
        rank = art.lora_rank
        if rank > max_lora_rank:
            raise ValueError(f"{ref.name}: LoRA rank {rank} exceeds max_lora_rank {max_lora_rank}")
        total += rank
    if total > max_profile_rank:
        raise ValueError(
            f"the profile's LoRA ranks sum to {total}, more than max_profile_rank {max_profile_rank}"
        )
    return total


def _classes(positions: str) -> list[int]:
    return {"all": [0, 1], "prompt": [0], "generated": [1]}[positions]


def fingerprint(resolved: Sequence[Mapping[str, Any]]) -> str:
    """Hash of the resolved composition (names, versions, strengths, layers, positions)."""
    blob = json.dumps(list(resolved), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SHARED: weakref.WeakValueDictionary[tuple[str, int, int], CompiledProfile] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def compile_profile(
    entries: Sequence[tuple[VectorRef, Artifact]],
    *,
    num_layers: int,
    hidden_size: int,
    max_lora_rank: int = MAX_LORA_RANK,
    max_profile_rank: int = MAX_PROFILE_RANK,
) -> CompiledProfile:
    """Compile resolved entries (in list order) into per-site edits; strength 0 entries vanish exactly.

    Thread-safe (callers may compile off their event loop); a composition that is already compiled
    and alive is returned as that same object.
    """
    if len(entries) > MAX_VECTORS:
        raise ValueError(f"a profile may hold at most {MAX_VECTORS} vectors, got {len(entries)}")
    _check_once([f"{ref.base_name}@{art.sha256}" for ref, art in entries])
    check_lora_ranks(entries, max_lora_rank=max_lora_rank, max_profile_rank=max_profile_rank)
    resolved = [
        {
            "name": ref.base_name,
            "sha256": art.sha256,
            "strength": float(ref.strength),
            "layers": list(ref.layers) if ref.layers is not None else None,
            "positions": ref.positions,
        }
        for ref, art in entries
    ]
    key = (fingerprint(resolved), num_layers, hidden_size)
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
    if shared is not None:
        return shared
    out = _compile(entries, resolved, key[0], num_layers=num_layers, hidden_size=hidden_size)
    with _SHARED_LOCK:
        return _SHARED.setdefault(key, out)


def _compile(
    entries: Sequence[tuple[VectorRef, Artifact]],
    resolved: list[dict[str, Any]],
    fp: str,
    *,
    num_layers: int,
    hidden_size: int,
) -> CompiledProfile:
    out = CompiledProfile(fingerprint=fp, resolved=resolved)
    d = hidden_size
    lora_parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, list[int]]]] = {}
    for ref, art in entries:
        art.check_compatible(hidden_size=hidden_size, num_layers=num_layers)
        if ref.layers is not None and ref.layers and ref.layers[-1] >= num_layers:
            raise ValueError(f"{ref.name}: layer {ref.layers[-1]} out of range (model has {num_layers})")
        missing = sorted(set(ref.layers or ()) - set(art.layers))
        if missing:
            raise ValueError(f"{ref.name}: layers {missing} are not among the vector's layers {art.layers}")
        w = float(ref.strength)
        if w == 0.0:
            continue
        layers = [x for x in art.layers if ref.layers is None or x in ref.layers]
        cls = _classes(ref.positions)
        for layer in layers:
            if art.kind == "lora":
                for module, (a, b) in art.lora_modules(layer).items():
                    c = w * float(art.lora_alpha or 0.0) / a.shape[0]
                    lora_parts.setdefault((layer, module), []).append((a.float(), b.float() * c, cls))
                continue
            site = "ffn" if art.kind == "red" else "resid"
            scale, bias = out.affine.get((site, layer)) or (torch.ones(2, d), torch.zeros(2, d))
            if art.kind == "red":
                s, b = (t.float() for t in art.red(layer))
                s_w = s if w == 1.0 else 1.0 + w * (s - 1.0)
                b_w = b if w == 1.0 else w * b
                for c in cls:  # f(h) = s_w * (S h + B) + b_w
                    scale[c] = s_w * scale[c]
                    bias[c] = s_w * bias[c] + b_w
            else:
                v = art.direction(layer).float()
                v_w = v if w == 1.0 else w * v
                for c in cls:
                    bias[c] = bias[c] + v_w
            out.affine[(site, layer)] = (scale, bias)
    for key, parts in lora_parts.items():
        a = torch.cat([p[0] for p in parts], dim=0)  # [R, d_in]
        b = torch.cat([p[1] for p in parts], dim=1)  # [d_out, R]
        mask = torch.zeros(2, a.shape[0])
        start = 0
        for pa, _, cls in parts:
            mask[cls, start : start + pa.shape[0]] = 1.0
            start += pa.shape[0]
        out.lora[key] = (a, b, mask)
    return out
