"""Incremental detokenisation equals a full decode, never splits a character, costs the same per token."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer

TRICKY = [
    "Hello,   world!\n\n  Indented\tand tabbed.",
    "Ünïcödé: naïve café, 北京市, Привет, こんにちは 🌍🚀👩‍👩‍👧‍👦 done",
    "e\u0301 combining, emoji 🇫🇷 flags and math ∑∫√ — dashes… quotes “x”",
    "  leading spaces and trailing ones   ",
    "tokens: <|im_start|> not special as text, then 12345678901234567890",
]


def _run(det: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    parts = []
    for t in ids:
        text, stopped = det.add(t)
        parts.append(text)
        if stopped:
            return parts, True
    text, stopped = det.flush()
    parts.append(text)
    return parts, stopped


@pytest.mark.parametrize("text", TRICKY)
def test_incremental_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    parts, stopped = _run(IncrementalDetokenizer(tokenizer), ids)
    assert not stopped
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in parts)  # a multi-byte character is never released in halves


def test_special_tokens_are_skipped_like_a_full_decode(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    ids = [ids[0], tokenizer.eos_token_id, *ids[1:], tokenizer.eos_token_id]
    parts, _ = _run(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (("café",), "Ünïcödé: naïve "),
        (("🚀",), "Ünïcödé: naïve café, 北京市, Привет, こんにちは 🌍"),
        (("zzz",), None),
    ],
)
def test_stop_strings_cut_the_text_and_hold_back_prefixes(tokenizer, stops, expected):
    text = TRICKY[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, stops)
    parts, stopped = _run(det, ids)
    out = "".join(parts)
    if expected is None:
        assert not stopped and out == tokenizer.decode(ids, skip_special_tokens=True)
    else:
        assert stopped and out == expected
        # nothing released before the stop was found went past its start
        assert all(not p or out.startswith("".join(parts[: i + 1])) for i, p in enumerate(parts))


def test_a_stop_string_split_across_tokens_is_never_streamed(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer, ("ree fo",))
    released = ""
    for t in ids:
        text, stopped = det.add(t)
        released += text
        assert "ree" not in released or stopped  # the start of the stop string was held back
        if stopped:
            break
    assert stopped and released == "one two th"


class _Counting:
    """A tokenizer wrapper that records how many ids each decode call gets."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_cost_per_token_does_not_grow_with_the_output(tokenizer):
    ids = tokenizer.encode(" ".join(TRICKY) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    counting = _Counting(tokenizer)
    parts, _ = _run(IncrementalDetokenizer(counting), ids)
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(counting.sizes) <= 2 * len(ids) + 2
    assert max(counting.sizes) <= 12  # decode windows stay short however long the output gets
