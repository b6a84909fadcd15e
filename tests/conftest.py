"""Shared fixtures: the SmolLM2 tokenizer (from the provisioned default model) and tiny served models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from basemodel import prepare_default_model

    return prepare_default_model(quiet=True)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def tiny_loaded(tokenizer):
    """A LoadedModel around a tiny random Llama with SmolLM2's tokenizer."""
    from basemodel import LoadedModel

    return LoadedModel(
        model=tiny_llama(),
        tokenizer=tokenizer,
        model_id="tiny-llama",
        path=Path("."),
        quantization="none",
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
