"""Response rendering of the generation routes: one renderer per response shape, for whole responses
and stream chunks alike (``/generate``, OpenAI chat completions, OpenAI completions), with the ``n``
samples of a request as OpenAI's ``choices[i]`` and log-probabilities in each route's shape."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from steering_vectors import CompiledProfile

from .engine import EngineEvent, GenerationResult, TokenLogprob
from .openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    OpenAIUsage,
)
from .schemas import (
    GenerateChunk,
    GenerateResponse,
    ResolvedVector,
    SteeringInfo,
    TokenLogprobInfo,
    TopLogprob,
    Usage,
)

__all__ = [
    "ChatRenderer",
    "CompletionRenderer",
    "GenerateRenderer",
    "Renderer",
    "generate_logprobs",
    "steering_info",
]


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


def generate_logprobs(lps: Sequence[TokenLogprob]) -> list[TokenLogprobInfo]:
    """``/generate``'s ``logprobs``: ``[{token, logprob, top: [{token, logprob}]}]``."""
    return [
        TokenLogprobInfo(
            token=lp.token,
            logprob=lp.logprob,
            top=[TopLogprob(token=t, logprob=v) for _, t, v in lp.top],
        )
        for lp in lps
    ]


def _chat_logprobs(lps: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    content = [
        ChatTokenLogprob(
            **top(lp.token, lp.logprob).model_dump(), top_logprobs=[top(t, v) for _, t, v in lp.top]
        )
        for lp in lps
    ]
    return ChatLogprobs(content=content)


def _completion_logprobs(lps: Sequence[TokenLogprob], offset: int, alternatives: bool) -> CompletionLogprobs:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in lps],
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{t: v for _, t, v in lp.top} for lp in lps] if alternatives else None,
        text_offset=offsets,
    )


class Renderer(Protocol):
    """Renders one request's output: the whole response (one result per sample), or the stream chunks of
    one engine event."""

    def response(self, results: list[GenerationResult]) -> BaseModel: ...

    def chunks(self, event: EngineEvent) -> list[BaseModel]: ...


@dataclass
class GenerateRenderer:
    """``POST /generate``: ``{text, finish_reason, usage, steering[, logprobs]}``; stream events ``{text}``
    (with their tokens' ``logprobs`` when asked) and a last one with ``finish_reason``, ``usage`` and
    ``steering``."""

    steering: SteeringInfo
    logprobs: bool = False

    def response(self, results: list[GenerationResult]) -> GenerateResponse:
        result = results[0]
        return GenerateResponse(
            text=result.text,
            finish_reason=result.finish_reason,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            steering=self.steering,
            logprobs=generate_logprobs(result.logprobs) if self.logprobs else None,
        )

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        chunk = GenerateChunk(text=event.text)
        if self.logprobs:
            chunk.logprobs = generate_logprobs(event.logprobs)
        if event.finish_reason is not None:
            chunk.finish_reason = event.finish_reason
            chunk.usage = Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
            chunk.steering = self.steering
        return [chunk]


@dataclass(kw_only=True)
class _OpenAIRenderer:
    """What the OpenAI shapes share: id, creation time, model; the last chunk of each choice in a stream
    carries the steering block, and a usage chunk (summed over the ``n`` samples) follows the last one
    when ``stream_options.include_usage`` asks for it."""

    objects: ClassVar[tuple[str, str]]  # the ``object`` of a whole response and of a stream chunk

    id: str  # the request id (also the X-Request-Id header and the request log's id)
    steering: SteeringInfo
    model: str
    include_usage: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    created: int = field(init=False, default_factory=lambda: int(time.time()))
    _finished: int = field(init=False, default=0)
    _completion_tokens: int = field(init=False, default=0)

    def _header(self, chunk: bool) -> dict[str, Any]:
        kind = self.objects[1] if chunk else self.objects[0]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage_of(self, results: list[GenerationResult]) -> OpenAIUsage:
        return _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))

    def _chunks(
        self, cls: type[ChatCompletionChunk | CompletionChunk], choice: BaseModel, event: EngineEvent
    ) -> list[BaseModel]:
        header = self._header(chunk=True)
        if event.finish_reason is None:
            return [cls(**header, choices=[choice])]
        out: list[BaseModel] = [cls(**header, choices=[choice], steering=self.steering)]
        self._finished += 1
        self._completion_tokens += event.completion_tokens
        if self.include_usage and self._finished == self.n:
            usage = _usage(event.prompt_tokens, self._completion_tokens)
            out.append(cls(**header, choices=[], usage=usage))
        return out


@dataclass(kw_only=True)
class ChatRenderer(_OpenAIRenderer):
    """``POST /v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    objects: ClassVar[tuple[str, str]] = ("chat.completion", "chat.completion.chunk")
    _role_sent: set[int] = field(init=False, default_factory=set)

    def response(self, results: list[GenerationResult]) -> ChatCompletion:
        choices = [
            ChatChoice(
                index=r.index,
                message=ChatMessage(role="assistant", content=r.text),
                finish_reason=r.finish_reason,
                logprobs=_chat_logprobs(r.logprobs) if self.logprobs else None,
            )
            for r in results
        ]
        usage = self._usage_of(results)
        header = self._header(chunk=False)
        return ChatCompletion(**header, choices=choices, usage=usage, steering=self.steering)

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        delta = ChatDelta(content=event.text) if event.text or event.finish_reason is None else ChatDelta()
        if event.index not in self._role_sent:  # each choice's first chunk names the role
            delta.role = "assistant"
            self._role_sent.add(event.index)
        logprobs = _chat_logprobs(event.logprobs) if self.logprobs else None
        choice = ChatChunkChoice(
            index=event.index, delta=delta, finish_reason=event.finish_reason, logprobs=logprobs
        )
        return self._chunks(ChatCompletionChunk, choice, event)


@dataclass(kw_only=True)
class CompletionRenderer(_OpenAIRenderer):
    """``POST /v1/completions``: ``text_completion`` objects; ``echo`` prefixes each choice's text."""

    objects: ClassVar[tuple[str, str]] = ("text_completion", "text_completion")
    echo: str = ""  # the prompt, with ``echo``: before the whole text, or in each choice's first chunk
    _offsets: dict[int, int] = field(init=False, default_factory=dict)  # streamed characters per choice

    def _logprobs(self, lps: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs | None:
        return _completion_logprobs(lps, offset, self.top_logprobs > 0) if self.logprobs else None

    def response(self, results: list[GenerationResult]) -> Completion:
        choices = [
            CompletionChoice(
                index=r.index,
                text=self.echo + r.text,
                finish_reason=r.finish_reason,
                logprobs=self._logprobs(r.logprobs, len(self.echo)),
            )
            for r in results
        ]
        usage = self._usage_of(results)
        return Completion(**self._header(chunk=False), choices=choices, usage=usage, steering=self.steering)

    def chunks(self, event: EngineEvent) -> list[BaseModel]:
        first = event.index not in self._offsets
        text = (self.echo if first else "") + event.text
        start = self._offsets.get(event.index, 0) + (len(self.echo) if first else 0)
        self._offsets[event.index] = start + len(event.text)
        choice = CompletionChoice(
            index=event.index,
            text=text,
            finish_reason=event.finish_reason,
            logprobs=self._logprobs(event.logprobs, start),
        )
        return self._chunks(CompletionChunk, choice, event)
