"""Pydantic bodies of the OpenAI-compatible routes (SPEC §6, §9.1–9.2): requests, whole responses and
stream chunks, log-probabilities in OpenAI's two shapes (chat: ``choices[i].logprobs.content``; legacy
completions: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import BUDGET_HELP, FinishReason, Message, SamplingBody, SteeringInfo, Usage, documented_range

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "ChatTokenLogprob",
    "ChatTopLogprob",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "OpenAIUsage",
]


# ---- requests -------------------------------------------------------------------------------------------
class _OpenAIBase(SamplingBody):
    """What both OpenAI routes take. Other fields are kept (``model_extra``): documented OpenAI parameters
    this server does not serve are refused by name, unknown ones ignored with a warning in the log."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(
        default=1,
        ge=1,
        description="samples sharing one prefill (at most 16)",
        json_schema_extra={"maximum": 16},
    )
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))

    def samples(self) -> int:
        return self.n


class ChatCompletionRequest(_OpenAIBase):
    """``POST /v1/chat/completions`` (the subset of OpenAI's body that applies)."""

    default_max_tokens: ClassVar[int] = 256

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, description=BUDGET_HELP.format(default_max_tokens))
    max_completion_tokens: int | None = Field(default=None, ge=1, description="overrides max_tokens")
    logprobs: bool | None = Field(default=None, description="each token's log-probability")
    top_logprobs: int | None = Field(
        default=None,
        description="alternatives per token (0…20; needs logprobs)",
        json_schema_extra=documented_range(0, 20),
    )

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


class CompletionRequest(_OpenAIBase):
    """``POST /v1/completions``."""

    default_max_tokens: ClassVar[int] = 16

    prompt: str | list[str]
    max_tokens: int | None = Field(
        default=default_max_tokens, ge=1, description=BUDGET_HELP.format(default_max_tokens)
    )
    echo: bool = False
    logprobs: int | None = Field(
        default=None,
        description="log-probabilities of generated tokens, with this many alternatives (0…20)",
        json_schema_extra=documented_range(0, 20),
    )

    def asked_tokens(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else None

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


# ---- responses ------------------------------------------------------------------------------------------
class OpenAIUsage(Usage):
    total_tokens: int


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    """``choices[i].logprobs`` of a chat completion (of a stream chunk: the tokens of its delta)."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """``choices[i].logprobs`` of a legacy completion (of a stream chunk: the tokens of its text)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None


class ChatDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class _OpenAIObject(BaseModel):
    """What OpenAI's completion objects and their stream chunks share. In a stream, each choice's last
    chunk carries the steering block and a usage chunk (no choices) follows when ``include_usage`` asks."""

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
