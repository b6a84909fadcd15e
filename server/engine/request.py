"""What a caller gets back: the request handle, streamed events, results and the engine's errors.

A request with ``n`` samples has one handle; every event names its sample (``index``), and the stream
ends once all n have finished. An event's ``logprobs`` are those of the tokens sampled since the
previous event of that sample. An error inside a step ends only the samples it concerns: their last
event has ``finish_reason == "error"`` and ``error`` set (the HTTP layer answers 500 / an SSE error).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = [
    "ContextLengthError",
    "DrainingError",
    "EngineEvent",
    "GenerationResult",
    "QueueFullError",
    "RequestHandle",
    "TokenLogprob",
]


class QueueFullError(RuntimeError):
    """The waiting queue is full (HTTP 429); ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DrainingError(RuntimeError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


class ContextLengthError(ValueError):
    """The request can never fit: the model's context or the KV cache is too small for it (HTTP 400)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its id, text, log-probability and the ``top_logprobs`` most likely tokens.

    ``top`` holds ``(token_id, text, logprob)`` in decreasing probability. Log-probabilities are
    ``log_softmax`` of the model's float32 logits (steering included; before penalties and temperature).
    """

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class EngineEvent:
    """A streamed piece of output: a text delta, and on a sample's last event its finish reason and usage.

    ``finish_reason`` is ``stop``, ``length``, ``cancelled`` or ``error`` (then ``error`` says what
    failed). ``prompt_tokens`` is the request's prompt (counted once for all n samples).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The whole output of one sample."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None


class RequestHandle:
    """The caller's side of one request: stream events, await the results, or cancel."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None, n: int = 1) -> None:
        self.id = request_id
        self.n = n
        self._loop = loop
        self._aq: asyncio.Queue[EngineEvent] | None = asyncio.Queue() if loop is not None else None
        self._tq: queue.Queue[EngineEvent] = queue.Queue()
        self.cancelled = False
        self.timings: dict[str, float] = {}

    def cancel(self) -> None:
        """Ask the engine to drop this request; its rows are freed before the next step."""
        self.cancelled = True

    def _push(self, event: EngineEvent) -> None:
        if self._aq is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._tq.put(event)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Yield events until every sample has sent the one that carries ``finish_reason``."""
        if self._aq is None:
            raise RuntimeError("this handle was submitted without an event loop; use wait()")
        left = self.n
        while left:
            ev = await self._aq.get()
            yield ev
            left -= ev.finish_reason is not None

    async def results(self) -> list[GenerationResult]:
        """Await the whole output of every sample, in sample order."""
        return self._collect([ev async for ev in self.events()])

    async def result(self) -> GenerationResult:
        """Await the whole output (of sample 0 when n > 1: use :meth:`results`)."""
        return (await self.results())[0]

    def wait_all(self, timeout: float | None = None) -> list[GenerationResult]:
        """Block (in a non-async caller) until every sample finishes."""
        events, left = [], self.n
        while left:
            events.append(self._tq.get(timeout=timeout))
            left -= events[-1].finish_reason is not None
        return self._collect(events)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; the result of sample 0."""
        return self.wait_all(timeout)[0]

    def _collect(self, events: list[EngineEvent]) -> list[GenerationResult]:
        out = []
        for i in range(self.n):
            mine = [ev for ev in events if ev.index == i]
            last = mine[-1]
            out.append(
                GenerationResult(
                    "".join(ev.text for ev in mine),
                    last.finish_reason or "cancelled",
                    last.prompt_tokens,
                    last.completion_tokens,
                    dict(self.timings),
                    index=i,
                    logprobs=tuple(lp for ev in mine for lp in ev.logprobs),
                    error=last.error,
                )
            )
        return out
