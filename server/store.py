"""The vector store: uploaded steering artifacts and saved profiles, persisted in the vector directory.

Layout on disk (``root`` is the ``--vector-dir``)::

    root/{name}/{sha256}.safetensors   every version of vector ``name``, content-addressed
    root/{name}/index.json             current version, description, created time, history of versions
    root/.profiles/{name}.json         saved profiles

Crash safety (SPEC §6: "a crash at any moment leaves no half-written vector visible"):

- every file is written with :func:`~steering_vectors.artifact.atomic_write_bytes` (temp file named
  ``.*.tmp`` in the same folder, fsync, rename, fsync of the folder);
- an upload writes the artifact file first and the index after it, so the index never names a file that
  is not complete. A crash in between leaves an unreferenced version file, which is never listed;
- a delete renames the vector's folder to ``root/.{name}.{random}.deleting.tmp`` before removing it;
- opening the store removes every leftover ``.*.tmp`` entry.

Only the indexes are read when the store opens; artifacts are loaded on first use and kept in an
in-memory LRU cache keyed by sha256. Artifacts are never mutated and old versions stay on disk, so an
upload that replaces a name does not disturb requests that already hold the previous ``Artifact``.

Names are validated with :func:`steering_vectors.profile.check_name` before they reach the filesystem, so
no path traversal, separator or control character can ever be part of a path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steering_vectors.artifact import (
    MAX_ARTIFACT_BYTES,
    Artifact,
    ArtifactError,
    atomic_write_bytes,
    fsync_dir,
    parse_artifact,
)
from steering_vectors.profile import CompiledProfile, Profile, VectorRef, check_name, compile_profile

__all__ = [
    "ArtifactTooLargeError",
    "UnknownProfileError",
    "UnknownVectorError",
    "VectorInfo",
    "VectorStore",
]

log = logging.getLogger(__name__)

_INDEX = "index.json"
_PROFILES = ".profiles"
_SUFFIX = ".safetensors"
_INDEX_FORMAT = "steerserve.index.v1"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE_FILENAME = re.compile(r"[^A-Za-z0-9_.\-]")
_NAME_FULL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MAX_DESCRIPTION_CHARS = 4096


class UnknownVectorError(KeyError):
    """No vector (or no version of it) by that name (HTTP 404)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "unknown vector"


class UnknownProfileError(KeyError):
    """No saved profile by that name (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown profile"


class ArtifactTooLargeError(ArtifactError):
    """The upload exceeds the size cap; raised before anything is parsed (HTTP 413)."""


@dataclass
class VectorInfo:
    """What the API reports about a registered vector: its current version and the history of versions.

    ``versions`` lists every stored sha256, oldest first; the last one is ``sha256``. ``created`` is the
    Unix time (seconds) at which the current version was uploaded.
    """

    name: str
    sha256: str
    kind: str
    layers: list[int]
    method: str
    description: str | None
    created: int
    model_type: str
    hidden_size: int
    num_layers: int
    versions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the body of ``GET /v1/vectors/{name}``)."""
        return asdict(self)


