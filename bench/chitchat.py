"""Human-written chat turns for the alignment evaluation, from the ``chitchat-dataset`` PyPI package.

The package (MIT licence; installed by ``make bench-deps``, extra ``bench``) ships the BYU Perception,
Control and Cognition lab's Chit-Chat Challenge data - 7,168 conversations typed by people - as one
JSON file; nothing is downloaded at run time. It is located with ``importlib`` and read as JSON, never
imported. From each conversation this takes at most one exchange among its first three turns: a turn
that asks a question (ends with ``?``, 6-30 words) and the other person's reply (6-40 words). A seeded
sample of those is written as a JSONL instruction file (``{"prompt", "response"}``) that the project's
own loader reads (``training.loaders.load_instructions``).

It has no preference labels (the searched package lists hold no human-written preference set), so the
evaluation uses it for what needs none: the tone of the replies to people's own questions, and how
likely the people's actual replies stay under the steered model.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

__all__ = ["dataset_file", "exchanges", "write_jsonl"]


def dataset_file() -> Path:
    """``dataset.json`` inside the installed ``chitchat_dataset`` package (not imported)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("chitchat-dataset is not installed (make bench-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def exchanges(path: Path | None = None) -> list[tuple[str, str]]:
    """(question turn, reply turn) of every conversation that has one among its first three turns, in
    the order of the conversation ids."""
    data = json.loads((path or dataset_file()).read_text())
    out = []
    for _cid, conv in sorted(data.items()):
        turns = [" ".join(m["text"].strip() for m in turn) for turn in conv["messages"]]
        for ask, reply in list(zip(turns, turns[1:], strict=False))[:3]:
            if ask.endswith("?") and 6 <= len(ask.split()) <= 30 and 6 <= len(reply.split()) <= 40:
                out.append((ask, reply))
                break
    return out


def write_jsonl(out: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` exchanges drawn with ``random.Random(seed)`` to ``out`` as instruction records."""
    sample = random.Random(seed).sample(exchanges(), n)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n" for a, b in sample))
    return out
