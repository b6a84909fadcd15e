"""Every ``steerserve serve`` option, its default, help text and environment variable, once.

:class:`ServerConfig` is the single home of the serve defaults. :func:`add_serve_options` generates the
command-line options from its fields (``--max-batch-size``, ...) with their defaults read from
``STEERSERVE_<OPTION>`` when set; :func:`config_from_args` turns the parsed options back into a config.
The API keys are read only from the environment (``STEERSERVE_API_KEY``, ``STEERSERVE_ADMIN_KEY``): a
key on the command line would show in the process list.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from basemodel import DTYPE_CHOICES, QUANTIZATION_CHOICES

__all__ = [
    "ENV_PREFIX",
    "ServerConfig",
    "add_serve_options",
    "config_from_args",
    "config_from_mapping",
    "env_name",
]

ENV_PREFIX = "STEERSERVE_"
_TRUE = ("1", "true")


def _default_vector_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("steerserve")) / "vectors"


def _option(default: Any, help: str, *, choices: tuple[str, ...] = (), cli: bool = True, **kw: Any) -> Any:
    """A config field with its help text, choices and whether it is a command-line option (else env only)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli}, **kw)


@dataclass
class ServerConfig:
    """Every ``steerserve serve`` option (each also readable from ``STEERSERVE_<OPTION>``)."""

    model: str | None = _option(
        None, "local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    quantization: str = _option(
        "auto", "weight quantization (auto: nf4 where it works)", choices=QUANTIZATION_CHOICES
    )
    dtype: str = _option("auto", "compute dtype", choices=DTYPE_CHOICES)
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    host: str = _option("127.0.0.1", "address to bind (mutating routes need an admin key off loopback)")
    port: int = _option(8000, "port to listen on")
    vector_dir: Path = field(
        default_factory=_default_vector_dir,
        metadata={"help": "where uploaded vectors and profiles persist", "choices": (), "cli": True},
    )
    max_batch_size: int = _option(8, "rows in the running batch")
    max_queue: int = _option(64, "requests waiting for a row; beyond it 429")
    max_new_tokens: int = _option(1024, "cap on max_new_tokens / max_tokens per request")
    kv_cache_tokens: int = _option(
        0, "KV cache capacity over all rows, in tokens (0: the context length, at least 1,024 per row)"
    )
    max_batched_tokens: int = _option(0, "tokens in one forward pass, decode plus prompt chunks (0: 2,048)")
    max_lora_rank: int = _option(64, "rank of one LoRA artifact in a profile at most")
    max_profile_rank: int = _option(128, "LoRA ranks of one profile summed at most")
    max_upload_bytes: int = _option(64 * 1024 * 1024, "size cap of an uploaded vector file")
    max_body_bytes: int = _option(1024 * 1024, "size cap of any other request body")
    body_timeout: float = _option(60.0, "seconds a client has to send the whole request body (then 408)")
    header_timeout: float = _option(10.0, "seconds a client has to send the whole header block (then 408)")
    max_header_bytes: int = _option(64 * 1024, "size cap of the request line and headers (then 431)")
    max_connections: int = _option(256, "open connections at most; beyond it 503")
    api_key: str | None = _option(None, "key every route but /health, /ready, /metrics needs", cli=False)
    admin_key: str | None = _option(None, "key the mutating routes need", cli=False)
    drain_timeout: float = _option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    fold: str | None = _option(None, "fold this saved profile into the weights")
    served_model_name: str | None = _option(
        None, "the model id in the API (default: the model's folder name)"
    )
    allow_model_mismatch: bool = _option(
        False, "accept artifacts whose model_type / base_model metadata names another model"
    )
    max_vectors: int = _option(1000, "vector names the store holds at most; beyond it 409")
    max_versions: int = _option(20, "versions kept per vector name (the oldest unpinned one goes first)")
    log_prompts: bool = _option(False, "write prompts into the request log")
    log_level: str = _option("info", "log level")
    replicas: int = _option(
        0, "serve N Ray Serve replicas behind Ray Serve's HTTP proxy (0: one process, no Ray)"
    )
    ray_address: str | None = _option(
        None, "with --replicas: the Ray cluster to join (default: start a local one)"
    )
    min_replicas: int = _option(
        0, "with --replicas: autoscale on ongoing requests, at least this many replicas"
    )
    max_replicas: int = _option(
        0, "with --replicas: autoscale on ongoing requests, at most this many replicas"
    )
    replica_cpus: float = _option(
        0.0,
        "with --replicas: CPUs (and torch threads) per replica (0: the cluster's CPUs split between them)",
    )
    metrics_sd_file: str | None = _option(
        None,
        "with --replicas: keep a Prometheus file_sd list of the replicas' metrics endpoints in this file",
    )
    compute_max_tokens: int = _option(256, "POST /v1/vectors/compute: tokens per text of a pair")
    compute_batch_size: int = _option(16, "POST /v1/vectors/compute: texts per forward pass")

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        for name in ("kv_cache_tokens", "max_batched_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (automatic) or positive")
        _check_replicas(self)


