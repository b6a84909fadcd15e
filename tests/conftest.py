"""Shared fixtures: the SmolLM2 tokenizer (from the provisioned default model) and tiny served models."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import smollm2_tokenizer, tiny_loaded

from server.app import create_app
from server.config import ServerConfig
from server.state import ServerState


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


@pytest.fixture
def make_server(tmp_path: Path, tokenizer: Any) -> Iterator[Callable[..., tuple[ServerState, TestClient]]]:
    """``make(load=True, **config)`` -> (state, client); loaded ones run their lifespan (engine stops)."""
    opened: list[TestClient] = []

    def make(*, load: bool = True, seed: int = 0, **overrides: Any) -> tuple[ServerState, TestClient]:
        overrides.setdefault("vector_dir", tmp_path / "vectors")
        overrides.setdefault("drain_timeout", 5.0)
        state = ServerState(ServerConfig(quantization="none", **overrides))
        client = TestClient(create_app(state))
        if load:
            state.load(tiny_loaded(tokenizer, seed))
            client.__enter__()
            opened.append(client)
        return state, client

    yield make
    for client in reversed(opened):
        client.__exit__(None, None, None)
