"""Response rendering of the generation routes: one renderer per response shape, for whole responses
and stream chunks alike (``/generate``, OpenAI chat completions, OpenAI completions)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from steering_vectors import CompiledProfile

from .engine import EngineEvent, GenerationResult
from .schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionChunk,
    GenerateChunk,
    GenerateResponse,
    OpenAIUsage,
    ResolvedVector,
    SteeringInfo,
    Usage,
)

__all__ = ["ChatRenderer", "CompletionRenderer", "GenerateRenderer", "Renderer", "steering_info"]


def steering_info(compiled: CompiledProfile, folded: str | None = None) -> SteeringInfo:
    """The ``steering`` block of a response: fingerprint and every resolved entry (version, strength,
    layers, positions); ``folded`` names the profile when it is folded into the weights."""
    vectors = [ResolvedVector.model_validate(r) for r in compiled.resolved]
    return SteeringInfo(fingerprint=compiled.fingerprint, vectors=vectors, folded=folded)


def _usage(prompt_tokens: int, completion_tokens: int) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class Renderer(Protocol):
    """Renders one request's output: the whole response, or the stream chunks of one engine event."""

    def response(self, result: GenerationResult) -> BaseModel: ...

    def chunks(self, event: EngineEvent) -> list[BaseModel]: ...


@dataclass
class GenerateRenderer:
    """``POST /generate``: ``{text, finish_reason, usage, steering}``; stream events ``{text}`` and a last
    one with ``finish_reason``, ``usage`` and ``steering``."""

    steering: SteeringInfo

    def response(self, result: GenerationResult) -> GenerateResponse:
        return GenerateResponse(
            text=result.text,
            finish_reason=result.finish_reason,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            steering=self.steering,
        )

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        if event.finish_reason is None:
            return [GenerateChunk(text=event.text)]
        usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
        chunk = GenerateChunk(
            text=event.text, finish_reason=event.finish_reason, usage=usage, steering=self.steering
        )
        return [chunk]


@dataclass(kw_only=True)
class _OpenAIRenderer:
    """What the OpenAI shapes share: id, creation time, model; the last choice chunk of a stream carries
    the steering block, and a usage chunk follows when ``stream_options.include_usage`` asks for one."""

    objects: ClassVar[tuple[str, str]]  # the ``object`` of a whole response and of a stream chunk

    id: str  # the request id (also the X-Request-Id header and the request log's id)
    steering: SteeringInfo
    model: str
    include_usage: bool = False
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def _header(self, chunk: bool) -> dict[str, Any]:
        kind = self.objects[1] if chunk else self.objects[0]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunks(
        self, cls: type[ChatCompletionChunk | CompletionChunk], choice: BaseModel, event: EngineEvent
    ) -> list[BaseModel]:
        header = self._header(chunk=True)
        if event.finish_reason is None:
            return [cls(**header, choices=[choice])]
        out: list[BaseModel] = [cls(**header, choices=[choice], steering=self.steering)]
        if self.include_usage:
            out.append(cls(**header, choices=[], usage=_usage(event.prompt_tokens, event.completion_tokens)))
        return out


@dataclass(kw_only=True)
class ChatRenderer(_OpenAIRenderer):
    """``POST /v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    objects: ClassVar[tuple[str, str]] = ("chat.completion", "chat.completion.chunk")
    _role_sent: bool = field(init=False, default=False)

    def response(self, result: GenerationResult) -> ChatCompletion:
        message = ChatMessage(role="assistant", content=result.text)
        choice = ChatChoice(index=0, message=message, finish_reason=result.finish_reason, logprobs=None)
        usage = _usage(result.prompt_tokens, result.completion_tokens)
        return ChatCompletion(
            **self._header(chunk=False), choices=[choice], usage=usage, steering=self.steering
        )

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        delta = ChatDelta(content=event.text) if event.text or event.finish_reason is None else ChatDelta()
        if not self._role_sent:  # the first chunk names the role
            delta.role, self._role_sent = "assistant", True
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=event.finish_reason, logprobs=None)
        return self._chunks(ChatCompletionChunk, choice, event)


@dataclass(kw_only=True)
class CompletionRenderer(_OpenAIRenderer):
    """``POST /v1/completions``: ``text_completion`` objects; ``echo`` prefixes the whole text."""

    objects: ClassVar[tuple[str, str]] = ("text_completion", "text_completion")
    echo: str = ""  # the prompt, with ``echo``: before the whole text, or in the first stream chunk

    def response(self, result: GenerationResult) -> Completion:
        choice = CompletionChoice(
            index=0, text=self.echo + result.text, finish_reason=result.finish_reason, logprobs=None
        )
        usage = _usage(result.prompt_tokens, result.completion_tokens)
        return Completion(**self._header(chunk=False), choices=[choice], usage=usage, steering=self.steering)

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        text, self.echo = self.echo + event.text, ""
        choice = CompletionChoice(index=0, text=text, finish_reason=event.finish_reason, logprobs=None)
        return self._chunks(CompletionChunk, choice, event)
