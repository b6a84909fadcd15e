"""server.config: the serve options are generated from ServerConfig, with its defaults and env variables."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from server.config import ServerConfig, add_serve_options, config_from_args, config_from_mapping, env_name


def _parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for f in fields(ServerConfig):
        monkeypatch.delenv(env_name(f.name), raising=False)


def test_every_field_is_an_option_with_the_config_default():
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest != "help"}
    names = {f.name for f in fields(ServerConfig)}
    assert set(flags) == names - {"api_key", "admin_key"}  # keys come from the environment only
    assert flags["max_batch_size"] == ["--max-batch-size"] and flags["vector_dir"] == ["--vector-dir"]
    assert _parse([]) == ServerConfig()


def test_command_line_values_are_typed():
    cfg = _parse(["--port", "9001", "--body-timeout", "2.5", "--vector-dir", "/tmp/v", "--log-prompts"])
    assert (cfg.port, cfg.body_timeout, cfg.vector_dir, cfg.log_prompts) == (9001, 2.5, Path("/tmp/v"), True)
    with pytest.raises(SystemExit):
        _parse(["--quantization", "fp8"])


def test_environment_sets_defaults_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("STEERSERVE_PORT", "9002")
    monkeypatch.setenv("STEERSERVE_QUANTIZATION", "nf4")
    monkeypatch.setenv("STEERSERVE_LOG_PROMPTS", "true")
    monkeypatch.setenv("STEERSERVE_API_KEY", "user-key")
    monkeypatch.setenv("STEERSERVE_ADMIN_KEY", "")  # empty counts as unset
    cfg = _parse([])
    assert (cfg.port, cfg.quantization, cfg.log_prompts) == (9002, "nf4", True)
    assert (cfg.api_key, cfg.admin_key) == ("user-key", None)
    assert _parse(["--port", "9003"]).port == 9003


def test_an_invalid_environment_value_is_refused_with_its_name(monkeypatch):
    monkeypatch.setenv("STEERSERVE_DTYPE", "float8")
    with pytest.raises(ValueError, match="STEERSERVE_DTYPE 'float8'"):
        _parse([])
    monkeypatch.setenv("STEERSERVE_DTYPE", "float32")
    monkeypatch.setenv("STEERSERVE_MAX_QUEUE", "many")
    with pytest.raises(SystemExit):
        _parse([])


def test_the_readme_documents_every_option():
    """Every option (and env-only key) has a row in the README's table of options and limits."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("### Options and limits") : readme.index("Fixed limits:")]
    for f in fields(ServerConfig):
        name = f"--{f.name.replace('_', '-')}" if f.metadata["cli"] else env_name(f.name)
        assert f"`{name}" in table or f"/ `{name}" in table, f"{name} is not in the README's options table"


@pytest.mark.parametrize(
    "option", ["--max-connections", "--header-timeout", "--max-versions", "--body-timeout"]
)
def test_limits_must_be_positive(option):
    with pytest.raises(ValueError, match=f"{option} must be positive"):
        _parse([option, "0"])


def test_replica_options_need_replicas_and_fit_together():
    assert _parse(["--replicas", "2", "--min-replicas", "1", "--max-replicas", "4"]).max_replicas == 4
    with pytest.raises(ValueError, match="--ray-address, --replica-cpus needs --replicas N"):
        _parse(["--ray-address", "10.0.0.1:6379", "--replica-cpus", "2"])
    with pytest.raises(ValueError, match="autoscaling needs both --min-replicas and --max-replicas"):
        _parse(["--replicas", "2", "--max-replicas", "4"])
    with pytest.raises(ValueError, match="need 1 <= A <= N <= B, got 3, 2, 4"):
        _parse(["--replicas", "2", "--min-replicas", "3", "--max-replicas", "4"])
    with pytest.raises(ValueError, match="must not be negative"):
        _parse(["--replicas", "-1"])


def test_a_mapping_of_options_reads_like_the_command_line(monkeypatch):
    monkeypatch.setenv("STEERSERVE_MAX_QUEUE", "7")
    cfg = config_from_mapping({"replicas": 2, "vector-dir": "/v", "log_prompts": True, "drain_timeout": "5"})
    assert (cfg.replicas, cfg.vector_dir, cfg.log_prompts, cfg.drain_timeout) == (2, Path("/v"), True, 5.0)
    assert cfg.max_queue == 7  # the environment still gives the defaults
    with pytest.raises(ValueError, match="unknown serve option 'api_key'"):  # keys: environment only
        config_from_mapping({"api_key": "k"})
    with pytest.raises(ValueError, match="argument --dtype: invalid choice: 'float8'"):
        config_from_mapping({"dtype": "float8"})
