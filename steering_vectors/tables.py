"""Persistent per-slot steering tables, bounded by configured maxima and grown atomically.

Slot s holds rows ``2s`` (prompt tokens) and ``2s + 1`` (generated tokens) of the affine tables and
entry s of every LoRA table; slot 0 is the identity. With ``cap`` slots allocated (at most
``max_slots``), L layers, hidden size d and element size e bytes:

    affine tables  ffn_s, ffn_b, resid_b: [L, 2*cap, d]       3 * L * 2*cap * d * e bytes
    LoRA site (l, m), stacked rank R (<= max_rank), linear d_in -> d_out:
                   a [cap, R, d_in], b [cap, d_out, R], m [2*cap, R]
                                                               cap * R * (d_in + d_out + 2) * e bytes

so the tables never exceed  ``e * max_slots * (6 * L * d + max_rank * sum_sites (d_in + d_out + 2))``
bytes, the sum running over the (layer, module) sites some loaded profile adapts. Growth (more slots,
or a higher stacked rank at a site) allocates the new tables first and swaps them in only when every
allocation succeeded, so a failed allocation leaves the tables as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .profile import CompiledProfile

__all__ = ["LoraTable", "SlotTables", "tables_budget_bytes"]


@dataclass
class LoraTable:
    a: torch.Tensor  # [cap, R, d_in]
    b: torch.Tensor  # [cap, d_out, R]
    m: torch.Tensor  # [2*cap, R]

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass
class _Staged:
    cap: int
    affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    lora: dict[tuple[int, str], LoraTable] = field(default_factory=dict)


def tables_budget_bytes(
    *,
    num_layers: int,
    hidden_size: int,
    max_slots: int,
    max_rank: int,
    lora_sites: Mapping[tuple[int, str], tuple[int, int]],
    element_size: int,
) -> int:
    """Upper bound of the tables' bytes (see the module docstring); ``lora_sites`` maps to (d_in, d_out)."""
    lora = sum(d_in + d_out + 2 for d_in, d_out in lora_sites.values())
    return element_size * max_slots * (6 * num_layers * hidden_size + max_rank * lora)


def _grown_rank(current: int, needed: int, max_rank: int) -> int:
    r = max(current, 8)
    while r < needed:
        r *= 2
    return min(r, max_rank)


class SlotTables:
    """The tensors the hooks gather from. Single-threaded: call between forward passes only."""

    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        max_slots: int,
        max_rank: int,
        initial_slots: int,
        linear_shape: Callable[[int, str], tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.max_slots, self.max_rank = max_slots, max_rank
        self.linear_shape = linear_shape
        self.kw = {"dtype": dtype, "device": device}
        self.cap = 0
        self.ffn_s = self.ffn_b = self.resid_b = torch.empty(0, **self.kw)
        self.lora: dict[tuple[int, str], LoraTable] = {}
        self.commit(self.stage(min(max(initial_slots, 2), max_slots), {}))

    # ---- growth: stage (allocate, may fail) then commit (swap, cannot fail) -----------------------
    def stage(self, cap: int, ranks: Mapping[tuple[int, str], int]) -> _Staged:
        """Allocate what ``cap`` slots and the stacked LoRA ``ranks`` need; nothing is changed yet."""
        staged = _Staged(cap=cap)
        if cap > self.cap:
            L, d, n = self.num_layers, self.hidden_size, 2 * self.cap
            s, b, v = (torch.ones(L, 2 * cap, d, **self.kw), torch.zeros(L, 2 * cap, d, **self.kw),
                       torch.zeros(L, 2 * cap, d, **self.kw))  # fmt: skip
            if self.cap:
                s[:, :n], b[:, :n], v[:, :n] = self.ffn_s, self.ffn_b, self.resid_b
            staged.affine = (s, b, v)
        for key in set(ranks) | (set(self.lora) if cap > self.cap else set()):
            old = self.lora.get(key)
            rank = _grown_rank(old.rank if old else 0, ranks.get(key, 0), self.max_rank)
            if old is not None and rank == old.rank and cap == self.cap:
                continue
            d_in, d_out = self.linear_shape(*key)
            new = LoraTable(
                a=torch.zeros(cap, rank, d_in, **self.kw),
                b=torch.zeros(cap, d_out, rank, **self.kw),
                m=torch.zeros(2 * cap, rank, **self.kw),
            )
            if old is not None:
                c, r = self.cap, old.rank
                new.a[:c, :r], new.b[:c, :, :r], new.m[: 2 * c, :r] = old.a, old.b, old.m
            staged.lora[key] = new
        return staged

    def commit(self, staged: _Staged) -> list[tuple[int, str]]:
        """Swap the staged tables in; returns the LoRA sites that are new."""
        if staged.affine is not None:
            self.ffn_s, self.ffn_b, self.resid_b = staged.affine
            self.cap = staged.cap
        added = [key for key in staged.lora if key not in self.lora]
        self.lora.update(staged.lora)
        return added

    def needs(self, profile: CompiledProfile) -> dict[tuple[int, str], int]:
        """Stacked LoRA rank per site that ``profile`` needs beyond the current tables."""
        out = {}
        for key, (a, _, _) in profile.lora.items():
            t = self.lora.get(key)
            if t is None or t.rank < a.shape[0]:
                out[key] = a.shape[0]
        return out

    # ---- contents -------------------------------------------------------------------------------
    def write(self, slot: int, profile: CompiledProfile) -> None:
        """Load ``profile`` into ``slot`` (tables must be large enough: see :meth:`needs`)."""
        rows = slice(2 * slot, 2 * slot + 2)
        kw = self.kw
        for (site, layer), (scale, bias) in profile.affine.items():
            if site == "ffn":
                self.ffn_s[layer, rows] = scale.to(**kw)
                self.ffn_b[layer, rows] = bias.to(**kw)
            else:
                self.resid_b[layer, rows] = bias.to(**kw)
        for key, (a, b, m) in profile.lora.items():
            t, r = self.lora[key], a.shape[0]
            t.a[slot].zero_()
            t.b[slot].zero_()
            t.m[rows] = 0.0
            t.a[slot, :r] = a.to(**kw)
            t.b[slot, :, :r] = b.to(**kw)
            t.m[rows, :r] = m.to(**kw)

    def reset(self, slot: int, lora_keys: frozenset[tuple[int, str]] | set[tuple[int, str]]) -> None:
        """Return ``slot`` to the identity."""
        rows = slice(2 * slot, 2 * slot + 2)
        self.ffn_s[:, rows] = 1.0
        self.ffn_b[:, rows] = 0.0
        self.resid_b[:, rows] = 0.0
        for key in lora_keys:
            t = self.lora.get(key)
            if t is not None:
                t.a[slot], t.b[slot], t.m[rows] = 0.0, 0.0, 0.0

    def nbytes(self) -> int:
        """Bytes the tables hold now."""
        ts = [self.ffn_s, self.ffn_b, self.resid_b] + [x for t in self.lora.values() for x in (t.a, t.b, t.m)]
        return sum(t.numel() * t.element_size() for t in ts)
