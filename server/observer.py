"""What the engine reports while it runs: a small typed protocol (``server.metrics.Metrics`` implements it).

The engine calls these methods on its own thread; an implementation must be cheap and thread-safe.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["NULL_OBSERVER", "EngineObserver"]


@runtime_checkable
class EngineObserver(Protocol):
    """Callbacks of the engine loop (schedule, forward, sample, postprocess)."""

    def set_queue(self, *, running: int, waiting: int) -> None:
        """Current sizes of the running batch and of the admission queue."""

    def observe_queue_wait(self, seconds: float) -> None:
        """Time from a request's arrival to its admission into the running batch."""

    def observe_batch(self, rows: int) -> None:
        """Rows in one forward step."""

    def observe_ttft(self, seconds: float) -> None:
        """Time from a request's arrival to its first generated token."""

    def observe_inter_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one request."""

    def add_tokens(self, *, prompt: int = 0, generated: int = 0) -> None:
        """Prompt and generated tokens of a finished request."""


class _NullObserver(EngineObserver):
    """Ignores every callback (the protocol's methods do nothing): an engine without metrics."""


NULL_OBSERVER: EngineObserver = _NullObserver()
