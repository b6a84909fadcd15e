"""The vector directory on disk: content-addressed artifact files, per-vector indexes, saved profiles.

Layout (``root`` is the ``--vector-dir``)::

    root/{name}/{sha256}.safetensors   every version of vector ``name``, content-addressed
    root/{name}/index.json             current version, description, created time, history of versions
    root/.profiles/{name}.json         saved profiles (description and pinned entries)
    root/.lock                         flock(2): exclusive around every change, shared around a reload
    root/.generation                   changes (atomic rename) with every change of the directory

Crash safety (SPEC §6: "a crash at any moment leaves no half-written vector visible"):

- every file is written with :func:`~steering_vectors.artifact.atomic_write_bytes` (temp file named
  ``.*.tmp`` in the same folder, fsync, rename, fsync of the folder);
- an upload writes the artifact file first and the index after it, so the index never names a file that
  is not complete. A crash in between leaves an unreferenced version file, which is never listed;
- a delete renames the vector's folder to ``root/.{name}.{random}.deleting.tmp`` before removing it;
- opening the directory removes every leftover ``.*.tmp`` entry (under the exclusive lock, so never a
  temporary file another process is writing).

Several processes (replicas) may share the directory: every change is made under an exclusive
``flock`` on ``root/.lock`` (a read-modify-write against the latest state on disk, so two writers lose
nothing) and ends by replacing ``root/.generation``; readers compare that file's content to the one they
loaded and reload under a shared lock when it changed.

Names are validated with :func:`steering_vectors.profile.check_name` before they reach the filesystem, so
no path traversal, separator or control character can ever be part of a path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from steering_vectors.artifact import atomic_write_bytes, fsync_dir
from steering_vectors.profile import Profile, check_name

from .errors import UnknownVectorError

__all__ = ["SavedProfile", "VectorDir", "VectorEntry", "VectorInfo"]

log = logging.getLogger(__name__)

_INDEX = "index.json"
_PROFILES = ".profiles"
_SUFFIX = ".safetensors"
_INDEX_FORMAT = "steerserve.index.v1"
_LOCK = ".lock"
_GENERATION = ".generation"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class VectorInfo:
    """A registered vector as the API reports it: its current version and the history of versions.

    Also the record of one version in ``index.json`` (there without ``name`` and ``versions``).
    ``versions`` lists every stored sha256, oldest first (the last one is ``sha256``); it is filled in
    for the current version only. ``created`` is the Unix time (seconds) of the upload.
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

    def to_record(self) -> dict[str, Any]:
        """The version's entry in ``index.json``."""
        d = asdict(self)
        del d["name"], d["versions"]
        return d

    @classmethod
    def from_record(cls, name: str, d: dict[str, Any]) -> VectorInfo:
        """Read a version entry of ``index.json`` (``ValueError``/``KeyError``/``TypeError`` if malformed)."""
        sha = d["sha256"]
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise ValueError(f"bad sha256 {sha!r}")
        desc = d.get("description")
        return cls(
            name=name,
            sha256=sha,
            kind=str(d["kind"]),
            layers=[int(x) for x in d["layers"]],
            method=str(d["method"]),
            description=str(desc) if desc is not None else None,
            created=int(d["created"]),
            model_type=str(d["model_type"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_layers"]),
        )


@dataclass
class VectorEntry:
    """Index of one vector name: its versions, oldest first; the last one is current."""

    name: str
    versions: list[VectorInfo]

    @property
    def current(self) -> VectorInfo:
        return self.versions[-1]

    def info(self) -> VectorInfo:
        """The current version with the history of versions."""
        return replace(self.current, layers=list(self.current.layers), versions=self.shas())

    def shas(self) -> list[str]:
        return [v.sha256 for v in self.versions]

    def match(self, pin: str) -> str:
        """The version whose sha256 starts with ``pin`` (``KeyError`` if none, ``ValueError`` if several)."""
        matches = [sha for sha in self.shas() if sha.startswith(pin)]
        if not matches:
            raise UnknownVectorError(f"vector {self.name!r} has no version whose sha256 starts with {pin!r}")
        if len(matches) > 1:
            raise ValueError(
                f"version pin {self.name}@{pin} is ambiguous: it matches {len(matches)} versions "
                f"({', '.join(m[:12] for m in matches)}); use a longer prefix"
            )
        return matches[0]

    def to_json(self) -> bytes:
        cur = self.current
        doc = {
            "format": _INDEX_FORMAT,
            "name": self.name,
            "current": cur.sha256,
            "description": cur.description,
            "created": cur.created,
            "versions": [v.to_record() for v in self.versions],
        }
        return json.dumps(doc, indent=1).encode()


@dataclass(frozen=True)
class SavedProfile:
    """A saved profile: its entries (pinned to versions when saved) and its description."""

    profile: Profile
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, **self.profile.to_dict()}


class VectorDir:
    """Reads and writes the vector directory ``root`` (created if missing); holds no state of its own."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _PROFILES).mkdir(exist_ok=True)

    def artifact_path(self, name: str, sha: str) -> Path:
        return self.root / name / f"{sha}{_SUFFIX}"

    def remove_leftovers(self) -> None:
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

    def read_entries(self) -> dict[str, VectorEntry]:
        """Every vector whose index and current version file are readable (others are logged, skipped)."""
        entries = {}
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                check_name(d.name)
            except ValueError:
                log.warning("ignoring %s: not a valid vector name", d)
                continue
            index = d / _INDEX
            if not index.is_file():
                continue  # a crash before the first index write: nothing was ever visible
            try:
                doc = json.loads(index.read_bytes())
                versions = [VectorInfo.from_record(d.name, v) for v in doc["versions"]]
                current = doc.get("current", versions[-1].sha256 if versions else None)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                log.warning("ignoring vector %s: unreadable index (%s)", d.name, e)
                continue
            versions = [v for v in versions if self.artifact_path(d.name, v.sha256).is_file()]
            if not versions or versions[-1].sha256 != current:
                log.warning("ignoring vector %s: its current version file is missing", d.name)
                continue
            entries[d.name] = VectorEntry(d.name, versions)
        return entries

    def read_profiles(self) -> dict[str, SavedProfile]:
        """Every readable saved profile by name (others are logged, skipped)."""
        profiles = {}
        for p in sorted((self.root / _PROFILES).glob("*.json")):
            name = p.name[: -len(".json")]
            try:
                check_name(name)
                doc = json.loads(p.read_bytes())
                desc = doc.get("description")
                profiles[name] = SavedProfile(Profile.from_dict(doc), str(desc) if desc is not None else None)
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("ignoring profile %s: %s", p.name, e)
        return profiles

    def has_profile(self, name: str) -> bool:
        """Whether a profile ``name`` is saved (a cheap check before anything loads)."""
        try:
            return (self.root / _PROFILES / f"{check_name(name)}.json").is_file()
        except ValueError:
            return False

    @contextmanager
    def lock(self, *, shared: bool = False) -> Iterator[None]:
        """Hold ``flock`` on ``root/.lock``: exclusive for a change, shared for a consistent read."""
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def generation(self) -> bytes:
        """The directory's change marker (empty before the first change)."""
        try:
            return (self.root / _GENERATION).read_bytes()
        except FileNotFoundError:
            return b""

    def bump_generation(self) -> bytes:
        """Mark a change (under the exclusive lock); returns the new marker."""
        marker = secrets.token_hex(16).encode()
        atomic_write_bytes(self.root / _GENERATION, marker)
        return marker

    def write_version(self, entry: VectorEntry, data: bytes) -> None:
        """Write the current version's file (unless stored already), then the index that names it."""
        path = self.artifact_path(entry.name, entry.current.sha256)
        if not path.is_file():
            atomic_write_bytes(path, data)  # the artifact first ...
        atomic_write_bytes(self.root / entry.name / _INDEX, entry.to_json())  # ... then the index

    def remove_vector(self, name: str) -> None:
        """Remove vector ``name``'s folder: one atomic rename out of sight, then the removal."""
        trash = self.root / f".{check_name(name)}.{secrets.token_hex(6)}.deleting.tmp"
        try:
            os.replace(self.root / name, trash)
        except FileNotFoundError:  # removed behind our back: nothing to do
            pass
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def write_profile(self, name: str, saved: SavedProfile) -> None:
        doc = {"name": check_name(name), **saved.to_dict()}
        atomic_write_bytes(self.root / _PROFILES / f"{name}.json", json.dumps(doc, indent=1).encode())

    def write_index(self, entry: VectorEntry) -> None:
        """Rewrite a vector's index (e.g. after a version was removed)."""
        atomic_write_bytes(self.root / entry.name / _INDEX, entry.to_json())

    def remove_version_file(self, name: str, sha: str) -> None:
        """Remove one version's file (after the index no longer names it)."""
        self.artifact_path(name, sha).unlink(missing_ok=True)
        fsync_dir(self.root / name)

    def remove_profile(self, name: str) -> None:
        path = self.root / _PROFILES / f"{check_name(name)}.json"
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
