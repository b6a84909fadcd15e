"""Admission and the plan of each forward pass, under three budgets:

- rows: at most ``max_rows`` samples run at once (a request with n samples takes n rows);
- KV tokens: a request is admitted only when the pages its samples may ever need (prompt +
  ``max_new_tokens`` each) fit beside what the running requests reserved, so a running row never
  runs out of cache; a request that could never fit is refused at submit (see :meth:`Scheduler.check`);
- tokens per pass: ``max_batched_tokens``. Each step carries one token per decoding row, then fills the
  rest with prompt chunks, shortest remaining prompt first: a long prompt is prefilled a chunk per
  step beside the running streams, and a short prompt arriving behind it is not stuck behind it.
  Beside decoding rows, the prompt tokens of a pass are also paced (:class:`PrefillPacer`) so that the
  pass takes about ``factor`` (2) times a decode-only pass, from the measured cost of recent passes,
  stretched when the rows waiting for their first token outweigh the decoding ones: the streams'
  inter-token time stays bounded whatever the hardware, while a burst of new requests is not admitted
  a sliver at a time (a pass with no decoding row uses the whole budget).

Pages are allocated as a row grows (its reservation guarantees they are there).
"""

from __future__ import annotations

from collections import deque

import torch

from .kv_cache import PagedKVCache
from .request import ContextLengthError
from .sequence import Group, Sequence, Work

__all__ = ["PrefillPacer", "Scheduler"]


class PrefillPacer:
    """Prompt tokens a pass may carry beside ``d`` decoding rows while ``w`` rows wait for their first token.

    Cost model of a pass with d decode tokens and p prompt tokens: t = a + b d + c p (``a`` reads the
    weights), fitted by least squares to the last ``window`` decode-only passes and the last ``window``
    passes with at least ``floor`` prompt tokens (kept apart, so that decode-only passes always anchor
    a + b d, however long a prefill lasts). A decode-only pass of d rows takes t_d = a + b d. A prompt
    token's own cost c_p is read on the safe side: the largest of c and (t - t_d) / p over the last
    ``window // 2`` prompt passes (a chunk deep in a long prompt attends to all the keys before it: it
    costs more than the window's average, and more per token the shorter it is).

    A pass with p prompt tokens takes about t_d + p c_p: it delays d streams by p c_p and brings w
    requests that much closer to their first token. A wait for a first token weighs
    ``first_token_weight`` (k = 2) times a wait for a next one, so the delay allowed grows with k w / d:

        p <= (factor - 1) * max(1, k w / d) * t_d / c_p

    i.e. while k w <= d (a long prompt beside running streams) a pass takes at most ``factor`` (2)
    decode-only passes, and a burst of prompts beside fewer streams is prefilled in proportionally fewer
    passes. The base allowance (factor - 1) t_d / c_p is at least ``floor``, may fall at once and grows
    by at most a quarter (+1) a pass, so that a cheap pass does not make the next one overshoot. While
    the model cannot be fitted (no pass of one of the two kinds yet, or a fit that makes a cost
    negative): the last allowance, at first ``cold`` tokens (times the stretch).
    """

    def __init__(
        self,
        factor: float = 2.0,
        cold: int = 32,
        floor: int = 8,
        window: int = 16,
        first_token_weight: float = 2.0,
    ) -> None:
        if window < 4:
            raise ValueError(f"window must be at least 4 passes, got {window}")
        self.factor, self.cold, self.floor, self.window = factor, cold, floor, window
        self.first_token_weight = first_token_weight
        self._decode: deque[tuple[int, int, float]] = deque(maxlen=window)  # (d, 0, seconds)
        self._prompt: deque[tuple[int, int, float]] = deque(maxlen=window)  # (d, p >= floor, seconds)
        self._last = cold

    def observe(self, n_decode: int, n_prompt: int, seconds: float) -> None:
        """Record one forward pass."""
        if n_prompt == 0:
            self._decode.append((n_decode, 0, seconds))
        elif n_prompt >= self.floor:
            self._prompt.append((n_decode, n_prompt, seconds))

    def fit(self) -> tuple[float, float, float] | None:
        """(a, b, c) of t = a + b d + c p over the recent passes; None while that is not measurable."""
        passes = [*self._decode, *self._prompt]
        if not self._decode or not self._prompt or len(passes) < 3:
            return None
        x = torch.tensor([[1.0, d, p] for d, p, _ in passes], dtype=torch.float64)  # [n, 3]
        y = torch.tensor([[t] for _, _, t in passes], dtype=torch.float64)  # [n, 1]
        a, b, c = torch.linalg.lstsq(x, y, driver="gelsd").solution[:, 0].tolist()  # least norm if singular
        return (a, b, c) if c > 0 else None

    def allowance(self, n_decode: int, room: int, n_waiting: int) -> int:
        """Prompt tokens for a pass with ``n_decode`` decoding rows, ``n_waiting`` rows still prefilling and
        ``room`` tokens left in the budget."""
        if n_decode == 0:
            return room
        stretch = max(1.0, self.first_token_weight * n_waiting / n_decode)
        a, b, c = self.fit() or (0.0, 0.0, 0.0)
        t_d = a + b * n_decode  # a decode-only pass of these rows
        if t_d <= 0:  # no usable fit: keep the last allowance (at first: cold)
            return min(room, int(self._last * stretch))
        recent = list(self._prompt)[-(self.window // 2) :]
        c_p = max(c, *((t - a - b * d) / p for d, p, t in recent))
        paced = int((self.factor - 1) * t_d / c_p)
        self._last = max(self.floor, min(paced, int(1.25 * self._last) + 1))
        return min(room, int(self._last * stretch))


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
        prefilling = sorted(
            (s for s in self.running if s.prefilling and s.finish is None),
            key=lambda s: (len(s.prompt) - s.cached, s.group.arrival),
        )
        budget = self.pacer.allowance(len(works), self.max_batched_tokens - len(works), len(prefilling))
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