#: Limits that must be positive.
_POSITIVE = (
    "max_batch_size",
    "max_queue",
    "max_new_tokens",
    "max_upload_bytes",
    "max_body_bytes",
    "body_timeout",
    "header_timeout",
    "max_header_bytes",
    "max_connections",
    "max_vectors",
    "max_versions",
    "max_lora_rank",
    "max_profile_rank",
)


#: Options that only mean something with ``--replicas``.
_REPLICA_ONLY = ("ray_address", "min_replicas", "max_replicas", "replica_cpus", "metrics_sd_file")


def _check_replicas(cfg: ServerConfig) -> None:
    """``ValueError`` naming the option for replica settings that cannot work together."""
    if cfg.replicas < 0 or cfg.replica_cpus < 0:
        raise ValueError("--replicas and --replica-cpus must not be negative")
    if not cfg.replicas:
        given = [f"--{n.replace('_', '-')}" for n in _REPLICA_ONLY if getattr(cfg, n)]
        if given:
            raise ValueError(f"{', '.join(given)} needs --replicas N")
        return
    if bool(cfg.min_replicas) != bool(cfg.max_replicas):
        raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
    if cfg.max_replicas and not 1 <= cfg.min_replicas <= cfg.replicas <= cfg.max_replicas:
        raise ValueError(
            "--min-replicas A --replicas N --max-replicas B need 1 <= A <= N <= B, "
            f"got {cfg.min_replicas}, {cfg.replicas}, {cfg.max_replicas}"
        )


def env_name(name: str) -> str:
    """``STEERSERVE_<OPTION>`` of a config field."""
    return ENV_PREFIX + name.upper()


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _from_env(f: Field[Any]) -> str | None:
    return os.environ.get(env_name(f.name)) or None  # an empty variable counts as unset


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per command-line field of :class:`ServerConfig` (default: env var, else the field's)."""
    for f in fields(ServerConfig):
        if not f.metadata["cli"]:
            continue
        flag, env, default = "--" + f.name.replace("_", "-"), _from_env(f), _default(f)
        help_text = f"{f.metadata['help']} (env {env_name(f.name)})"
        if isinstance(default, bool):
            value = default if env is None else env.lower() in _TRUE
            parser.add_argument(flag, action="store_true", default=value, help=help_text)
            continue
        kind = type(default) if default is not None else str
        help_text += "; default: %(default)s" if default is not None else ""
        parser.add_argument(
            flag,
            type=kind,
            default=env if env is not None else default,  # argparse converts a string default with `type`
            choices=f.metadata["choices"] or None,
            help=help_text,
        )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config of parsed serve options; the env-only fields (API keys) come from the environment."""
    values: dict[str, Any] = {}
    for f in fields(ServerConfig):
        value = getattr(args, f.name) if f.metadata["cli"] else _from_env(f)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ValueError(f"invalid {env_name(f.name)} {value!r}: choose one of {', '.join(choices)}")
        values[f.name] = value
    return ServerConfig(**values)


def config_from_mapping(options: Mapping[str, Any]) -> ServerConfig:
    """The config of ``{option: value}`` (``max_batch_size`` or ``max-batch-size``), read like the command
    line (same conversions, choices and environment defaults); ``ValueError`` naming an unknown option."""
    parser = argparse.ArgumentParser(prog="steerserve serve", exit_on_error=False)
    add_serve_options(parser)
    known = {f.name for f in fields(ServerConfig) if f.metadata["cli"]}
    argv: list[str] = []
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"unknown serve option {key!r}")
        if value is None or value is False:
            continue
        argv += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    try:
        return config_from_args(parser.parse_args(argv))
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
