"""steering_vectors: artifact format, profile composition and per-row steering hooks (no web, no training)."""

from .arch import ModelLayout, UnsupportedModelError, find_layout
from .artifact import (
    FORMAT,
    KINDS,
    Artifact,
    ArtifactError,
    IncompatibleArtifactError,
    load_artifact,
    parse_artifact,
    save_artifact,
)
from .fold import FoldHandle, fold_profile, folded
from .gguf_io import CONTROLVECTOR_ARCH, GGUFExportResult, export_gguf, import_gguf
from .hooks import SlotsExhaustedError, SteeringHooks, install_steering, steering
from .profile import (
    MAX_LORA_RANK,
    MAX_PROFILE_RANK,
    MAX_STRENGTH,
    POSITIONS,
    CompiledProfile,
    Profile,
    VectorRef,
    check_lora_ranks,
    compile_profile,
)
from .tables import tables_budget_bytes

__all__ = [
    "CONTROLVECTOR_ARCH",
    "GGUFExportResult",
    "export_gguf",
    "import_gguf",
    "FORMAT",
    "KINDS",
    "MAX_LORA_RANK",
    "MAX_PROFILE_RANK",
    "MAX_STRENGTH",
    "POSITIONS",
    "Artifact",
    "ArtifactError",
    "CompiledProfile",
    "FoldHandle",
    "IncompatibleArtifactError",
    "ModelLayout",
    "Profile",
    "SlotsExhaustedError",
    "SteeringHooks",
    "UnsupportedModelError",
    "VectorRef",
    "check_lora_ranks",
    "compile_profile",
    "find_layout",
    "fold_profile",
    "folded",
    "install_steering",
    "load_artifact",
    "parse_artifact",
    "save_artifact",
    "steering",
    "tables_budget_bytes",
]
