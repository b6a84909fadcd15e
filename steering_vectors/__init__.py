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
from .profile import POSITIONS, CompiledProfile, Profile, VectorRef, compile_profile

__all__ = [
    "CONTROLVECTOR_ARCH",
    "GGUFExportResult",
    "export_gguf",
    "import_gguf",
    "FORMAT",
    "KINDS",
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
    "compile_profile",
    "find_layout",
    "fold_profile",
    "folded",
    "install_steering",
    "load_artifact",
    "parse_artifact",
    "save_artifact",
    "steering",
]
