"""Sampling, vectorised over the rows of a step: pure functions on logits [R, V] and per-row settings [R].

Order, per row: penalties and logit bias on the model's logits, then (if sampling) temperature,
min-p, top-k and top-p, then one draw. Log-probabilities are taken from the model's raw float32
logits, before any of that. Rows whose settings are neutral (penalty 0 or 1, no bias) are left
bitwise unchanged by the operators that do not concern them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .request import TokenLogprob
from .sequence import Sequence

__all__ = [
    "PenaltyTable",
    "RowSampler",
    "SamplingBatch",
    "apply_logit_bias",
    "apply_penalties",
    "ban_tokens",
    "filter_probs",
    "sample",
    "token_logprobs",
]


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Repetition (HF/CTRL) then frequency/presence (OpenAI) penalties.

    logits [R, V]; counts [R, V] how often each token was generated; seen [R, V] bool, token in the
    prompt or generated; presence, frequency, repetition [R].

        l' = l / p  if l > 0 else  l * p           for seen tokens   (p = repetition)
        l'' = l' - frequency * count - presence * (count > 0)
    """
    rep = repetition[:, None]  # [R, 1]
    out = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return out - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_logit_bias(
    logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``l[rows[i], tokens[i]] += values[i]`` (each (row, token) pair at most once). logits [R, V]."""
    return logits.index_put((rows, tokens), values, accumulate=True)


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``l[rows[i], tokens[i]] = -inf`` (e.g. EOS before ``min_tokens``). logits [R, V]."""
    return logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device))


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p of the chosen tokens and the k most likely ones, from ``log_softmax(logits)``.

    logits [R, V] (the model's, float32); tokens [R] -> (logprob [R], top ids [R, k], top logprobs [R, k]).
    """
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = lp.gather(1, tokens[:, None])[:, 0]  # [R]
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, top_ids, top_lp


def filter_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """The distribution a sampling row draws from: probs [R, V], 0 for dropped tokens (not renormalised).

    p = softmax(l / T). Ranked decreasingly, a token stays when its rank < top_k (0: no limit), when the
    mass of the better tokens within the top k, renormalised over the top k, is < top_p (so the first
    always stays), and when p >= min_p * p_max: top-k, top-p and min-p one after the other, as in
    transformers and vLLM.
    """
    V = logits.shape[-1]
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)  # [R, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [R]
    if not bool(((k < V) | (top_p < 1) | (min_p > 0)).any()):
        return probs
    kmax = int(k.max())
    # [R, K] ranked decreasingly (top-k when every row limits k: no full sort)
    ranked, order = probs.topk(kmax, dim=-1) if kmax < V else probs.sort(dim=-1, descending=True)
    in_k = torch.arange(kmax, device=probs.device)[None, :] < k[:, None]  # [R, K]
    top = ranked * in_k
    before = (top.cumsum(-1) - top) / top.sum(-1, keepdim=True)  # [R, K] renormalised mass of the better
    keep = in_k & (before < top_p[:, None]) & (ranked >= min_p[:, None] * ranked[:, :1])
    return torch.zeros_like(probs).scatter(1, order, ranked * keep)  # back in vocabulary order


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """One token per row. logits [R, V]; temperature, top_p, min_p, uniforms [R]; top_k [R] (0: all).

    temperature 0 is greedy (argmax). Otherwise the draw is the first token, in vocabulary order, whose
    cumulative kept mass (:func:`filter_probs`) exceeds u * (total kept mass), u ~ U[0, 1) per row; a
    row's draw depends only on its own logits, settings and u, never on the other rows.
    """
    greedy = logits.argmax(-1)  # [R]
    if not bool((temperature > 0).any()):
        return greedy
    cdf = filter_probs(logits, temperature, top_k, top_p, min_p).cumsum(-1)  # [R, V]
    u = uniforms[:, None] * cdf[:, -1:]  # [R, 1]
    picked = torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[-1] - 1)[:, 0]  # first cdf > u
    return torch.where(temperature > 0, picked, greedy)


@dataclass
class SamplingBatch:
    """The settings of the rows of one step, gathered into tensors ([R] each unless noted)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    uniforms: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    table_rows: torch.Tensor  # [R] each row's entry in the penalty table
    penalised: bool  # some row has a penalty
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, tokens, values) [K]
    ban: tuple[torch.Tensor, torch.Tensor] | None  # (rows, tokens) [K]
    logprob_rows: torch.Tensor  # [R'] rows that want logprobs
    top_logprobs: int  # the largest number of alternatives a row wants

    def process(self, logits: torch.Tensor, table: PenaltyTable) -> torch.Tensor:
        """Penalties, bias and bans: logits [R, V] -> [R, V] (a new tensor)."""
        out = logits
        if self.penalised:
            counts, seen = table.counts[self.table_rows], table.seen[self.table_rows]  # [R, V]
            out = apply_penalties(out, counts, seen, self.presence, self.frequency, self.repetition)
        if self.bias is not None:
            out = apply_logit_bias(out, *self.bias)
        if self.ban is not None:
            out = ban_tokens(out, *self.ban)
        return out

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.min_p, self.uniforms)


