"""The metadata the trainers write into their artifacts: SPEC §4's optional keys.

``training`` is the run's configuration and ``metrics`` its measurements, each as JSON with sorted
keys; ``base_model`` names the model the artifact was trained on and ``description`` says what it is.
Artifacts are written with :func:`steering_vectors.save_artifact` (atomically; the version is the
sha256 of the bytes).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["artifact_metadata"]


def artifact_metadata(
    training: dict[str, Any], metrics: dict[str, Any], *, base_model: str | None, description: str
) -> dict[str, str]:
    """``{"training", "metrics", "base_model" (when known), "description"}``, all strings."""
    meta = {"training": json.dumps(training, sort_keys=True), "metrics": json.dumps(metrics, sort_keys=True)}
    if base_model:
        meta["base_model"] = base_model
    meta["description"] = description
    return meta
