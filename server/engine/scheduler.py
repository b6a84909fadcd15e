"""Admission and the plan of each forward pass, under three budgets:

- rows: at most ``max_rows`` samples run at once (a request with n samples takes n rows);
- KV tokens: a request is admitted only when the pages its samples may ever need (prompt +
  ``max_new_tokens`` each) fit beside what the running requests reserved, so a running row never
  runs out of cache; a request that could never fit is refused at submit (see :meth:`Scheduler.check`);
- tokens per pass: ``max_batched_tokens``. Each step carries one token per decoding row, then fills the
  rest with prompt chunks, shortest remaining prompt first: a long prompt is prefilled a chunk per
  step beside the running streams, and a short prompt arriving behind it is not stuck behind it.
  Beside decoding rows, the prompt tokens of a pass are also paced (:class:`PrefillPacer`) so that the
  pass takes about ``factor`` (2) times a decode-only pass, from the measured cost of recent passes:
  the streams' inter-token time stays bounded whatever the hardware, while a pass with no decoding row
  (a burst of new requests) uses the whole budget.

Pages are allocated as a row grows (its reservation guarantees they are there).
"""

from __future__ import annotations

import statistics
from collections import deque

from .kv_cache import PagedKVCache
from .request import ContextLengthError
from .sequence import Group, Sequence, Work

__all__ = ["PrefillPacer", "Scheduler"]


class PrefillPacer:
    """Prompt tokens a pass may carry beside ``n`` decoding rows.

    With t_d the time of a decode-only pass and c_p the marginal time of one prompt token, a pass with
    p prompt tokens takes about t_d + p c_p; keeping it within ``factor * t_d`` gives
    p <= (factor - 1) t_d / c_p. Both come from recent passes, read conservatively against noise: t_d is
    the median of the last ``window`` decode-only passes, c_p the largest of the last ``window``
    per-token samples (passes with at least ``floor`` prompt tokens), and the allowance at most doubles
    from one pass to the next. Until both are measured: ``cold`` tokens.
    """

    def __init__(self, factor: float = 2.0, cold: int = 32, floor: int = 8, window: int = 8) -> None:
        self.factor, self.cold, self.floor = factor, cold, floor
        self._decode: deque[float] = deque(maxlen=window)
        self._prompt: deque[float] = deque(maxlen=window)
        self._last = cold

    def observe(self, n_decode: int, n_prompt: int, seconds: float) -> None:
        """Record one forward pass."""
        if n_prompt == 0:
            self._decode.append(seconds)
        elif n_prompt >= self.floor and n_decode == 0:  # includes reading the weights: on the safe side
            self._prompt.append(seconds / n_prompt)
        elif n_prompt >= self.floor and self._decode:
            self._prompt.append(max(seconds - statistics.median(self._decode), 0.0) / n_prompt)

    def allowance(self, n_decode: int, room: int) -> int:
        """Prompt tokens for a pass with ``n_decode`` decoding rows and ``room`` tokens left in the budget."""
        if n_decode == 0:
            return room
        if not self._decode or not self._prompt:
            return min(room, self.cold)
        t_d, c_p = statistics.median(self._decode), max(self._prompt)
        paced = int((self.factor - 1) * t_d / c_p) if c_p > 0 else room
        self._last = max(self.floor, min(paced, 2 * self._last))
        return min(room, self._last)


class Scheduler:
    """Who runs, and which tokens each forward pass carries. The engine thread owns it, except that
    :attr:`waiting` is shared with submitters under the engine's lock."""

    def __init__(
        self,
        cache: PagedKVCache,
        *,
        max_rows: int,
        max_batched_tokens: int,
        pacer: PrefillPacer | None = None,
    ) -> None:
        if max_batched_tokens < max_rows:
            raise ValueError(
                f"max_batched_tokens ({max_batched_tokens}) must be at least max_batch_size ({max_rows}): "
                "every running row decodes one token per step"
            )
        self.cache = cache
        self.max_rows, self.max_batched_tokens = max_rows, max_batched_tokens
        self.waiting: deque[Group] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0  # pages reserved by the running samples
        self._free_rows = list(range(max_rows))
        self.pacer = pacer or PrefillPacer()

    # ---- admission ---------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_new_tokens: int, n: int) -> int:
        """Pages one sample may need; raises :class:`ContextLengthError` if the request can never run."""
        if n > self.max_rows:
            raise ContextLengthError(f"n={n} samples need {n} rows; this engine runs {self.max_rows}")
        pages = self.cache.pages_for(prompt_tokens + max_new_tokens)
        if n * pages > self.cache.num_pages:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} (x{n} samples) needs "
                f"{n * pages * self.cache.page_size} KV cache tokens; kv_cache_tokens is "
                f"{self.cache.capacity_tokens}"
            )
        return pages

    def fits(self, group: Group) -> bool:
        """Whether ``group`` can start now (rows and KV reservation)."""
        n = group.params.n
        return len(self._free_rows) >= n and self.reserved + n * group.pages_per_seq <= self.cache.num_pages

    def start(self, group: Group) -> None:
        """Make ``group``'s samples running rows (after :meth:`fits`)."""
        for seq in group.seqs:
            seq.row = self._free_rows.pop()
            self.running.append(seq)
        self.reserved += len(group.seqs) * group.pages_per_seq

    def remove(self, seq: Sequence) -> None:
        """A finished sample leaves: its row, pages and reservation are freed."""
        if seq.row < 0:
            return
        self.running.remove(seq)
        self.cache.free(seq.pages)
        seq.pages = []
        self._free_rows.append(seq.row)
        seq.row = -1
        self.reserved -= seq.group.pages_per_seq

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    # ---- one step ----------------------------------------------------------------------------
    def _grow(self, seq: Sequence, tokens: int) -> None:
        need = self.cache.pages_for(tokens) - len(seq.pages)
        if need > 0:
            seq.pages.extend(self.cache.allocate(need))

    def plan(self) -> tuple[list[Work], list[tuple[Sequence, BaseException]]]:
        """This step's work: decode tokens first, then prompt chunks within the token budget; and the
        rows whose pages could not be allocated (their reservation makes that an internal error)."""
        works: list[Work] = []
        failed: list[tuple[Sequence, BaseException]] = []
        for seq in self.running:
            if seq.decoding:
                try:
                    self._grow(seq, seq.length)
                except Exception as e:  # noqa: BLE001 - that row fails, the others go on
                    failed.append((seq, e))
                    continue
                works.append(Work(seq, seq.cached, [seq.out[-1]], decode=True, samples=True))
        budget = self.pacer.allowance(len(works), self.max_batched_tokens - len(works))
        prefilling = sorted(
            (s for s in self.running if s.prefilling and s.finish is None),
            key=lambda s: (len(s.prompt) - s.cached, s.group.arrival),
        )
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(len(seq.prompt) - seq.cached, budget)
            stop = seq.cached + n
            try:
                self._grow(seq, stop)
            except Exception as e:  # noqa: BLE001
                failed.append((seq, e))
                continue
            chunk = seq.prompt[seq.cached : stop]
            works.append(Work(seq, seq.cached, chunk, decode=False, samples=stop == len(seq.prompt)))
            budget -= n
        return works, failed

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Give the parent's siblings a copy of its prompt cache; returns the samples to draw for."""
        siblings = [s for s in parent.group.seqs if s is not parent and s.finish is None]
        for sib in siblings:
            self._grow(sib, len(parent.prompt))
            self.cache.copy_prefix(parent.pages, sib.pages, len(parent.prompt))
            sib.cached, sib.forked = len(parent.prompt), True
        return [parent, *siblings]
