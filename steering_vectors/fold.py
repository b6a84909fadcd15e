"""Fold one static compiled profile into the model's weights, for zero runtime cost.

For the FFN output projection y = W x + c of layer l with site edits (S, B) at ``ffn`` and V at ``resid``:

    S*(W x + c) + B + V  =  (diag(S) W) x + (S*c + B + V)

so W' = diag(S) W and c' = S*c + B + V (a bias is created where the linear had none; the residual
add after the FFN carries V to the layer output). A LoRA delta w*(alpha/r)*B A merges as W' = W + B' A.
Only profiles with ``positions = all`` fold; quantized linears cannot be folded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import find_layout
from .profile import CompiledProfile

__all__ = ["FoldHandle", "fold_profile", "folded"]


@dataclass
class FoldHandle:
    """Restores the weights that :func:`fold_profile` changed."""

    _saved: list[tuple[nn.Module, str, torch.Tensor | None]] = field(default_factory=list)

    def remove(self) -> None:
        """Put back the original weight and bias tensors, bit for bit."""
        with torch.no_grad():
            for mod, name, orig in reversed(self._saved):
                if orig is None:
                    setattr(mod, name, None)
                else:
                    getattr(mod, name).data = orig
        self._saved.clear()

    def __enter__(self) -> FoldHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def _check_foldable(mod: nn.Module, what: str) -> None:
    if not isinstance(mod, nn.Linear) and not _is_conv1d(mod):
        raise ValueError(f"cannot fold into {what}: not a linear layer")
    if type(mod) is not nn.Linear and not _is_conv1d(mod):
        raise ValueError(
            f"cannot fold into {what}: quantized linear ({type(mod).__name__}); "
            "serve unquantized to fold, or use the hooks"
        )


def fold_profile(model: nn.Module, profile: CompiledProfile) -> FoldHandle:
    """Merge ``profile`` into ``model``'s weights in place; the handle undoes it exactly."""
    layout = find_layout(model)
    for (_site, layer), (scale, bias) in profile.affine.items():
        if not (torch.equal(scale[0], scale[1]) and torch.equal(bias[0], bias[1])):
            raise ValueError(f"cannot fold: layer {layer} edit depends on positions (use positions=all)")
        _check_foldable(layout.ffn_out[layer], f"layer {layer} FFN output")
    for (layer, module), (_, _, mask) in profile.lora.items():
        if not bool((mask == 1).all()):
            raise ValueError(f"cannot fold: lora on layer {layer} {module} depends on positions")
        _check_foldable(layout.linear(layer, module), f"layers.{layer}.{module}")

    handle = FoldHandle()
    try:
        with torch.no_grad():
            for (layer, module), (a, b, _) in profile.lora.items():
                lin = layout.linear(layer, module)
                w = lin.weight
                handle._saved.append((lin, "weight", w.data.clone()))
                delta = (b @ a).to(w.dtype)  # [d_out, d_in]
                w.data = w.data + (delta.T if _is_conv1d(lin) else delta)
            per_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            d = layout.hidden_size
            for (site, layer), (scale, bias) in profile.affine.items():
                s, c = per_layer.get(layer, (torch.ones(d), torch.zeros(d)))
                if site == "ffn":
                    per_layer[layer] = (scale[0], bias[0] + c)
                else:
                    per_layer[layer] = (s, c + bias[0])
            for layer, (s, c) in per_layer.items():
                lin = layout.ffn_out[layer]
                w = lin.weight
                handle._saved.append((lin, "weight", w.data.clone()))
                s_ = s.to(w.device, w.dtype)
                w.data = w.data * (s_[None, :] if _is_conv1d(lin) else s_[:, None])
                if lin.bias is None:
                    handle._saved.append((lin, "bias", None))
                    lin.bias = nn.Parameter(c.to(w.device, w.dtype), requires_grad=False)
                else:
                    handle._saved.append((lin, "bias", lin.bias.data.clone()))
                    lin.bias.data = lin.bias.data * s_ + c.to(w.device, w.dtype)
    except BaseException:
        handle.remove()
        raise
    return handle


@contextmanager
def folded(model: nn.Module, profile: CompiledProfile) -> Iterator[FoldHandle]:
    """Context-manager twin of :func:`fold_profile`."""
    handle = fold_profile(model, profile)
    try:
        yield handle
    finally:
        handle.remove()
