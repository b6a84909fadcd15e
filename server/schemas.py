"""Pydantic bodies of the HTTP API (SPEC §6), requests and responses. Pydantic lives only at the edge.

Token budget of a generation request (one home for each default; every budget is checked against the
``--max-new-tokens`` cap once, by the engine): the request's own ``max_new_tokens`` / ``max_tokens`` /
``max_completion_tokens`` when it names one, else its route's default, lowered to the cap:
``/generate`` 128, ``/v1/chat/completions`` 256, ``/v1/completions`` 16 (OpenAI's documented default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine import SamplingParams
from .vector_dir import VectorInfo

__all__ = [
    "Deleted",
    "BUDGET_HELP",
    "ErrorBody",
    "ErrorDetail",
    "documented_range",
    "FinishReason",
    "GenerateChunk",
    "GenerateRequest",
    "GenerateResponse",
    "Message",
    "ModelCard",
    "ModelList",
    "ProfileBody",
    "ProfileEntry",
    "ProfileInfo",
    "ProfileList",
    "ResolvedVector",
    "SamplingBody",
    "SavedSteering",
    "SteeringBody",
    "SteeringInfo",
    "Status",
    "Stop",
    "TokenLogprobInfo",
    "TopLogprob",
    "Usage",
    "VectorEntry",
    "VectorList",
]

FinishReason = Literal["stop", "length", "cancelled"]


# ---- requests -------------------------------------------------------------------------------------------
class VectorEntry(BaseModel):
    """One entry of a steering profile: a registered vector (``name@sha-prefix`` pins a version)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=140)
    strength: float = Field(default=1.0, ge=-100.0, le=100.0, description="|strength| <= 100")
    layers: list[int] | None = Field(
        default=None, min_length=1, max_length=1024, description="a subset of the artifact's layers"
    )
    positions: Literal["all", "prompt", "generated"] = "all"


class SteeringBody(BaseModel):
    """``{"vectors": [...]}``: an inline steering profile."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[VectorEntry] = Field(default_factory=list, max_length=64)


class ProfileBody(SteeringBody):
    """Body of ``PUT /v1/profiles/{name}``."""

    description: str | None = Field(default=None, max_length=4096)


class Message(BaseModel):
    """A chat message: its role and text (a string, or OpenAI content parts of type ``text``). Other
    OpenAI message fields (``name``, ``tool_calls``, ...) are kept so that the route can refuse them."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; ``ValueError`` naming a content part that is not text (images, audio...)."""
        if not isinstance(self.content, list):
            return self.content or ""
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(
                    f"message content parts of type {part.get('type')!r} are not supported (text only)"
                )
        return "".join(str(p.get("text", "")) for p in self.content)


def documented_range(lo: float, hi: float) -> dict[str, float]:
    """A documented range the engine checks (400 naming the field), not the schema (422)."""
    return {"minimum": lo, "maximum": hi}


Steering = str | SteeringBody | None
Stop = str | list[str] | None
BUDGET_HELP = "at most --max-new-tokens; when not given: {} (lowered to --max-new-tokens)"


