"""Shared fixtures: the SmolLM2 tokenizer (from the provisioned default model) and tiny served models."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import smollm2_tokenizer, tiny_loaded


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from basemodel import prepare_default_model

    return prepare_default_model(quiet=True)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return smollm2_tokenizer()


@pytest.fixture(name="tiny_loaded")
def tiny_loaded_fixture(tokenizer):
    """A LoadedModel around a tiny random Llama with SmolLM2's tokenizer."""
    return tiny_loaded(tokenizer)
