"""Pydantic bodies of the HTTP API (SPEC §6), requests and responses. Pydantic lives only at the edge.

Token budget of a generation request (one home for each default; every budget is checked against the
``--max-new-tokens`` cap once, by the engine): the request's own ``max_new_tokens`` / ``max_tokens`` /
``max_completion_tokens`` when it names one, else its route's default, lowered to the cap:
``/generate`` 128, ``/v1/chat/completions`` 256, ``/v1/completions`` 16 (OpenAI's documented default).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine import SamplingParams
from .vector_dir import VectorInfo

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionRequest",
    "Deleted",
    "ErrorBody",
    "ErrorDetail",
    "GenerateChunk",
    "GenerateRequest",
    "GenerateResponse",
    "Message",
    "ModelCard",
    "ModelList",
    "OpenAIUsage",
    "ProfileBody",
    "ProfileEntry",
    "ProfileInfo",
    "ProfileList",
    "ResolvedVector",
    "SavedSteering",
    "SteeringBody",
    "SteeringInfo",
    "Status",
    "Usage",
    "VectorEntry",
    "VectorList",
]

#: "error": the engine step that ran the request failed (its rows end, the server carries on)
FinishReason = Literal["stop", "length", "cancelled", "error"]


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


Steering = str | SteeringBody | None
Stop = str | list[str] | None
_BUDGET = "at most --max-new-tokens; when not given: {} (lowered to --max-new-tokens)"


class _Sampling(BaseModel):
    """Decoding settings every generation route takes."""

    default_temperature: ClassVar[float] = 1.0  # OpenAI's default; /generate is greedy by default
    default_max_tokens: ClassVar[int]  # the route's token budget when the request names none

    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: Stop = None
    stream: bool = False
    steering: Steering = None

    def asked_tokens(self) -> int | None:
        """The token budget the request names, if any."""
        raise NotImplementedError

    def sampling(self, cap: int) -> SamplingParams:
        """The engine's settings for this request; ``cap`` is ``--max-new-tokens``."""
        asked = self.asked_tokens()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=min(self.default_max_tokens, cap) if asked is None else asked,
            temperature=self.default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stops,
        )


class GenerateRequest(_Sampling):
    """``POST /generate``: exactly one of ``prompt`` or ``messages``; greedy unless a temperature is given."""

    model_config = ConfigDict(extra="forbid")
    default_temperature: ClassVar[float] = 0.0
    default_max_tokens: ClassVar[int] = 128

    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=1024)
    max_new_tokens: int = Field(
        default=default_max_tokens, ge=1, description=_BUDGET.format(default_max_tokens)
    )

    def asked_tokens(self) -> int | None:
        return self.max_new_tokens if "max_new_tokens" in self.model_fields_set else None


class _OpenAIBase(_Sampling):
    """What both OpenAI routes take. Other fields are kept (``model_extra``): documented OpenAI parameters
    this server does not serve are refused by name, unknown ones ignored with a warning in the log."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(default=1, ge=1)
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions`` (the subset of OpenAI's body that applies)."""

    default_max_tokens: ClassVar[int] = 256

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, description=_BUDGET.format(default_max_tokens))
    max_completion_tokens: int | None = Field(default=None, ge=1, description="overrides max_tokens")

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions``."""

    default_max_tokens: ClassVar[int] = 16

    prompt: str | list[str]
    max_tokens: int | None = Field(
        default=default_max_tokens, ge=1, description=_BUDGET.format(default_max_tokens)
    )
    echo: bool = False

    def asked_tokens(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else None


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


class OpenAIUsage(Usage):
    total_tokens: int


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


class GenerateResponse(BaseModel):
    text: str
    finish_reason: FinishReason
    usage: Usage
    steering: SteeringInfo


class GenerateChunk(BaseModel):
    """One ``/generate`` stream event; the last one carries ``finish_reason``, usage and steering."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    steering: SteeringInfo | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: None


class ChatDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None


class _OpenAIObject(BaseModel):
    """What OpenAI's completion objects and their stream chunks share. In a stream, the last choice chunk
    carries the steering block and a usage chunk (no choices) follows when ``include_usage`` asks."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: OpenAIUsage | None = None
    steering: SteeringInfo | None = None


class ChatCompletion(_OpenAIObject):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: OpenAIUsage
    steering: SteeringInfo


class ChatCompletionChunk(_OpenAIObject):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class Completion(_OpenAIObject):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: OpenAIUsage
    steering: SteeringInfo


class CompletionChunk(_OpenAIObject):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


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
