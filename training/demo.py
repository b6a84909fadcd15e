"""The demo data shipped with steerserve (``training/data/``, written by ``training/data/make_demo.py``).

Two sets, each with a ``train`` and a ``test`` split whose prompts are disjoint: ``tone_pref``
(preferences: warm and positive vs curt and negative replies) and ``signoff_inst`` (instructions:
every reply ends with the line :data:`SIGNOFF`). :func:`demo_path` finds their files. The generator
imports :data:`SIGNOFF` from here, so the data and the code that checks it share one constant.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_DIR", "DEMO_SETS", "SIGNOFF", "demo_path"]

SIGNOFF = "\u2014 Steery"
"""The last line of every reply in the ``signoff_inst`` demo set (an em dash, a space, ``Steery``)."""

DEMO_DIR = Path(__file__).resolve().with_name("data")
"""Folder of the shipped demo data (package data of ``training``)."""

DEMO_SETS: dict[str, str] = {"tone_pref": "preferences", "signoff_inst": "instructions"}
"""Shipped demo sets and what they hold; each has ``<name>_train.jsonl`` and ``<name>_test.jsonl``."""


def demo_path(name: str, split: str | None = None) -> Path:
    """Path of a shipped demo data file.

    ``name`` is a file name with or without ``.jsonl`` (``"tone_pref_train"``), or a set name from
    :data:`DEMO_SETS` together with ``split`` (``demo_path("tone_pref", "test")``).
    """
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    if split is not None:
        stem = f"{stem}_{split}"
    path = DEMO_DIR / f"{stem}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no demo data file {stem!r} in {DEMO_DIR}; available: {available}")
    return path
