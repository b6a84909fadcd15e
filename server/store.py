"""The vector store: registered steering artifacts (every version) and saved profiles of one served model.

Files live in the vector directory (:class:`~server.vector_dir.VectorDir`: layout and crash safety).
Only the indexes are read when the store opens; artifacts are loaded on first use and kept in an
in-memory LRU cache keyed by sha256. Artifacts are never mutated and old versions stay on disk, so an
upload that replaces a name does not disturb requests that already hold the previous ``Artifact``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from steering_vectors.arch import ModelLayout
from steering_vectors.artifact import MAX_ARTIFACT_BYTES, Artifact, ArtifactError, parse_artifact
from steering_vectors.profile import CompiledProfile, Profile, VectorRef, check_name, compile_profile

from .errors import ArtifactTooLargeError, UnknownProfileError, UnknownVectorError
from .vector_dir import VectorDir, VectorEntry, VectorInfo

__all__ = ["MAX_DESCRIPTION_CHARS", "VectorInfo", "VectorStore"]

log = logging.getLogger(__name__)

_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_DESCRIPTION_CHARS = 4096


def _artifact_nbytes(art: Artifact) -> int:
    return sum(t.numel() * t.element_size() for t in art.tensors.values())


class VectorStore:
    """Registered steering vectors and saved profiles of one served model, persisted under ``root``.

    ``layout`` describes the served model (hidden size, layer count, model type, the linears a ``lora``
    may target): uploads that do not fit it are rejected with
    :class:`~steering_vectors.artifact.IncompatibleArtifactError`. ``max_bytes`` caps an upload's size;
    ``cache_bytes`` bounds the tensor bytes of the loaded-artifact cache (the most recently used artifact
    is always kept).

    All methods are thread-safe. Mutations (add, delete, profiles) are serialised by one lock; lookups
    only take a short lock on the in-memory state and never wait for a slow upload to finish writing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        layout: ModelLayout,
        *,
        max_bytes: int = MAX_ARTIFACT_BYTES,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.dir = VectorDir(root)
        self.layout = layout
        self.max_bytes = int(max_bytes)
        self.cache_bytes = int(cache_bytes)
        self._linear_shapes = layout.linear_shapes()
        self._lock = threading.RLock()  # in-memory state: _entries, _profiles, _cache
        self._write_lock = threading.RLock()  # serialises mutations of the files on disk
        self._cache: OrderedDict[str, Artifact] = OrderedDict()
        self._cache_size = 0
        self.dir.remove_leftovers()
        self._entries: dict[str, VectorEntry] = self.dir.read_entries()
        self._profiles: dict[str, Profile] = self.dir.read_profiles()

    def _check_fits(self, art: Artifact) -> None:
        art.check_compatible(
            hidden_size=self.layout.hidden_size,
            num_layers=self.layout.num_layers,
            linear_shapes=self._linear_shapes,
        )

    # ------------------------------------------------------------------ vectors

    def add(
        self, name: str, data: bytes, *, filename: str = "", description: str | None = None
    ) -> VectorInfo:
        """Register ``data`` (safetensors bytes, or a llama.cpp control-vector GGUF) as the new current
        version of ``name``; returns its info.

        Checks, in order: the name (``ValueError``), the size (:class:`ArtifactTooLargeError`, before any
        parsing), the format (:class:`ArtifactError`; a ``.gguf`` file name or the GGUF magic selects the
        GGUF importer), the fit to the served model (``IncompatibleArtifactError``). The stored bytes are
        safetensors: a GGUF upload is stored as its converted ``add`` artifact. Earlier versions stay
        reachable through ``name@<sha256 prefix>``.
        """
        check_name(name)
        if len(data) > self.max_bytes:
            raise ArtifactTooLargeError(
                f"upload of {len(data)} bytes exceeds the {self.max_bytes}-byte limit for vectors"
            )
        if description is not None:
            if not isinstance(description, str):
                raise ValueError("description must be a string")
            if len(description) > MAX_DESCRIPTION_CHARS:
                raise ValueError(f"description is longer than {MAX_DESCRIPTION_CHARS} characters")
        if data[:4] == b"GGUF" or filename.lower().endswith(".gguf"):
            data = self._import_gguf(data, filename)
        art = parse_artifact(data, max_bytes=self.max_bytes)
        self._check_fits(art)
        version = VectorInfo(
            name=name,
            sha256=art.sha256,
            kind=art.kind,
            layers=art.layers,
            method=art.method,
            description=art.extra.get("description") if description is None else description,
            created=int(time.time()),
            model_type=art.model_type,
            hidden_size=art.hidden_size,
            num_layers=art.num_layers,
        )
        with self._write_lock:
            with self._lock:
                old = self._entries.get(name)
                versions = [v for v in (old.versions if old else []) if v.sha256 != art.sha256]
            entry = VectorEntry(name, [*versions, version])
            self.dir.write_version(entry, data)
            with self._lock:
                self._entries[name] = entry
                self._cache_put(art)
        log.info("vector %s: stored version %s (%s, layers %s)", name, art.sha256[:12], art.kind, art.layers)
        return entry.info()

    def _import_gguf(self, data: bytes, filename: str) -> bytes:
        """Convert control-vector GGUF bytes to the safetensors bytes of an ``add`` artifact."""
        try:
            from steering_vectors.gguf_io import import_gguf  # imported only when a GGUF arrives
        except ImportError as e:
            raise ArtifactError(f"GGUF control vectors cannot be imported here: {e}") from None

        base = _SAFE_FILENAME.sub("_", Path(filename).name)[:64].lstrip(".") or "upload.gguf"
        tmpdir = self.dir.temp_dir()
        try:
            src = tmpdir / base
            src.write_bytes(data)
            art = import_gguf(
                src,
                hidden_size=self.layout.hidden_size,
                num_layers=self.layout.num_layers,
                model_type=self.layout.model_type,
                max_bytes=self.max_bytes,
            )
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return art.to_bytes()

    def get(self, name: str) -> VectorInfo:
        """Info of vector ``name``; :class:`UnknownVectorError` if there is none."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownVectorError(f"unknown vector {name!r}")
            return entry.info()

    def list(self) -> list[VectorInfo]:
        """Every registered vector, sorted by name."""
        with self._lock:
            return [self._entries[n].info() for n in sorted(self._entries)]

    def names(self) -> list[str]:
        """Names of every registered vector, sorted."""
        with self._lock:
            return sorted(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def delete(self, name: str) -> None:
        """Remove vector ``name`` and all its versions; :class:`UnknownVectorError` if there is none.

        The folder is first renamed to a ``.*.tmp`` name (one atomic step: the vector is gone), then
        removed. Artifacts already handed out stay valid; saved profiles that name the vector keep their
        definition and fail to compile until a vector of that name is uploaded again.
        """
        check_name(name)
        with self._write_lock:
            with self._lock:
                if name not in self._entries:
                    raise UnknownVectorError(f"unknown vector {name!r}")
            self.dir.remove_vector(name)
            with self._lock:
                entry = self._entries.pop(name)
                still_used = {sha for e in self._entries.values() for sha in e.shas()}
                for sha in entry.shas():
                    if sha not in still_used:
                        self._cache_pop(sha)
        log.info("vector %s: deleted", name)

    def resolve(self, ref: VectorRef | str) -> Artifact:
        """The artifact a reference names: the current version, or the version whose sha256 starts with
        the pin (``name@<hex prefix>``).

        :class:`UnknownVectorError` for an unknown name or pin, ``ValueError`` for a pin that matches more
        than one version, ``IncompatibleArtifactError`` for a stored vector that no longer fits the
        served model (the vector directory was reused with another model). The returned ``Artifact`` is
        shared and must not be mutated.
        """
        if isinstance(ref, str):
            ref = VectorRef(name=ref)
        name, pin = ref.base_name, ref.pin
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownVectorError(f"unknown vector {name!r}")
            if pin is None:
                sha = entry.current.sha256
            else:
                matches = [sha for sha in entry.shas() if sha.startswith(pin)]
                if not matches:
                    raise UnknownVectorError(
                        f"vector {name!r} has no version whose sha256 starts with {pin!r}"
                    )
                if len(matches) > 1:
                    raise ValueError(
                        f"version pin {name}@{pin} is ambiguous: it matches {len(matches)} versions "
                        f"({', '.join(m[:12] for m in matches)}); use a longer prefix"
                    )
                sha = matches[0]
            art = self._cache.get(sha)
            if art is not None:
                self._cache.move_to_end(sha)
                return art
        art = self._load(name, sha)  # outside the lock: files are immutable, so a racing load is harmless
        with self._lock:
            cached = self._cache.get(sha)
            if cached is not None:
                return cached
            self._cache_put(art)
        return art

    def _load(self, name: str, sha: str) -> Artifact:
        try:
            data = self.dir.artifact_path(name, sha).read_bytes()
        except FileNotFoundError:
            raise UnknownVectorError(f"vector {name!r} (version {sha[:12]}) was deleted") from None
        art = parse_artifact(data, max_bytes=max(self.max_bytes, len(data)))
        if art.sha256 != sha:
            raise ArtifactError(f"stored vector {name!r} is corrupt: its file does not hash to {sha[:12]}")
        self._check_fits(art)
        return art

    def _cache_put(self, art: Artifact) -> None:
        if art.sha256 in self._cache:
            self._cache.move_to_end(art.sha256)
            return
        self._cache[art.sha256] = art
        self._cache_size += _artifact_nbytes(art)
        while self._cache_size > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_size -= _artifact_nbytes(old)

    def _cache_pop(self, sha: str) -> None:
        art = self._cache.pop(sha, None)
        if art is not None:
            self._cache_size -= _artifact_nbytes(art)

    # ------------------------------------------------------------------ profiles

    def put_profile(self, name: str, profile: Profile) -> None:
        """Save (or replace) profile ``name``. Every vector it references must resolve now.

        Raises ``ValueError`` for a bad name or an ambiguous pin, :class:`UnknownVectorError` for an
        unknown vector or version, ``IncompatibleArtifactError`` for a vector that does not fit.
        """
        check_name(name)
        for ref in profile.vectors:
            self.resolve(ref)
        with self._write_lock:
            self.dir.write_profile(name, profile)
            with self._lock:
                self._profiles[name] = profile
        log.info("profile %s: saved (%d vectors)", name, len(profile.vectors))

    def get_profile(self, name: str) -> Profile:
        """Saved profile ``name``; :class:`UnknownProfileError` if there is none."""
        with self._lock:
            profile = self._profiles.get(name)
        if profile is None:
            raise UnknownProfileError(f"unknown profile {name!r}")
        return profile

    def has_profile(self, name: str) -> bool:
        """Whether a profile called ``name`` is saved."""
        with self._lock:
            return name in self._profiles

    def list_profiles(self) -> dict[str, Profile]:
        """Every saved profile by name, sorted by name."""
        with self._lock:
            return {n: self._profiles[n] for n in sorted(self._profiles)}

    def delete_profile(self, name: str) -> None:
        """Remove saved profile ``name``; :class:`UnknownProfileError` if there is none."""
        check_name(name)
        with self._write_lock:
            with self._lock:
                if name not in self._profiles:
                    raise UnknownProfileError(f"unknown profile {name!r}")
            self.dir.remove_profile(name)
            with self._lock:
                self._profiles.pop(name, None)
        log.info("profile %s: deleted", name)

    # ------------------------------------------------------------------ compile

    def compile(self, profile: Profile) -> CompiledProfile:
        """Resolve every entry of ``profile`` (pins included) and compile it for the served model.

        Raises like :meth:`resolve`; the result carries the fingerprint and the resolved versions. The
        empty profile compiles to the identity.
        """
        entries = [(ref, self.resolve(ref)) for ref in profile.vectors]
        return compile_profile(
            entries, num_layers=self.layout.num_layers, hidden_size=self.layout.hidden_size
        )
