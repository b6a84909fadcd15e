"""Per-row steering hooks: installed once on a model, driven per batch by a row -> slot index.

Every compiled profile lives in a *slot* of persistent tables; slot 0 is the identity. Before a
forward pass the caller states which slot each batch row uses (and which tokens are generated);
each hooked site then applies its edit with one gather and one elementwise op for the whole batch:

    ffn   (last FFN projection):  y[b,t] = y[b,t] * S[l, idx[b,t]] + B[l, idx[b,t]]
    resid (decoder layer output): h[b,t] = h[b,t] + V[l, idx[b,t]]
    lora  (linear l.m):           y[b,t] = y[b,t] + ((x[b,t] A[slot_b]^T) * M[idx[b,t]]) B[slot_b]^T

with ``idx = 2*slot + is_generated``. When ``idx`` is per row (decode steps, position-independent
profiles) the tables are gathered once per batch map and reused by the following steps while the map is
unchanged. A batch whose rows are all unsteered, or a layer no row steers, returns from the hook at once
(fast path). Removing the handle removes only these hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ModelLayout, find_layout, linear_shape, module_dtype
from .profile import CompiledProfile

__all__ = ["SlotsExhaustedError", "SteeringHooks", "install_steering", "steering"]


class SlotsExhaustedError(RuntimeError):
    """More distinct profiles are in use at once than ``max_slots`` allows."""


@dataclass
class _Slot:
    fingerprint: str
    refs: int
    ffn: frozenset[int]
    resid: frozenset[int]
    lora: frozenset[tuple[int, str]]
    position_dependent: bool


@dataclass
class _LoraTable:
    a: torch.Tensor  # [cap, R, d_in]
    b: torch.Tensor  # [cap, d_out, R]
    m: torch.Tensor  # [2*cap, R]
    handle: torch.utils.hooks.RemovableHandle | None = None


@dataclass
class _Batch:
    rows: torch.Tensor  # [B] slot per row
    idx: torch.Tensor  # [B, 1] or [B, T]: 2*slot + is_generated
    ffn: frozenset[int] = frozenset()
    resid: frozenset[int] = frozenset()
    lora: frozenset[tuple[int, str]] = frozenset()
    # when idx is per row ([B, 1]) the tables are gathered once for all layers: [L, B, 1, d]
    ffn_s: torch.Tensor | None = None
    ffn_b: torch.Tensor | None = None
    resid_b: torch.Tensor | None = None
    # ... and so are the LoRA tables: {(layer, module): (A^T [B, d_in, R], M [B, 1, R], B^T [B, R, d_out])}
    lora_tables: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )


@dataclass
class SteeringHooks:
    """Handle of the steering hooks on one model. Use :func:`install_steering` or :func:`steering`."""

    model: nn.Module
    layout: ModelLayout
    max_slots: int
    dtype: torch.dtype
    device: torch.device
    _cap: int = 0
    _ffn_s: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [L, 2*cap, d]
    _ffn_b: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [L, 2*cap, d]
    _resid_b: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [L, 2*cap, d]
    _lora: dict[tuple[int, str], _LoraTable] = field(default_factory=dict)
    _slots: dict[int, _Slot] = field(default_factory=dict)
    _by_fp: dict[str, int] = field(default_factory=dict)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    _batch: _Batch | None = None
    _version: int = 0  # bumped whenever a slot's contents change; keys the batch cache
    _cached: tuple[tuple, _Batch] | None = None  # (slots, generated, version) -> gathered batch

    # ---- installation -------------------------------------------------------------------------
    def _install(self, initial_slots: int) -> None:
        self._grow(min(max(initial_slots, 2), self.max_slots))
        try:
            for layer, mod in enumerate(self.layout.ffn_out):
                self._handles.append(mod.register_forward_hook(self._ffn_hook(layer)))
            for layer, block in enumerate(self.layout.blocks):
                self._handles.append(block.register_forward_hook(self._resid_hook(layer), prepend=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook this handle installed (and only those); the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for t in self._lora.values():
            if t.handle is not None:
                t.handle.remove()
        self._lora.clear()
        self._slots.clear()
        self._by_fp.clear()
        self._batch = self._cached = None

    def __enter__(self) -> SteeringHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---- slots ---------------------------------------------------------------------------------
    def _grow(self, cap: int) -> None:
        L, d = self.layout.num_layers, self.layout.hidden_size
        kw = {"dtype": self.dtype, "device": self.device}
        s, b, v = (
            torch.ones(L, 2 * cap, d, **kw),
            torch.zeros(L, 2 * cap, d, **kw),
            torch.zeros(L, 2 * cap, d, **kw),
        )
        if self._cap:
            n = 2 * self._cap
            s[:, :n], b[:, :n], v[:, :n] = self._ffn_s, self._ffn_b, self._resid_b
        self._ffn_s, self._ffn_b, self._resid_b = s, b, v
        for t in self._lora.values():
            t.a = torch.cat([t.a, t.a.new_zeros(cap - self._cap, *t.a.shape[1:])])
            t.b = torch.cat([t.b, t.b.new_zeros(cap - self._cap, *t.b.shape[1:])])
            t.m = torch.cat([t.m, t.m.new_zeros(2 * (cap - self._cap), t.m.shape[1])])
        self._cap = cap

    @property
    def slots_in_use(self) -> int:
        return len(self._slots)

    def acquire(self, profile: CompiledProfile) -> int:
        """Load ``profile`` into a slot (shared by fingerprint, reference-counted) and return its index.

        Slot 0 (the identity) is returned for an empty profile. Call between forward passes only.
        """
        if profile.is_identity:
            return 0
        slot = self._by_fp.get(profile.fingerprint)
        if slot is not None:
            self._slots[slot].refs += 1
            return slot
        free = next((i for i in range(1, self._cap) if i not in self._slots), None)
        if free is None:
            if self._cap >= self.max_slots:
                raise SlotsExhaustedError(f"all {self.max_slots - 1} steering slots are in use")
            free = self._cap
            self._grow(min(self._cap * 2, self.max_slots))
        self._write(free, profile)
        self._version += 1
        self._slots[free] = _Slot(
            fingerprint=profile.fingerprint,
            refs=1,
            ffn=frozenset(layer for site, layer in profile.affine if site == "ffn"),
            resid=frozenset(layer for site, layer in profile.affine if site == "resid"),
            lora=frozenset(profile.lora),
            position_dependent=profile.position_dependent,
        )
        self._by_fp[profile.fingerprint] = free
        return free

    def release(self, slot: int) -> None:
        """Drop one reference to ``slot``; the last one frees it (resets it to the identity)."""
        if slot == 0:
            return
        info = self._slots.get(slot)
        if info is None:
            raise ValueError(f"steering slot {slot} is not in use")
        info.refs -= 1
        if info.refs > 0:
            return
        del self._slots[slot], self._by_fp[info.fingerprint]
        self._version += 1
        rows = slice(2 * slot, 2 * slot + 2)
        self._ffn_s[:, rows] = 1.0
        self._ffn_b[:, rows] = 0.0
        self._resid_b[:, rows] = 0.0
        for key in info.lora:
            t = self._lora[key]
            t.a[slot], t.b[slot], t.m[rows] = 0.0, 0.0, 0.0

    def _write(self, slot: int, profile: CompiledProfile) -> None:
        rows = slice(2 * slot, 2 * slot + 2)
        for (site, layer), (scale, bias) in profile.affine.items():
            if site == "ffn":
                self._ffn_s[layer, rows] = scale.to(self.device, self.dtype)
                self._ffn_b[layer, rows] = bias.to(self.device, self.dtype)
            else:
                self._resid_b[layer, rows] = bias.to(self.device, self.dtype)
        for key, (a, b, m) in profile.lora.items():
            t = self._lora_table(key, rank=a.shape[0])
            r = a.shape[0]
            t.a[slot].zero_()
            t.b[slot].zero_()
            t.m[rows] = 0.0
            t.a[slot, :r] = a.to(self.device, self.dtype)
            t.b[slot, :, :r] = b.to(self.device, self.dtype)
            t.m[rows, :r] = m.to(self.device, self.dtype)

    def _lora_table(self, key: tuple[int, str], rank: int) -> _LoraTable:
        layer, module = key
        t = self._lora.get(key)
        if t is None:
            lin = self.layout.linear(layer, module)
            d_in, d_out = linear_shape(lin)  # type: ignore[misc]
            kw = {"dtype": self.dtype, "device": self.device}
            t = _LoraTable(
                a=torch.zeros(self._cap, rank, d_in, **kw),
                b=torch.zeros(self._cap, d_out, rank, **kw),
                m=torch.zeros(2 * self._cap, rank, **kw),
            )
            t.handle = lin.register_forward_hook(self._lora_hook(key))
            self._lora[key] = t
        elif t.a.shape[1] < rank:
            pad = rank - t.a.shape[1]
            t.a = torch.cat([t.a, t.a.new_zeros(t.a.shape[0], pad, t.a.shape[2])], dim=1)
            t.b = torch.cat([t.b, t.b.new_zeros(t.b.shape[0], t.b.shape[1], pad)], dim=2)
            t.m = torch.cat([t.m, t.m.new_zeros(t.m.shape[0], pad)], dim=1)
        return t

    # ---- per batch -----------------------------------------------------------------------------
    @contextmanager
    def batch(self, slots: Sequence[int], generated: bool | torch.Tensor = False) -> Iterator[None]:
        """Steer the forward passes inside this block: row i uses ``slots[i]``.

        ``generated``: a bool for every token, or a bool tensor [B, T] marking generated tokens.
        """
        self.set_batch(slots, generated)
        try:
            yield
        finally:
            self._batch = None

    def set_batch(self, slots: Sequence[int], generated: bool | torch.Tensor = False) -> None:
        """State the row -> slot map for the next forward passes (see :meth:`batch`).

        Decode steps repeat the same map: the gathered tables of the last call are reused while the
        map, the ``generated`` flag and every slot's contents are unchanged.
        """
        key = None if isinstance(generated, torch.Tensor) else (tuple(slots), bool(generated), self._version)
        if key is not None and self._cached is not None and self._cached[0] == key:
            self._batch = self._cached[1]
            return
        used = set(slots) - {0}
        unknown = used - self._slots.keys()
        if unknown:
            raise ValueError(f"steering slots {sorted(unknown)} are not loaded")
        if not used:
            self._batch = None
            return
        infos = [self._slots[s] for s in used]
        rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)  # [B]
        idx = (2 * rows)[:, None]  # [B, 1]
        if any(i.position_dependent for i in infos):
            if isinstance(generated, torch.Tensor):
                idx = idx + generated.to(self.device, torch.long)  # [B, T]
            elif generated:
                idx = idx + 1
        batch = _Batch(
            rows=rows,
            idx=idx,
            ffn=frozenset().union(*(i.ffn for i in infos)),
            resid=frozenset().union(*(i.resid for i in infos)),
            lora=frozenset().union(*(i.lora for i in infos)),
        )
        if idx.shape[1] == 1:  # one gather per table for the whole forward pass
            if batch.ffn:
                batch.ffn_s, batch.ffn_b = self._ffn_s[:, idx], self._ffn_b[:, idx]  # [L, B, 1, d]
            if batch.resid:
                batch.resid_b = self._resid_b[:, idx]  # [L, B, 1, d]
            for k in batch.lora:
                t = self._lora[k]
                batch.lora_tables[k] = (t.a[rows].transpose(1, 2), t.m[idx], t.b[rows].transpose(1, 2))
        self._batch = batch
        if key is not None:
            self._cached = (key, batch)

    def clear_batch(self) -> None:
        self._batch = None

    # ---- hooks ---------------------------------------------------------------------------------
    def _ffn_hook(self, layer: int):
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            b = self._batch
            if b is None or layer not in b.ffn:
                return None
            if b.ffn_s is not None and b.ffn_b is not None:
                return out * b.ffn_s[layer] + b.ffn_b[layer]  # [B, T, d] * [B, 1, d] + [B, 1, d]
            return out * self._ffn_s[layer][b.idx] + self._ffn_b[layer][b.idx]  # gathers: [B, T, d]

        return hook

    def _resid_hook(self, layer: int):
        def hook(_mod: nn.Module, _args: tuple, out):  # tensor or tuple, as the block returns
            b = self._batch
            if b is None or layer not in b.resid:
                return None
            v = b.resid_b[layer] if b.resid_b is not None else self._resid_b[layer][b.idx]  # [B, 1|T, d]
            if isinstance(out, tuple):
                return (out[0] + v, *out[1:])
            return out + v

        return hook

    def _lora_hook(self, key: tuple[int, str]):
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            b = self._batch
            if b is None or key not in b.lora:
                return None
            x = args[0]  # [B, T, d_in]
            ab = b.lora_tables.get(key)
            if ab is None:  # per-token idx: gather here
                t = self._lora[key]
                ab = (t.a[b.rows].transpose(1, 2), t.m[b.idx], t.b[b.rows].transpose(1, 2))
            a_t, m, b_t = ab
            u = torch.matmul(x, a_t) * m  # [B, T, d_in] @ [B, d_in, R] * [B, 1|T, R]
            return out + torch.matmul(u, b_t)  # [B, T, R] @ [B, R, d_out]

        return hook


def install_steering(
    model: nn.Module, *, max_slots: int = 64, initial_slots: int = 8, dtype: torch.dtype | None = None
) -> SteeringHooks:
    """Install the steering hooks on ``model`` once and return their handle.

    ``max_slots`` bounds the number of distinct profiles in use at once (slot 0 is the identity).
    A failed install removes whatever it had installed.
    """
    if max_slots < 2:
        raise ValueError("max_slots must be at least 2 (slot 0 is the identity)")
    layout = find_layout(model)
    param = next(model.parameters())
    hooks = SteeringHooks(
        model=model,
        layout=layout,
        max_slots=max_slots,
        dtype=dtype or module_dtype(model),
        device=param.device,
    )
    hooks._install(initial_slots)
    return hooks


@contextmanager
def steering(model: nn.Module, **kwargs: object) -> Iterator[SteeringHooks]:
    """Context-manager twin of :func:`install_steering`: the hooks are removed on exit."""
    hooks = install_steering(model, **kwargs)  # type: ignore[arg-type]
    try:
        yield hooks
    finally:
        hooks.remove()
