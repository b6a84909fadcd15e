"""Engine-side state of a request (a :class:`Group` of n samples) and of each sample (a :class:`Sequence`,
one row of the running batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steering_vectors import CompiledProfile

from .detokenizer import IncrementalDetokenizer
from .params import SamplingParams
from .request import RequestHandle, TokenLogprob

__all__ = ["Group", "Sequence", "Work"]


@dataclass(eq=False)
class Group:
    """One request: its prompt, settings, steering slot and its n samples."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams  # resolved: no field is None but seed
    profile: CompiledProfile | None
    arrival: float
    pages_per_seq: int  # KV pages each sample may need (prompt + max_new_tokens)
    slot: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    admitted: float = 0.0

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    """One sample: a row of the batch. Its KV cache holds ``cached`` tokens of ``prompt + out``.

    Sample 0 prefills the prompt; samples 1..n-1 get a copy of its prompt cache when the prefill is
    done (``forked``) and draw their first token from the same logits.
    """

    group: Group
    index: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    row: int = -1  # entry in the penalty table
    pages: list[int] = field(default_factory=list)
    cached: int = 0
    out: list[int] = field(default_factory=list)
    finish: str | None = None
    forked: bool = False
    last_token_time: float = 0.0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prompt(self) -> list[int]:
        return self.group.prompt

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def length(self) -> int:
        """Tokens of the row so far (prompt and sampled)."""
        return len(self.group.prompt) + len(self.out)

    @property
    def prefilling(self) -> bool:
        return self.index == 0 and self.cached < len(self.group.prompt)

    @property
    def decoding(self) -> bool:
        """Has a sampled token that is not in the cache yet."""
        return self.finish is None and bool(self.out) and self.cached == self.length - 1


@dataclass(eq=False)
class Work:
    """A sequence's share of one forward pass: ``tokens`` at positions ``start..``; ``decode`` marks the
    one generated token of a decoding row. ``samples``: the logits of the last token are wanted."""

    seq: Sequence
    start: int
    tokens: list[int]
    decode: bool
    samples: bool
