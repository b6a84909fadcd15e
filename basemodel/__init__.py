"""The base model: provisioning of the embedded default model and loading of any local model directory.

Used by ``server`` and ``training`` alike (neither imports the other). Importing it has no side effects.
"""

from .loader import (
    DTYPE_CHOICES,
    QUANTIZATION_CHOICES,
    InvalidModelPathError,
    LoadedModel,
    bitsandbytes_problem,
    load_model,
    model_skeleton,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from .provision import (
    CACHE_DIR_ENV,
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL_NAME,
    GGUF_PACKAGE_INSTALL,
    ModelNotFoundError,
    default_model_dir,
    find_default_gguf,
    is_prepared,
    prepare_default_model,
)

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
    "model_skeleton",
    "prepare_default_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_quantization",
]
