"""The vector store: registered steering artifacts (versions) and saved profiles of one served model.

Files live in the vector directory (:class:`~server.vector_dir.VectorDir`). The in-memory state caches it:
every read first compares the directory's change marker (one small file read) and reloads when another
process changed it, so a change made anywhere is seen by the next request; every change is a
read-modify-write under the directory's exclusive lock. Artifacts are loaded on first use into an LRU
cache by sha256 and never mutated, so requests that hold one are not disturbed by later changes.

Lifecycle (SPEC §9.2): saved profiles pin ``name@sha256``; what a saved profile uses is deleted only when
forced; a name keeps ``max_versions`` versions (oldest unpinned out first), the store ``max_vectors`` names.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from steering_vectors.arch import ModelLayout
from steering_vectors.artifact import (
    MAX_ARTIFACT_BYTES,
    Artifact,
    ArtifactError,
    IncompatibleArtifactError,
    parse_artifact,
)
from steering_vectors.profile import CompiledProfile, Profile, VectorRef, check_name, compile_profile

from .artifact_cache import ArtifactCache
from .errors import ArtifactTooLargeError, ConflictError, UnknownProfileError, UnknownVectorError
from .vector_dir import SavedProfile, VectorDir, VectorEntry, VectorInfo

__all__ = ["MAX_DESCRIPTION_CHARS", "SavedProfile", "VectorInfo", "VectorStore"]

log = logging.getLogger(__name__)

_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_DESCRIPTION_CHARS = 4096


def _short(model: str) -> str:
    """A model name compared across spellings: the last path component, lower case."""
    return model.rstrip("/").rsplit("/", 1)[-1].lower()


def _check_description(description: str | None) -> None:
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
    ):
        raise ValueError(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")


class VectorStore:
    """Registered steering vectors and saved profiles of one served model, persisted under ``root``.

    ``layout`` describes the served model: artifacts that do not fit it (hidden size, layers, LoRA targets)
    are :class:`IncompatibleArtifactError`, and so are those whose ``model_type`` or ``base_model`` names
    another model, unless ``model_names`` (the names ``base_model`` may carry) is None. ``max_bytes`` caps
    an upload, ``cache_bytes`` the artifact cache; ``reserved_names`` may not name a profile; ``folded`` is
    the profile folded into the served model. Thread- and process-safe; one artifact is parsed at a time.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        layout: ModelLayout,
        *,
        max_bytes: int = MAX_ARTIFACT_BYTES,
        cache_bytes: int = 1 << 30,
        max_vectors: int = 1000,
        max_versions: int = 20,
        model_names: Sequence[str] | None = None,
        reserved_names: Sequence[str] = (),
    ) -> None:
        self.dir = VectorDir(root)
        self.layout = layout
        self.max_bytes = int(max_bytes)
        self.max_vectors, self.max_versions = int(max_vectors), int(max_versions)
        self.model_names = None if model_names is None else {_short(n) for n in model_names}
        self.reserved_names = frozenset(reserved_names)
        self.folded: str | None = None
        self._linear_shapes = layout.linear_shapes()
        self._lock = threading.RLock()  # in-memory state: _entries, _profiles, _cache
        self._write_lock = threading.Lock()  # one change at a time in this process (flock: across them)
        self._parse_lock = threading.Lock()  # one artifact parsed at a time
        self._cache = ArtifactCache(cache_bytes)
        self._entries: dict[str, VectorEntry] = {}
        self._profiles: dict[str, SavedProfile] = {}
        self._generation: bytes | None = None
        with self._write_lock, self.dir.lock():
            self.dir.remove_leftovers()
            self._load_state()

    # ------------------------------------------------------------------ sharing the directory

    def refresh(self) -> None:
        """Reload the indexes and profiles if another process changed the directory since we read it."""
        if self.dir.generation() == self._generation:
            return
        with self.dir.lock(shared=True):
            self._load_state()

    def _load_state(self) -> None:
        """Read the indexes and profiles (the caller holds the directory lock)."""
        generation = self.dir.generation()
        entries, profiles = self.dir.read_entries(), self.dir.read_profiles()
        with self._lock:
            self._entries, self._profiles, self._generation = entries, profiles, generation

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """A change: exclusive in this process and across processes, against the latest state on disk."""
        with self._write_lock, self.dir.lock():
            if self.dir.generation() != self._generation:
                self._load_state()
            try:
                yield
            except BaseException:
                self._generation = None  # reread on the next access: the change may be partly on disk
                raise
            self._generation = self.dir.bump_generation()

    # ------------------------------------------------------------------ vectors

    def _check_fits(self, art: Artifact) -> None:
        art.check_compatible(
            hidden_size=self.layout.hidden_size,
            num_layers=self.layout.num_layers,
            linear_shapes=self._linear_shapes,
        )
        if self.model_names is None:
            return
        hint = " (--allow-model-mismatch accepts it)"
        if art.model_type != self.layout.model_type:
            raise IncompatibleArtifactError(
                f"artifact model_type {art.model_type!r} is not the served model's "
                f"{self.layout.model_type!r}{hint}"
            )
        base = art.extra.get("base_model")
        if base and _short(base) not in self.model_names:
            raise IncompatibleArtifactError(
                f"artifact base_model {base!r} is not the served model "
                f"({', '.join(sorted(self.model_names))}){hint}"
            )

    def add(
        self, name: str, data: bytes, *, filename: str = "", description: str | None = None
    ) -> VectorInfo:
        """Register ``data`` (safetensors bytes, or a llama.cpp control-vector GGUF) as the new current
        version of ``name``; returns its info.

        Checks, in order: the name (``ValueError``), the size (:class:`ArtifactTooLargeError`, before any
        parsing), the format (:class:`ArtifactError`; a ``.gguf`` file name or the GGUF magic selects the
        GGUF importer), the fit to the served model (``IncompatibleArtifactError``), then the store's
        bounds (:class:`ConflictError`: ``max_vectors`` names, ``max_versions`` versions of which the
        oldest unpinned ones are removed). A GGUF upload is stored as its converted ``add`` artifact.
        """
        check_name(name)
        if len(data) > self.max_bytes:
            raise ArtifactTooLargeError(
                f"upload of {len(data)} bytes exceeds the {self.max_bytes}-byte limit for vectors"
            )
        _check_description(description)
        with self._parse_lock:
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
        with self._changing():
            old = self._entries.get(name)
            if old is None and len(self._entries) >= self.max_vectors:
                raise ConflictError(
                    f"the store holds {len(self._entries)} vectors, its limit (--max-vectors); "
                    "delete one first"
                )
            versions = [v for v in (old.versions if old else []) if v.sha256 != art.sha256] + [version]
            evicted = self._evict(name, versions)
            entry = VectorEntry(name, [v for v in versions if v not in evicted])
            self.dir.write_version(entry, data)
            for v in evicted:
                self.dir.remove_version_file(name, v.sha256)
            with self._lock:
                self._entries[name] = entry
                self._cache.put(art)
        log.info("vector %s: stored version %s (%s, layers %s)", name, art.sha256[:12], art.kind, art.layers)
        return entry.info()

    def _evict(self, name: str, versions: list[VectorInfo]) -> list[VectorInfo]:
        """The oldest versions beyond ``max_versions`` that no profile pins (:class:`ConflictError` if
        too many are pinned). The newest version is never evicted."""
        excess = len(versions) - self.max_versions
        if excess <= 0:
            return []
        pinned = set().union(*self._users(name).values())
        candidates = [v for v in versions[:-1] if v.sha256 not in pinned]
        if len(candidates) < excess:
            raise ConflictError(
                f"vector {name!r} keeps at most {self.max_versions} versions (--max-versions) and saved "
                "profiles pin the older ones; delete a version or a profile first"
            )
        return candidates[:excess]

    def _import_gguf(self, data: bytes, filename: str) -> bytes:
        """Convert control-vector GGUF bytes to the safetensors bytes of an ``add`` artifact."""
        from steering_vectors.gguf_io import import_gguf_bytes  # imported only when a GGUF arrives

        art = import_gguf_bytes(
            data,
            _SAFE_FILENAME.sub("_", Path(filename).name)[:64].lstrip(".") or "upload.gguf",
            hidden_size=self.layout.hidden_size,
            num_layers=self.layout.num_layers,
            model_type=self.layout.model_type,
            max_bytes=self.max_bytes,
        )
        return art.to_bytes()

    def get(self, name: str) -> VectorInfo:
        """Info of vector ``name``; :class:`UnknownVectorError` if there is none."""
        self.refresh()
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownVectorError(f"unknown vector {name!r}")
            return entry.info()

    def list(self) -> list[VectorInfo]:
        """Every registered vector, sorted by name."""
        return self.page()[0]

    def page(self, *, limit: int | None = None, after: str | None = None) -> tuple[list[VectorInfo], bool]:
        """Vectors sorted by name: at most ``limit``, those named after ``after``; and whether more follow."""
        self.refresh()
        with self._lock:
            names = [n for n in sorted(self._entries) if after is None or n > after]
            page = names if limit is None else names[:limit]
            return [self._entries[n].info() for n in page], len(page) < len(names)

    def names(self) -> list[str]:
        """Names of every registered vector, sorted."""
        self.refresh()
        with self._lock:
            return sorted(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self.refresh()
        with self._lock:
            return name in self._entries

    def delete(self, name: str, *, force: bool = False) -> list[str]:
        """Remove vector ``name`` with all its versions, or one version (``name@<sha256 prefix>``);
        returns the sha256 of every version removed.

        :class:`UnknownVectorError` for an unknown name or version; :class:`ConflictError` naming the
        saved profiles that use it, unless ``force`` (those profiles then fail with 404 until a version
        they pin exists again). Removing the current version makes the previous one current; removing
        the last one removes the name. Artifacts already handed out stay valid.
        """
        ref = VectorRef(name=name)
        base = ref.base_name
        with self._changing():
            entry = self._entries.get(base)
            if entry is None:
                raise UnknownVectorError(f"unknown vector {base!r}")
            gone = [entry.match(ref.pin)] if ref.pin else entry.shas()
            users = sorted(p for p, shas in self._users(base).items() if shas & set(gone))
            if users and not force:
                raise ConflictError(
                    f"vector {name!r} is used by saved profiles {', '.join(users)}; change or delete them "
                    "first, or delete with ?force=true"
                )
            kept = [v for v in entry.versions if v.sha256 not in gone]
            if kept:
                self.dir.write_index(VectorEntry(base, kept))
                for sha in gone:
                    self.dir.remove_version_file(base, sha)
            else:
                self.dir.remove_vector(base)
            with self._lock:
                if kept:
                    self._entries[base] = VectorEntry(base, kept)
                else:
                    self._entries.pop(base)
                still_used = {sha for e in self._entries.values() for sha in e.shas()}
                for sha in gone:
                    if sha not in still_used:
                        self._cache.pop(sha)
        log.info("vector %s: deleted %d version(s)%s", name, len(gone), " (forced)" if users else "")
        return gone

    def _users(self, name: str) -> dict[str, set[str]]:
        """The saved profiles that use vector ``name``, each with the versions it uses."""
        entry = self._entries.get(name)
        shas = entry.shas() if entry else []
        users: dict[str, set[str]] = {}
        for pname, saved in self._profiles.items():
            for ref in saved.profile.vectors:
                if ref.base_name != name:
                    continue
                if ref.pin is None:
                    used = set(shas[-1:])
                else:
                    used = {s for s in shas if s.startswith(ref.pin)}
                users.setdefault(pname, set()).update(used)
        return users

    def resolve(self, ref: VectorRef | str) -> Artifact:
        """The artifact a reference names: the current version, or the version whose sha256 starts with
        the pin (``name@<hex prefix>``).

        :class:`UnknownVectorError` for an unknown name or pin, ``ValueError`` for a pin that matches more
        than one version, ``IncompatibleArtifactError`` for a stored vector that no longer fits the
        served model. The returned ``Artifact`` is shared and must not be mutated.
        """
        self.refresh()
        return self._resolve(VectorRef(name=ref) if isinstance(ref, str) else ref)

    def _resolve(self, ref: VectorRef) -> Artifact:
        name = ref.base_name
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownVectorError(f"unknown vector {name!r}")
            sha = entry.current.sha256 if ref.pin is None else entry.match(ref.pin)
            art = self._cache.get(sha)
            if art is not None:
                return art
        art = self._load(name, sha)  # outside the lock: files are immutable, so a racing load is harmless
        with self._lock:
            cached = self._cache.get(sha)
            if cached is not None:
                return cached
            self._cache.put(art)
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

    # ------------------------------------------------------------------ profiles

    def put_profile(self, name: str, profile: Profile, description: str | None = None) -> SavedProfile:
        """Save (or replace) profile ``name`` with every entry pinned to the version it resolves to now
        (``name@sha256``); returns what was saved.

        Raises ``ValueError`` for a bad name or an ambiguous pin, :class:`ConflictError` for the served
        model's name or the folded profile, :class:`UnknownVectorError` for an unknown vector or version,
        ``IncompatibleArtifactError`` for a vector that does not fit.
        """
        check_name(name)
        if name in self.reserved_names:
            raise ConflictError(f"profile name {name!r} is the served model's id; choose another name")
        if name == self.folded:
            raise ConflictError(f"profile {name!r} is folded into the served model; restart to change it")
        _check_description(description)
        with self._changing():
            pinned = [
                replace(ref, name=f"{ref.base_name}@{self._resolve(ref).sha256}") for ref in profile.vectors
            ]
            saved = SavedProfile(Profile(tuple(pinned)), description)
            self._compile(saved.profile)  # every vector must fit the model now
            self.dir.write_profile(name, saved)
            with self._lock:
                self._profiles[name] = saved
        log.info("profile %s: saved (%d vectors)", name, len(profile.vectors))
        return saved

    def get_profile(self, name: str) -> Profile:
        """Saved profile ``name``; :class:`UnknownProfileError` if there is none."""
        return self.saved_profile(name).profile

    def saved_profile(self, name: str) -> SavedProfile:
        """Saved profile ``name`` with its description; :class:`UnknownProfileError` if there is none."""
        self.refresh()
        with self._lock:
            saved = self._profiles.get(name)
        if saved is None:
            raise UnknownProfileError(f"unknown profile {name!r}")
        return saved

    def has_profile(self, name: str) -> bool:
        """Whether a profile called ``name`` is saved."""
        self.refresh()
        with self._lock:
            return name in self._profiles

    def list_profiles(self) -> dict[str, SavedProfile]:
        """Every saved profile by name, sorted by name."""
        self.refresh()
        with self._lock:
            return {n: self._profiles[n] for n in sorted(self._profiles)}

    def delete_profile(self, name: str) -> None:
        """Remove saved profile ``name``; :class:`UnknownProfileError` if there is none."""
        check_name(name)
        if name == self.folded:
            raise ConflictError(f"profile {name!r} is folded into the served model; restart to remove it")
        with self._changing():
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
        self.refresh()
        return self._compile(profile)

    def _compile(self, profile: Profile) -> CompiledProfile:
        entries = [(ref, self._resolve(ref)) for ref in profile.vectors]
        return compile_profile(
            entries, num_layers=self.layout.num_layers, hidden_size=self.layout.hidden_size
        )