class PenaltyTable:
    """Per-row token statistics for the penalties: counts [rows, V] of generated tokens and seen [rows, V]
    (prompt or generated). A row is reset when a sample takes it."""

    def __init__(self, rows: int, vocab: int, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(rows, vocab, device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def reset(self, row: int, prompt: list[int]) -> None:
        self.counts[row] = 0.0
        self.seen[row] = False
        if prompt:
            self.seen[row, torch.tensor(prompt, device=self.seen.device)] = True

    def add(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one generated token per row: rows, tokens [R]."""
        self.counts.index_put_(
            (rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True
        )
        self.seen[rows, tokens] = True


class RowSampler:
    """Draws the next token of each row: gathers the rows' settings, applies :func:`sample` and friends,
    keeps the penalty table, and isolates a failing row (a failed batched draw is redone row by row)."""

    def __init__(self, rows: int, vocab: int, eos_ids: set[int], device: torch.device | str = "cpu") -> None:
        self.table = PenaltyTable(rows, vocab, device)
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        self.device = device
        self.rng = torch.Generator().manual_seed(torch.seed())

    def reset(self, seq: Sequence) -> None:
        """A sample takes a table row."""
        rep = seq.params.repetition_penalty
        self.table.reset(seq.row, seq.prompt if rep is not None and rep != 1.0 else [])

    def gather(self, rows: list[Sequence]) -> SamplingBatch:
        """The rows' settings as tensors (the only per-row loop: building them)."""
        ps = [r.params for r in rows]
        dev = self.device

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=dev)

        temps = [p.temperature for p in ps]
        uniforms = [
            float(torch.rand((), generator=r.generator or self.rng)) if t else 0.0
            for r, t in zip(rows, temps, strict=True)
        ]
        presence, frequency = col([p.presence_penalty for p in ps]), col([p.frequency_penalty for p in ps])
        repetition = col([p.repetition_penalty for p in ps])
        bias = ban = None
        with_bias = [(i, t, v) for i, p in enumerate(ps) for t, v in p.logit_bias.items()]
        if with_bias:
            i, t, v = zip(*with_bias, strict=True)
            bias = (col(i, torch.long), col(t, torch.long), col(v))
        banned = [
            i
            for i, (r, p) in enumerate(zip(rows, ps, strict=True))
            if len(r.out) < p.min_tokens and not p.ignore_eos
        ]
        if banned and len(self.eos):
            ban = (col(banned, torch.long).repeat_interleave(len(self.eos)), self.eos.repeat(len(banned)))
        want = [i for i, p in enumerate(ps) if p.logprobs]
        return SamplingBatch(
            temperature=col(temps),
            top_k=col([p.top_k for p in ps], torch.long),
            top_p=col([p.top_p for p in ps]),
            min_p=col([p.min_p for p in ps]),
            uniforms=col(uniforms),
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            table_rows=col([r.row for r in rows], torch.long),
            penalised=bool((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any()),
            bias=bias,
            ban=ban,
            logprob_rows=col(want, torch.long),
            top_logprobs=max((ps[i].top_logprobs for i in want), default=0),
        )

    def draw(
        self, rows: list[Sequence], logits: torch.Tensor, token_text: Callable[[list[int]], list[str]]
    ) -> list[tuple[int, TokenLogprob | None] | BaseException]:
        """(token, log-prob record or None) per row of logits [R, V]; an exception for a row that failed."""
        try:
            return list(self._draw(rows, logits, token_text))
        except Exception:  # noqa: BLE001 - find the rows at fault
            out: list[tuple[int, TokenLogprob | None] | BaseException] = []
            for i, row in enumerate(rows):
                try:
                    out += self._draw([row], logits[i : i + 1], token_text)
                except Exception as e:  # noqa: BLE001 - that row's caller gets the error
                    out.append(e)
            return out

    def _draw(self, rows, logits, token_text) -> list[tuple[int, TokenLogprob | None]]:
        batch = self.gather(rows)
        tokens = batch.draw(batch.process(logits, self.table))  # [R]
        self.table.add(batch.table_rows, tokens)
        records: list[TokenLogprob | None] = [None] * len(rows)
        if len(batch.logprob_rows):
            lr = batch.logprob_rows
            chosen, top_ids, top_lp = token_logprobs(logits[lr], tokens[lr], batch.top_logprobs)
            for j, i in enumerate(lr.tolist()):
                k = rows[i].params.top_logprobs
                ids = top_ids[j, :k].tolist()
                texts = token_text([int(tokens[i]), *ids])
                top = tuple(zip(ids, texts[1:], top_lp[j, :k].tolist(), strict=True))
                records[i] = TokenLogprob(int(tokens[i]), texts[0], float(chosen[j]), top)
        return list(zip(tokens.tolist(), records, strict=True))
