"""The evaluation's own pieces: distinct-2 is what its definition says. (The peft LoRA conversion the DPO
baseline uses is ``steering_vectors.peft_io``, tested in tests/test_peft_io.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from eval_alignment import distinct2  # noqa: E402


@pytest.mark.parametrize(
    ("texts", "expected"),
    [(["a b c d"], 1.0), (["a b a b a b"], 2 / 5), (["a b", "a b"], 1 / 2), (["one"], 0.0)],
)
def test_distinct2(texts: list[str], expected: float) -> None:
    assert distinct2(texts) == expected
