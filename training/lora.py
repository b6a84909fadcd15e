"""Low-rank adapters (LoRA) for the trainers, on forward hooks, exported in SPEC §4's ``lora`` layout.

An adapted linear ``y = W x`` becomes ``y = W x + (alpha / r) * B (A x)`` with A [r, d_in] initialised
Kaiming-uniform (bound 1 / sqrt(d_in), as peft does) and B [d_out, r] zeros, so the adapter starts as
the identity edit. The base weights are never touched: the delta is added by a forward hook while
:meth:`LoraSet.active` is entered, and A, B stay float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["LoraSet", "stack_adapters"]


class LoraSet(nn.Module):
    """Low-rank adapters on some linears of a model, applied by forward hooks.

    ``targets`` are (layer, module) pairs as ``layout.linear`` names them (e.g. ``(3, "q_proj")``);
    ``seed`` seeds A's initialisation. :meth:`active` installs the hooks for the duration of a block;
    :meth:`export` returns SPEC §4 ``lora`` tensors.
    """

    def __init__(
        self, layout, targets: Sequence[tuple[int, str]], rank: int = 8, alpha: float = 16.0, seed: int = 0
    ):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = [(int(layer), str(m)) for layer, m in targets]
        self._layout = [layout]  # not a submodule: the base model is not part of this set
        g = torch.Generator().manual_seed(seed)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for layer, m in self.targets:
            lin = layout.linear(layer, m)
            d_in, d_out = lin.in_features, lin.out_features
            a = torch.empty(rank, d_in)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, d_in] weight
            a.uniform_(-bound, bound, generator=g)
            self.A[self._key(layer, m)] = nn.Parameter(a)
            self.B[self._key(layer, m)] = nn.Parameter(torch.zeros(d_out, rank))

    @staticmethod
    def _key(layer: int, module: str) -> str:
        return f"l{layer}__{module.replace('.', '__')}"

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def _hook(self, key: str):
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            a, b = self.A[key], self.B[key]
            x = args[0]
            delta = (x.to(a.dtype) @ a.t()) @ b.t()  # [..., d_in] -> [..., r] -> [..., d_out]
            return out + (self.scaling * delta).to(out.dtype)

        return hook

    @contextmanager
    def active(self) -> Iterator[None]:
        """Apply the adapters to the model inside the ``with`` block (hooks removed on exit)."""
        layout = self._layout[0]
        handles = []
        try:
            for layer, m in self.targets:
                lin = layout.linear(layer, m)
                handles.append(lin.register_forward_hook(self._hook(self._key(layer, m))))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def merge(self) -> None:
        """Add every adapter's delta ``(alpha / r) B A`` to its linear's weight, in place."""
        layout = self._layout[0]
        for layer, m in self.targets:
            k, lin = self._key(layer, m), layout.linear(layer, m)
            delta = self.scaling * (self.B[k].float() @ self.A[k].float())  # [d_out, d_in]
            lin.weight.add_(delta.to(device=lin.weight.device, dtype=lin.weight.dtype))

    def export(self) -> dict[str, torch.Tensor]:
        """``layers.{l}.{module}.lora_A`` [r, d_in] and ``.lora_B`` [d_out, r] (float32, CPU)."""
        out = {}
        for layer, m in self.targets:
            k = self._key(layer, m)
            out[f"layers.{layer}.{m}.lora_A"] = self.A[k].detach().float().cpu().clone()
            out[f"layers.{layer}.{m}.lora_B"] = self.B[k].detach().float().cpu().clone()
        return out


def stack_adapters(sets: Sequence[LoraSet]) -> tuple[dict[str, torch.Tensor], float]:
    """One SPEC §4 ``lora`` tensor set whose delta is the sum of the deltas of ``sets``, and its
    ``lora_alpha``.

    At each adapted linear, with set i's scaling ``s_i = alpha_i / r_i``, the ranks are stacked -
    ``A = [A_1; A_2; ...]`` (rows), ``B = (r / alpha) [s_1 B_1, s_2 B_2, ...]`` (columns), r the
    stacked rank at that linear - and ``alpha`` is the largest stacked rank of all linears, so that what
    the server applies, ``w (alpha / r) B (A x)``, is ``w sum_i s_i B_i A_i x``: strength 1 gives the
    sum of the adapters exactly, strength w scales all of them together.
    """
    parts: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora in sets:
        for layer, m in lora.targets:
            k = lora._key(layer, m)
            a, b = lora.A[k].detach().float().cpu(), lora.B[k].detach().float().cpu()
            parts.setdefault((layer, m), []).append((a, lora.scaling * b))
    alpha = float(max(sum(a.shape[0] for a, _ in p) for p in parts.values()))
    out = {}
    for (layer, m), p in sorted(parts.items()):
        rank = sum(a.shape[0] for a, _ in p)
        out[f"layers.{layer}.{m}.lora_A"] = torch.cat([a for a, _ in p], dim=0).contiguous()
        out[f"layers.{layer}.{m}.lora_B"] = (
            torch.cat([b for _, b in p], dim=1) * (rank / alpha)
        ).contiguous()
    return out, alpha
