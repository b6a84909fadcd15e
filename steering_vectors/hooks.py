"""Per-row steering hooks: installed once on a model, driven per batch by a row -> slot index.

Every compiled profile lives in a *slot* of persistent tables (:mod:`.tables`); slot 0 is the
identity. Before a forward pass the caller states which slot each token uses (and which tokens are
generated); each hooked site then applies its edit with one gather and one elementwise op:

    ffn   (last FFN projection):  y[b,t] = y[b,t] * S[l, idx[b,t]] + B[l, idx[b,t]]
    resid (decoder layer output): h[b,t] = h[b,t] + V[l, idx[b,t]]
    lora  (linear l.m):           y[b,t] = y[b,t] + ((x[b,t] A[slot]^T) * M[idx[b,t]]) B[slot]^T

with ``idx = 2*slot + is_generated``. Two batch layouts:

- padded ``[B, T]`` (:meth:`SteeringHooks.set_batch`): row b uses ``slots[b]``;
- packed ``[1, N]`` (:meth:`SteeringHooks.set_packed`): first one generated token per decoding row,
  then prompt chunks, each a run of tokens of one slot. LoRA runs one batched product for the decode
  tokens and one product per chunk (a chunk's tables are a view of its slot: nothing is gathered).

When the map repeats (decode steps), the gathered tables of the last call are reused while no slot's
contents changed. A batch whose rows are all unsteered, or a layer no row steers, returns from the hook
at once (fast path). Removing the handle removes only these hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ModelLayout, find_layout, linear_shape, module_dtype
from .profile import MAX_PROFILE_RANK, CompiledProfile
from .tables import SlotTables

__all__ = ["SlotsExhaustedError", "SteeringHooks", "install_steering", "steering"]

_LoraKey = tuple[int, str]


class SlotsExhaustedError(RuntimeError):
    """More distinct profiles are in use at once than ``max_slots`` allows."""


@dataclass
class _Slot:
    fingerprint: str
    refs: int
    ffn: frozenset[int]
    resid: frozenset[int]
    lora: frozenset[_LoraKey]
    position_dependent: bool


@dataclass
class _Batch:
    rows: torch.Tensor  # [B] slot per row (packed: per decode token)
    idx: torch.Tensor  # [B, 1] or [B, T] (packed: [1, N]): 2*slot + is_generated
    ffn: frozenset[int] = frozenset()
    resid: frozenset[int] = frozenset()
    lora: frozenset[_LoraKey] = frozenset()
    # gathered once for all layers when idx is small and repeats: [L, B, 1|T, d]
    ffn_s: torch.Tensor | None = None
    ffn_b: torch.Tensor | None = None
    resid_b: torch.Tensor | None = None
    # {(layer, module): (A^T [B, d_in, R], M [B, 1|T, R], B^T [B, R, d_out])} for the rows / decode tokens
    lora_tables: dict[_LoraKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    packed: bool = False
    num_decode: int = 0
    chunks: tuple[tuple[int, int, int], ...] = ()  # packed prompt runs: (slot, start, stop)
    chunk_lora: dict[int, frozenset[_LoraKey]] = field(default_factory=dict)


@dataclass
class SteeringHooks:
    """Handle of the steering hooks on one model. Use :func:`install_steering` or :func:`steering`."""

    model: nn.Module
    layout: ModelLayout
    max_slots: int
    dtype: torch.dtype
    device: torch.device
    max_rank: int = MAX_PROFILE_RANK
    tables: SlotTables | None = None
    _slots: dict[int, _Slot] = field(default_factory=dict)
    _by_fp: dict[str, int] = field(default_factory=dict)
    _handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    _lora_handles: dict[_LoraKey, torch.utils.hooks.RemovableHandle] = field(default_factory=dict)
    _batch: _Batch | None = None
    _version: int = 0  # bumped whenever a slot's contents change; keys the batch cache
    _cached: tuple[tuple, _Batch] | None = None  # (map, version) -> gathered batch

    # ---- installation -------------------------------------------------------------------------
    def _install(self, initial_slots: int) -> None:
        def shape(layer: int, module: str) -> tuple[int, int]:
            return linear_shape(self.layout.linear(layer, module))  # type: ignore[return-value]

        self.tables = SlotTables(
            num_layers=self.layout.num_layers,
            hidden_size=self.layout.hidden_size,
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            initial_slots=initial_slots,
            linear_shape=shape,
            dtype=self.dtype,
            device=self.device,
        )
        try:
            for layer, mod in enumerate(self.layout.ffn_out):
                self._handles.append(mod.register_forward_hook(self._ffn_hook(layer)))
            for layer, block in enumerate(self.layout.blocks):
                self._handles.append(block.register_forward_hook(self._resid_hook(layer), prepend=True))
        except BaseException:
            self.remove()
            raise

    @property
    def _t(self) -> SlotTables:
        if self.tables is None:
            raise RuntimeError("steering hooks are not installed")
        return self.tables

    def remove(self) -> None:
        """Remove every hook this handle installed (and only those); the model is as before."""
        for h in [*self._handles, *self._lora_handles.values()]:
            h.remove()
        self._handles.clear()
        self._lora_handles.clear()
        self._slots.clear()
        self._by_fp.clear()
        self._batch = self._cached = None

    def __enter__(self) -> SteeringHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---- slots ---------------------------------------------------------------------------------
    @property
    def slots_in_use(self) -> int:
        return len(self._slots)

    def check(self, profile: CompiledProfile) -> None:
        """Raise ``ValueError`` if ``profile`` could never be loaded (its stacked LoRA rank is too high)."""
        rank = profile.lora_rank
        if rank > self.max_rank:
            raise ValueError(f"profile LoRA rank {rank} exceeds max_profile_rank {self.max_rank}")

    def acquire(self, profile: CompiledProfile) -> int:
        """Load ``profile`` into a slot (shared by fingerprint, reference-counted) and return its index.

        Slot 0 (the identity) is returned for an empty profile. Call between forward passes only.
        Every table the profile needs is allocated before anything changes: a failure (no free slot,
        or an allocation error) leaves the hooks exactly as they were.
        """
        if profile.is_identity:
            return 0
        slot = self._by_fp.get(profile.fingerprint)
        if slot is not None:
            self._slots[slot].refs += 1
            return slot
        self.check(profile)
        t = self._t
        free = next((i for i in range(1, t.cap) if i not in self._slots), None)
        cap = t.cap
        if free is None:
            if t.cap >= self.max_slots:
                raise SlotsExhaustedError(f"all {self.max_slots - 1} steering slots are in use")
            free, cap = t.cap, min(t.cap * 2, self.max_slots)
        staged = t.stage(cap, t.needs(profile))  # may raise: nothing has changed yet
        for key in t.commit(staged):
            lin = self.layout.linear(*key)
            self._lora_handles[key] = lin.register_forward_hook(self._lora_hook(key))
        try:
            t.write(free, profile)
        except BaseException:
            t.reset(free, frozenset(profile.lora))
            raise
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
        self._t.reset(slot, info.lora)

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

    def _infos(self, used: set[int]) -> list[_Slot] | None:
        used = used - {0}
        unknown = used - self._slots.keys()
        if unknown:
            raise ValueError(f"steering slots {sorted(unknown)} are not loaded")
        return [self._slots[s] for s in used] if used else None

    def _new_batch(self, infos: list[_Slot], rows: torch.Tensor, idx: torch.Tensor) -> _Batch:
        return _Batch(
            rows=rows,
            idx=idx,
            ffn=frozenset().union(*(i.ffn for i in infos)),
            resid=frozenset().union(*(i.resid for i in infos)),
            lora=frozenset().union(*(i.lora for i in infos)),
        )

    def _gather_all(self, batch: _Batch, idx: torch.Tensor) -> None:
        """Gather the affine tables of every layer once: [L, B, T, d] for idx [B, T]."""
        t = self._t
        if batch.ffn:
            batch.ffn_s, batch.ffn_b = t.ffn_s[:, idx], t.ffn_b[:, idx]
        if batch.resid:
            batch.resid_b = t.resid_b[:, idx]

    def set_batch(self, slots: Sequence[int], generated: bool | torch.Tensor = False) -> None:
        """State the row -> slot map of a padded batch [B, T] for the next forward passes.

        Decode steps repeat the same map: the gathered tables of the last call are reused while the
        map, the ``generated`` flag and every slot's contents are unchanged.
        """
        key = None if isinstance(generated, torch.Tensor) else (tuple(slots), bool(generated), self._version)
        if key is not None and self._cached is not None and self._cached[0] == key:
            self._batch = self._cached[1]
            return
        infos = self._infos(set(slots))
        if infos is None:
            self._batch = None
            return
        rows = torch.tensor(list(slots), dtype=torch.long, device=self.device)  # [B]
        idx = (2 * rows)[:, None]  # [B, 1]
        if any(i.position_dependent for i in infos):
            if isinstance(generated, torch.Tensor):
                idx = idx + generated.to(self.device, torch.long)  # [B, T]
            elif generated:
                idx = idx + 1
        batch = self._new_batch(infos, rows, idx)
        if idx.shape[1] == 1:  # one gather per table for the whole forward pass
            self._gather_all(batch, idx)
            t = self._t
            for k in batch.lora:
                lt = t.lora[k]
                batch.lora_tables[k] = (lt.a[rows].transpose(1, 2), lt.m[idx], lt.b[rows].transpose(1, 2))
        self._batch = batch
        if key is not None:
            self._cached = (key, batch)

    def set_packed(self, decode_slots: Sequence[int], chunks: Sequence[tuple[int, int]] = ()) -> None:
        """State a packed batch [1, N]: one generated token per slot of ``decode_slots``, then the prompt
        chunks ``(slot, length)`` in order. Decode-only maps are cached like :meth:`set_batch`'s."""
        key = ("packed", tuple(decode_slots), self._version)
        if not chunks and self._cached is not None and self._cached[0] == key:
            self._batch = self._cached[1]
            return
        infos = self._infos(set(decode_slots) | {s for s, _ in chunks})
        if infos is None:
            self._batch = None
            return
        nd = len(decode_slots)
        rows = torch.tensor(list(decode_slots), dtype=torch.long, device=self.device)  # [nd]
        parts = [2 * rows + 1] + [torch.full((n,), 2 * s, dtype=torch.long) for s, n in chunks]
        idx = torch.cat(parts).to(self.device)[None]  # [1, N]
        batch = self._new_batch(infos, rows, idx)
        batch.packed, batch.num_decode = True, nd
        start, runs = nd, []
        for s, n in chunks:
            runs.append((s, start, start + n))
            start += n
            batch.chunk_lora[s] = self._slots[s].lora if s else frozenset()
        batch.chunks = tuple(runs)
        if not chunks:
            self._gather_all(batch, idx)
            self._cached = (key, batch)
        self._batch = batch

    def clear_batch(self) -> None:
        self._batch = None

    # ---- hooks ---------------------------------------------------------------------------------
    def _ffn_hook(self, layer: int):
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            b = self._batch
            if b is None or layer not in b.ffn:
                return None
            if b.ffn_s is not None and b.ffn_b is not None:
                return out * b.ffn_s[layer] + b.ffn_b[layer]  # [B, T, d] * [B, 1|T, d] + [B, 1|T, d]
            t = self._t
            return out * t.ffn_s[layer][b.idx] + t.ffn_b[layer][b.idx]  # gathers: [B, T, d]

        return hook

    def _resid_hook(self, layer: int):
        def hook(_mod: nn.Module, _args: tuple, out):  # tensor or tuple, as the block returns
            b = self._batch
            if b is None or layer not in b.resid:
                return None
            v = b.resid_b[layer] if b.resid_b is not None else self._t.resid_b[layer][b.idx]  # [B, 1|T, d]
            if isinstance(out, tuple):
                return (out[0] + v, *out[1:])
            return out + v

        return hook

    def _decode_tables(self, b: _Batch, key: _LoraKey):
        ab = b.lora_tables.get(key)
        if ab is None:
            lt = self._t.lora[key]
            m = lt.m[b.idx[0, : b.num_decode]][:, None] if b.packed else lt.m[b.idx]  # [B, 1|T, R]
            ab = (lt.a[b.rows].transpose(1, 2), m, lt.b[b.rows].transpose(1, 2))
            b.lora_tables[key] = ab
        return ab

    def _lora_hook(self, key: _LoraKey):
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            b = self._batch
            if b is None or key not in b.lora:
                return None
            x = args[0]  # [B, T, d_in]
            if not b.packed:
                a_t, m, b_t = self._decode_tables(b, key)
                u = torch.matmul(x, a_t) * m  # [B, T, d_in] @ [B, d_in, R] * [B, 1|T, R]
                return out + torch.matmul(u, b_t)  # [B, T, R] @ [B, R, d_out]
            nd = b.num_decode
            if nd:
                a_t, m, b_t = self._decode_tables(b, key)
                u = torch.matmul(x[0, :nd, None], a_t) * m  # [nd, 1, d_in] @ [nd, d_in, R] * [nd, 1, R]
                out[0, :nd] += torch.matmul(u, b_t)[:, 0]  # [nd, 1, R] @ [nd, R, d_out]
            lt = self._t.lora[key]
            for slot, start, stop in b.chunks:
                if key in b.chunk_lora[slot]:
                    u = torch.matmul(x[0, start:stop], lt.a[slot].T) * lt.m[2 * slot]  # [T, R]
                    out[0, start:stop] += torch.matmul(u, lt.b[slot].T)  # [T, d_out]
            return out

        return hook


def install_steering(
    model: nn.Module,
    *,
    max_slots: int = 64,
    initial_slots: int = 8,
    max_profile_rank: int = MAX_PROFILE_RANK,
    dtype: torch.dtype | None = None,
) -> SteeringHooks:
    """Install the steering hooks on ``model`` once and return their handle.

    ``max_slots`` bounds the number of distinct profiles in use at once (slot 0 is the identity);
    ``max_profile_rank`` bounds a profile's stacked LoRA rank at a site, and with it the LoRA tables
    (:func:`steering_vectors.tables.tables_budget_bytes`). A failed install removes what it installed.
    """
    if max_slots < 2:
        raise ValueError("max_slots must be at least 2 (slot 0 is the identity)")
    if max_profile_rank < 1:
        raise ValueError("max_profile_rank must be at least 1")
    layout = find_layout(model)
    param = next(model.parameters())
    hooks = SteeringHooks(
        model=model,
        layout=layout,
        max_slots=max_slots,
        dtype=dtype or module_dtype(model),
        device=param.device,
        max_rank=max_profile_rank,
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
