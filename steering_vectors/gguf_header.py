"""A bounded pre-scan of a GGUF header, run before the ``gguf`` library parses anything.

``gguf.GGUFReader`` builds Python objects for every metadata value and array item, so a small file that
declares a huge metadata array costs seconds of CPU and gigabytes of memory (measured: a 4 MB file with a
4-million-item array took 42 s and +2 GB). This scan walks the header with ``struct`` only, allocating
nothing per item, and refuses a header outside the bounds a control vector needs:

- at most :data:`MAX_KV` metadata keys and :data:`MAX_TENSORS` tensors;
- strings (keys, values, tensor names) of at most :data:`MAX_STRING_BYTES`;
- arrays of at most :data:`MAX_ARRAY_ITEMS` items, nested at most one level;
- tensors of 1 to 4 dimensions;
- every length within the bytes that are actually there.

GGUF layout (versions 2 and 3, little-endian): ``"GGUF"``, uint32 version, uint64 tensor count, uint64
metadata count; each metadata entry a string key (uint64 length + UTF-8), a uint32 value type and the
value (an array: uint32 item type, uint64 count, the items); then each tensor's name, uint32 dimension
count, uint64 dimensions, uint32 type and uint64 offset.
"""

from __future__ import annotations

import struct

from .artifact import ArtifactError

__all__ = ["MAX_ARRAY_ITEMS", "MAX_KV", "MAX_STRING_BYTES", "MAX_TENSORS", "check_gguf_header"]

MAX_KV = 256
MAX_TENSORS = 4096
MAX_STRING_BYTES = 64 * 1024
MAX_ARRAY_ITEMS = 1024
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian integers and strings from ``data``, never past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(f"invalid or truncated GGUF file: {what} runs past the end of the file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING_BYTES:
            raise ArtifactError(f"GGUF {what}: string of {n} bytes exceeds the {MAX_STRING_BYTES}-byte limit")
        return self.take(n, what).decode("utf-8", "replace")


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> None:
    if vtype in _FIXED:
        cur.take(_FIXED[vtype], f"key {key!r}")
    elif vtype == _STRING:
        cur.string(f"key {key!r}")
    elif vtype == _ARRAY:
        if depth > 0:
            raise ArtifactError(f"GGUF key {key!r}: arrays nested more than one level are not accepted")
        itype, count = cur.u32(f"key {key!r}"), cur.u64(f"key {key!r}")
        if count > MAX_ARRAY_ITEMS:
            raise ArtifactError(
                f"GGUF key {key!r}: array of {count} items exceeds the {MAX_ARRAY_ITEMS}-item limit"
            )
        for _ in range(count):
            _skip_value(cur, itype, key, depth + 1)
    else:
        raise ArtifactError(f"GGUF key {key!r}: unknown value type {vtype}")


def check_gguf_header(data: bytes) -> None:
    """Raise :class:`ArtifactError` unless ``data`` starts with a GGUF header within the bounds above."""
    cur = _Cursor(data)
    if cur.take(4, "magic") != b"GGUF":
        raise ArtifactError("not a GGUF file (no 'GGUF' magic)")
    version = cur.u32("version")
    if version not in (2, 3):
        raise ArtifactError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    if n_kv > MAX_KV:
        raise ArtifactError(f"GGUF declares {n_kv} metadata keys, more than the limit of {MAX_KV}")
    if n_tensors > MAX_TENSORS:
        raise ArtifactError(f"GGUF declares {n_tensors} tensors, more than the limit of {MAX_TENSORS}")
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        _skip_value(cur, cur.u32(f"key {key!r}"), key)
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.u32(f"tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise ArtifactError(f"GGUF tensor {name!r}: {n_dims} dimensions (1 to 4 are valid)")
        cur.take(8 * n_dims + 4 + 8, f"tensor {name!r}")