class SamplingBody(BaseModel):
    """Decoding settings every generation route takes (SPEC §9.1). Ranges are checked by the engine's
    ``SamplingParams`` (400 naming the field); a setting left out takes the model's
    ``generation_config.json`` value, else the built-in one (the route's ``default_temperature``)."""

    default_temperature: ClassVar[float] = 1.0  # OpenAI's default; /generate is greedy by default
    default_max_tokens: ClassVar[int]  # the route's token budget when the request names none

    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="0: no limit")
    min_p: float | None = Field(default=None, description="0…1", json_schema_extra=documented_range(0, 1))
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop = None
    presence_penalty: float | None = Field(
        default=None, description="-2…2", json_schema_extra=documented_range(-2, 2)
    )
    frequency_penalty: float | None = Field(
        default=None, description="-2…2", json_schema_extra=documented_range(-2, 2)
    )
    repetition_penalty: float | None = Field(
        default=None, description="> 0 (1: none)", json_schema_extra={"exclusiveMinimum": 0, "maximum": 100}
    )
    logit_bias: dict[str, float] | None = Field(
        default=None,
        description="token id -> bias added to its logit (-100…100, at most 300 entries)",
        json_schema_extra={
            "maxProperties": 300,
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", **documented_range(-100, 100)},
        },
    )
    min_tokens: int | None = Field(
        default=None,
        description="no EOS or stop string before this many (<= the token budget)",
        json_schema_extra={"minimum": 0},
    )
    ignore_eos: bool = False
    stream: bool = False
    steering: Steering = None

    def asked_tokens(self) -> int | None:
        """The token budget the request names, if any."""
        raise NotImplementedError

    def logprob_request(self) -> tuple[bool, int]:
        """Whether log-probabilities are asked for, and how many alternatives per token."""
        return False, 0

    def samples(self) -> int:
        """How many samples (OpenAI ``n``)."""
        return 1

    def sampling(self, cap: int, model_defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """The engine's settings for this request; ``cap`` is ``--max-new-tokens``, ``model_defaults``
        the model's generation-config values (they win over the route's default temperature)."""
        asked = self.asked_tokens()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = self.temperature
        if temperature is None:
            temperature = (model_defaults or {}).get("temperature", self.default_temperature)
        logprobs, top = self.logprob_request()
        return SamplingParams(
            max_new_tokens=min(self.default_max_tokens, cap) if asked is None else asked,
            temperature=temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=stops,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            logit_bias=_token_bias(self.logit_bias),
            min_tokens=self.min_tokens or 0,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top,
            n=self.samples(),
        )


def _token_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """``logit_bias`` keyed by token id (JSON keys are strings); ``ValueError`` naming a bad key."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.strip().isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key!r:.40}")
        out[int(key)] = value
    return out


class GenerateRequest(SamplingBody):
    """``POST /generate``: exactly one of ``prompt`` or ``messages``; greedy unless a temperature is given."""

    model_config = ConfigDict(extra="forbid")
    default_temperature: ClassVar[float] = 0.0
    default_max_tokens: ClassVar[int] = 128

    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=1024)
    max_new_tokens: int = Field(
        default=default_max_tokens, ge=1, description=BUDGET_HELP.format(default_max_tokens)
    )

    logprobs: bool = Field(default=False, description="each token's log-probability in the response")
    top_logprobs: int = Field(
        default=0,
        description="alternatives per token (at most 20; needs logprobs)",
        json_schema_extra=documented_range(0, 20),
    )

    def asked_tokens(self) -> int | None:
        return self.max_new_tokens if "max_new_tokens" in self.model_fields_set else None

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs


# ---- responses ------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int = Field(description="the HTTP status")


class ErrorBody(BaseModel):
    """Every error response (SPEC §6)."""

    error: ErrorDetail


class Status(BaseModel):
    status: str


class Deleted(BaseModel):
    deleted: str
    versions: list[str] | None = Field(default=None, description="the sha256 of every version removed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ResolvedVector(BaseModel):
    """One resolved entry of the steering applied: the version used, its strength, layers and positions."""

    name: str
    sha256: str
    strength: float
    layers: list[int] | None = Field(description="the layers it was restricted to (null: all of its layers)")
    positions: Literal["all", "prompt", "generated"]


class SteeringInfo(BaseModel):
    """The steering a response was generated with: everything needed to reproduce it."""

    fingerprint: str = Field(
        description="hash of the resolved composition (versions, strengths, layers, positions)"
    )
    vectors: list[ResolvedVector]
    folded: str | None = Field(
        default=None, description="the saved profile folded into the served model's weights, if any"
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprobInfo(BaseModel):
    """A generated token, its log-probability (``log_softmax`` of the model's logits, steering included,
    before penalties and temperature) and the ``top_logprobs`` most likely tokens."""

    token: str
    logprob: float
    top: list[TopLogprob]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: FinishReason
    usage: Usage
    steering: SteeringInfo
    logprobs: list[TokenLogprobInfo] | None = Field(default=None, description="with logprobs: true")


class GenerateChunk(BaseModel):
    """One ``/generate`` stream event; the last one carries ``finish_reason``, usage and steering."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    steering: SteeringInfo | None = None
    logprobs: list[TokenLogprobInfo] | None = None


class ProfileEntry(BaseModel):
    """An entry of a saved profile, as saved (``layers`` only where the entry restricts them)."""

    name: str
    strength: float
    positions: Literal["all", "prompt", "generated"]
    layers: list[int] | None = None


class SavedSteering(BaseModel):
    vectors: list[ProfileEntry]


class ProfileInfo(BaseModel):
    """A saved profile: every entry pinned (``name@sha256``) when it was saved."""

    name: str
    description: str | None = None
    vectors: list[ProfileEntry]


class ProfileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProfileInfo]


class ModelCard(BaseModel):
    """The served model (with its quantization) or a saved profile (with its parent and steering)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    quantization: str | None = None
    parent: str | None = None
    steering: SavedSteering | None = None
    folded: bool | None = Field(default=None, description="the profile is folded into the model's weights")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VectorList(BaseModel):
    """One page of vectors, sorted by name (``?after=<last_id>`` gets the next one)."""

    object: Literal["list"] = "list"
    data: list[VectorInfo]
    first_id: str | None
    last_id: str | None
    has_more: bool