@dataclass
class _Version:
    """One stored version of a vector, as recorded in its ``index.json``."""

    sha256: str
    kind: str
    layers: list[int]
    method: str
    description: str | None
    created: int
    model_type: str
    hidden_size: int
    num_layers: int
    size: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Version:
        sha = d["sha256"]
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise ValueError(f"bad sha256 {sha!r}")
        desc = d.get("description")
        return cls(
            sha256=sha,
            kind=str(d["kind"]),
            layers=[int(x) for x in d["layers"]],
            method=str(d["method"]),
            description=str(desc) if desc is not None else None,
            created=int(d["created"]),
            model_type=str(d["model_type"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_layers"]),
            size=int(d.get("size", 0)),
        )


@dataclass
class _Entry:
    """In-memory index of one vector name: its versions, oldest first; the last one is current."""

    name: str
    versions: list[_Version]

    @property
    def current(self) -> _Version:
        return self.versions[-1]

    def info(self) -> VectorInfo:
        cur = self.current
        return VectorInfo(
            name=self.name,
            sha256=cur.sha256,
            kind=cur.kind,
            layers=list(cur.layers),
            method=cur.method,
            description=cur.description,
            created=cur.created,
            model_type=cur.model_type,
            hidden_size=cur.hidden_size,
            num_layers=cur.num_layers,
            versions=[v.sha256 for v in self.versions],
        )

    def to_json(self) -> bytes:
        cur = self.current
        doc = {
            "format": _INDEX_FORMAT,
            "name": self.name,
            "current": cur.sha256,
            "description": cur.description,
            "created": cur.created,
            "versions": [asdict(v) for v in self.versions],
        }
        return json.dumps(doc, indent=1).encode()


def _check_name(name: str) -> str:
    """``check_name``, made strict: its pattern ends in ``$``, which also matches before a final newline."""
    check_name(name)
    if not _NAME_FULL.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-64 characters A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


def _artifact_nbytes(art: Artifact) -> int:
    return sum(t.numel() * t.element_size() for t in art.tensors.values())


class VectorStore:
    """Registered steering vectors and saved profiles of one served model, persisted under ``root``.

    ``hidden_size``, ``num_layers``, ``model_type`` and ``linear_shapes`` (``ModelLayout.linear_shapes()``,
    used to check ``lora`` targets) describe the served model: uploads that do not fit it are rejected
    with :class:`~steering_vectors.artifact.IncompatibleArtifactError`. ``max_bytes`` caps an upload's
    size; ``cache_bytes`` bounds the tensor bytes of the loaded-artifact cache (the most recently used
    artifact is always kept).

    All methods are thread-safe. Mutations (add, delete, profiles) are serialised by one lock; lookups
    only take a short lock on the in-memory state and never wait for a slow upload to finish writing.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        hidden_size: int,
        num_layers: int,
        model_type: str,
        linear_shapes: dict[tuple[int, str], tuple[int, int]] | None = None,
        max_bytes: int = MAX_ARTIFACT_BYTES,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.root = Path(root)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.model_type = model_type
        self.linear_shapes = linear_shapes
        self.max_bytes = int(max_bytes)
        self.cache_bytes = int(cache_bytes)
        self._lock = threading.RLock()  # in-memory state: _entries, _profiles, _cache
        self._write_lock = threading.RLock()  # serialises mutations of the files on disk
        self._entries: dict[str, _Entry] = {}
        self._profiles: dict[str, Profile] = {}
        self._cache: OrderedDict[str, Artifact] = OrderedDict()
        self._cache_size = 0
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _PROFILES).mkdir(exist_ok=True)
        self._remove_leftovers()
        self._load_indexes()
        self._load_profiles()

    # ------------------------------------------------------------------ opening

    def _remove_leftovers(self) -> None:
        """Remove ``.*.tmp`` files and folders a crash may have left (half-written files, deletes)."""
        dirs = [self.root, self.root / _PROFILES]
        dirs += [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        for d in dirs:
            try:
                children = list(d.iterdir())
            except OSError:
                continue
            for p in children:
                if not (p.name.startswith(".") and p.name.endswith(".tmp")):
                    continue
                try:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    log.info("removed leftover temporary file %s", p)
                except OSError as e:
                    log.warning("could not remove leftover %s: %s", p, e)

    def _load_indexes(self) -> None:
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                _check_name(d.name)
            except ValueError:
                log.warning("ignoring %s: not a valid vector name", d)
                continue
            index = d / _INDEX
            if not index.is_file():
                continue  # a crash before the first index write: nothing was ever visible
            try:
                doc = json.loads(index.read_bytes())
                versions = [_Version.from_dict(v) for v in doc["versions"]]
                current = doc.get("current", versions[-1].sha256 if versions else None)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                log.warning("ignoring vector %s: unreadable index (%s)", d.name, e)
                continue
            versions = [v for v in versions if (d / f"{v.sha256}{_SUFFIX}").is_file()]
            if not versions or versions[-1].sha256 != current:
                log.warning("ignoring vector %s: its current version file is missing", d.name)
                continue
            self._entries[d.name] = _Entry(d.name, versions)

    def _load_profiles(self) -> None:
        for p in sorted((self.root / _PROFILES).glob("*.json")):
            name = p.name[: -len(".json")]
            try:
                _check_name(name)
                doc = json.loads(p.read_bytes())
                self._profiles[name] = Profile.from_dict(doc)
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring profile %s: %s", p.name, e)

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
        _check_name(name)
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
        art.check_compatible(
            hidden_size=self.hidden_size, num_layers=self.num_layers, linear_shapes=self.linear_shapes
        )
        if description is None:
            description = art.extra.get("description")
        version = _Version(
            sha256=art.sha256,
            kind=art.kind,
            layers=art.layers,
            method=art.method,
            description=description,
            created=int(time.time()),
            model_type=art.model_type,
            hidden_size=art.hidden_size,
            num_layers=art.num_layers,
            size=len(data),
        )
        folder = self.root / name
        path = folder / f"{art.sha256}{_SUFFIX}"
        with self._write_lock:
            if not path.is_file():
                atomic_write_bytes(path, data)  # the artifact first ...
            with self._lock:
                old = self._entries.get(name)
                versions = [v for v in (old.versions if old else []) if v.sha256 != art.sha256]
            entry = _Entry(name, [*versions, version])
            atomic_write_bytes(folder / _INDEX, entry.to_json())  # ... then the index that names it
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
        tmpdir = Path(tempfile.mkdtemp(prefix=".upload.", suffix=".tmp", dir=self.root))
        try:
            src = tmpdir / base
            src.write_bytes(data)
            art = import_gguf(
                src,
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                model_type=self.model_type,
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
        _check_name(name)
        with self._write_lock:
            with self._lock:
                if name not in self._entries:
                    raise UnknownVectorError(f"unknown vector {name!r}")
            folder = self.root / name
            trash = self.root / f".{name}.{secrets.token_hex(6)}.deleting.tmp"
            try:
                os.replace(folder, trash)
            except FileNotFoundError:  # removed behind our back: forget it all the same
                pass
            fsync_dir(self.root)
            with self._lock:
                entry = self._entries.pop(name)
                still_used = {v.sha256 for e in self._entries.values() for v in e.versions}
                for v in entry.versions:
                    if v.sha256 not in still_used:
                        self._cache_pop(v.sha256)
            shutil.rmtree(trash, ignore_errors=True)
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
                matches = [v.sha256 for v in entry.versions if v.sha256.startswith(pin)]
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
        path = self.root / name / f"{sha}{_SUFFIX}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownVectorError(f"vector {name!r} (version {sha[:12]}) was deleted") from None
        art = parse_artifact(data, max_bytes=max(self.max_bytes, len(data)))
        if art.sha256 != sha:
            raise ArtifactError(f"stored vector {name!r} is corrupt: its file does not hash to {sha[:12]}")
        art.check_compatible(
            hidden_size=self.hidden_size, num_layers=self.num_layers, linear_shapes=self.linear_shapes
        )
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
        _check_name(name)
        for ref in profile.vectors:
            self.resolve(ref)
        doc = {"name": name, **profile.to_dict()}
        with self._write_lock:
            atomic_write_bytes(self.root / _PROFILES / f"{name}.json", json.dumps(doc, indent=1).encode())
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
        _check_name(name)
        with self._write_lock:
            with self._lock:
                if name not in self._profiles:
                    raise UnknownProfileError(f"unknown profile {name!r}")
            path = self.root / _PROFILES / f"{name}.json"
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            with self._lock:
                self._profiles.pop(name, None)
        log.info("profile %s: deleted", name)

    # ------------------------------------------------------------------ compile

    def compile(self, profile: Profile) -> CompiledProfile:
        """Resolve every entry of ``profile`` (pins included) and compile it for the served model.

        Raises like :meth:`resolve`; the result carries the fingerprint and the resolved versions.
        """
        entries = [(ref, self.resolve(ref)) for ref in profile.vectors]
        return compile_profile(entries, num_layers=self.num_layers, hidden_size=self.hidden_size)
