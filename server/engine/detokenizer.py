"""Incremental detokenisation and stop strings: the cost per token is independent of the output length.

Decoding token by token is wrong for tokenizers whose pieces depend on their neighbours (leading spaces
in SentencePiece, multi-byte characters split across byte-level BPE tokens). So each new token is
decoded in a short window ``tokens[prefix:]`` next to ``tokens[prefix:read]``; the text it adds is the
difference, released only when it does not end in an incomplete character (U+FFFD); then the window
moves on. Stop strings are searched only in text not yet released plus a tail of ``len(stop) - 1``
characters, and text that could be the start of a stop string is held back until it is resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of one sample's generated tokens, released as deltas that never split a character."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self._tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens before this are already turned into text
        self._pending = ""  # decoded, not yet released (may be the start of a stop string)
        self._tail = ""  # the last max(len(stop)) - 1 released characters
        self._keep = max((len(s) for s in self.stops), default=1) - 1

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Move decoded text of the window into ``_pending``."""
        window = self._tokens[self._prefix :]
        if not window:
            return
        before = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(window)
        if final or not text.endswith(_REPLACEMENT):  # (a skipped special token adds nothing)
            self._pending += text[len(before) :]
            self._prefix, self._read = self._read, len(self._tokens)

    def add(self, token: int, *, check_stop: bool = True) -> tuple[str, bool]:
        """Append a token; returns ``(text to release now, stopped)``.

        When a stop string appears (and ``check_stop``), the text before it is released and ``stopped``
        is true; the stop string and whatever follows it are dropped.
        """
        self._tokens.append(token)
        self._advance(final=False)
        return self._release(check_stop, final=False)

    def flush(self, *, check_stop: bool = True) -> tuple[str, bool]:
        """The output ends: release everything still held (a stop string in it still cuts it)."""
        self._advance(final=True)
        return self._release(check_stop, final=True)

    def _release(self, check_stop: bool, final: bool) -> tuple[str, bool]:
        if not self._pending:
            return "", False
        if check_stop and self.stops:
            hay = self._tail + self._pending
            cut = min((i for i in (hay.find(s) for s in self.stops) if i != -1), default=-1)
            if cut != -1:
                out = hay[len(self._tail) : cut] if cut >= len(self._tail) else ""
                self._pending = ""
                return out, True
        safe = len(self._pending)
        if not final and check_stop:
            hay = self._tail + self._pending
            for stop in self.stops:  # hold back a tail that could begin a stop string
                for k in range(min(len(stop) - 1, len(hay)), 0, -1):
                    if hay.endswith(stop[:k]):
                        safe = min(safe, len(self._pending) - k)
                        break
        safe = max(safe, 0)
        out, self._pending = self._pending[:safe], self._pending[safe:]
        if self._keep:
            self._tail = (self._tail + out)[-self._keep :]
        return out, False
