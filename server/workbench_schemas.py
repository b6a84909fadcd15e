"""Pydantic bodies of the workbench routes (SPEC §9.2): ``POST /v1/sweep``, ``POST /v1/vectors/compute`` and
``GET /v1/vectors/{name}/norms``, requests and responses."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from steering_vectors.compute import MAX_PAIRS, MIN_PAIRS

from .engine import SamplingParams
from .schemas import FinishReason, Message, SteeringBody, SteeringInfo, Stop, Usage, VectorEntry

__all__ = [
    "MAX_SWEEP_STRENGTHS",
    "ComputeRequest",
    "ContrastPair",
    "SweepRequest",
    "SweepResponse",
    "SweepRow",
    "SweepVector",
    "VectorNorms",
]

MAX_SWEEP_STRENGTHS = 16
MAX_STRENGTH = 100.0
MAX_PAIR_CHARS = 8192
Positions = Literal["all", "prompt", "generated"]


class SweepRequest(BaseModel):
    """``POST /v1/sweep``: one prompt (or conversation), one vector, k strengths run as k rows of one batch.

    The sampling settings are those of ``/generate`` and apply to every row (with a ``seed``, every row
    draws from the same seed, exactly as the same request sent alone would). Greedy by default.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=1024)
    vector: str = Field(min_length=1, max_length=140, description="a registered vector; name@sha-prefix pins")
    strengths: list[float] = Field(
        min_length=1, max_length=MAX_SWEEP_STRENGTHS, description="k strengths; 0 is the unsteered reply"
    )
    layers: list[int] | None = Field(default=None, max_length=1024)
    positions: Positions = "all"
    max_new_tokens: int = Field(default=64, ge=1, description="per row; at most --max-new-tokens")
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop = None
    logprobs: bool = Field(default=False, description="per-token log-probabilities (refused until supported)")

    @field_validator("strengths")
    @classmethod
    def _finite(cls, strengths: list[float]) -> list[float]:
        bad = [w for w in strengths if not math.isfinite(w) or abs(w) > MAX_STRENGTH]
        if bad:
            raise ValueError(f"strengths must be finite and within ±{MAX_STRENGTH:g}, got {bad}")
        return strengths

    def steering(self, vector: str, strength: float) -> SteeringBody:
        """The inline profile of one row: ``vector`` (pinned by the caller) at ``strength``."""
        entry = VectorEntry(name=vector, strength=strength, layers=self.layers, positions=self.positions)
        return SteeringBody(vectors=[entry])

    def sampling(self, cap: int) -> SamplingParams:
        """The engine's settings of every row; a budget the request does not name is lowered to ``cap``."""
        asked = "max_new_tokens" in self.model_fields_set
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=self.max_new_tokens if asked else min(self.max_new_tokens, cap),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stops,
        )


class SweepRow(BaseModel):
    """One strength's reply; ``steering`` is what ``/generate`` with that strength would answer."""

    strength: float
    text: str
    finish_reason: FinishReason
    usage: Usage
    steering: SteeringInfo


class SweepVector(BaseModel):
    """The vector a sweep ran: the version every row used, and where it was applied."""

    name: str
    sha256: str
    kind: str
    layers: list[int] = Field(description="the layers applied (the artifact's, or the requested subset)")
    positions: Positions


class SweepResponse(BaseModel):
    results: list[SweepRow] = Field(description="one row per strength, in the order requested")
    steering: SweepVector


class ContrastPair(BaseModel):
    """Two texts that differ in the behaviour to steer; the vector points from negative to positive."""

    model_config = ConfigDict(extra="forbid")

    positive: str = Field(min_length=1, max_length=MAX_PAIR_CHARS)
    negative: str = Field(min_length=1, max_length=MAX_PAIR_CHARS)


class ComputeRequest(BaseModel):
    """``POST /v1/vectors/compute``: an ``add`` vector from contrastive pairs, registered as ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    method: Literal["mean-diff", "pca"] = "mean-diff"
    pairs: list[ContrastPair] = Field(min_length=MIN_PAIRS, max_length=MAX_PAIRS)
    layers: list[int] | None = Field(
        default=None, min_length=1, max_length=1024, description="default: the middle half of the layers"
    )
    description: str | None = Field(default=None, max_length=4096)


class VectorNorms(BaseModel):
    """A vector's size per layer. ``relative`` (``add`` vectors): ‖v_l‖ over the served model's mean
    hidden-state norm after layer l, measured at the last token of a fixed set of reference texts."""

    name: str
    sha256: str
    kind: str
    method: str
    layers: list[int]
    norms: dict[str, float] = Field(description="L2 norm of every tensor, by tensor name")
    relative: dict[str, float] | None = Field(description="add vectors: ‖v_l‖ / mean ‖h_l‖, by layer")
