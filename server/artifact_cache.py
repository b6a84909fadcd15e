"""The loaded-artifact cache of the vector store: least recently used first out, bounded in tensor bytes."""

from __future__ import annotations

from collections import OrderedDict

from steering_vectors.artifact import Artifact

__all__ = ["ArtifactCache"]


def _nbytes(art: Artifact) -> int:
    return sum(t.numel() * t.element_size() for t in art.tensors.values())


class ArtifactCache:
    """Artifacts by sha256, at most ``max_bytes`` of tensors (the most recently used one is always kept).
    Not thread-safe: the store calls it under its lock."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Artifact] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sha: str) -> Artifact | None:
        """The cached artifact (now the most recently used), or None."""
        art = self._items.get(sha)
        if art is not None:
            self._items.move_to_end(sha)
        return art

    def put(self, art: Artifact) -> None:
        """Cache ``art``, evicting the least recently used ones beyond the byte bound."""
        if art.sha256 in self._items:
            self._items.move_to_end(art.sha256)
            return
        self._items[art.sha256] = art
        self._size += _nbytes(art)
        while self._size > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._size -= _nbytes(old)

    def pop(self, sha: str) -> None:
        """Forget ``sha`` (a deleted version)."""
        art = self._items.pop(sha, None)
        if art is not None:
            self._size -= _nbytes(art)
