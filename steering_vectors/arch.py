"""Find the steering sites of a causal LM by structure: decoder blocks, FFN output projection, linears.

Works for Llama, Qwen2, Mistral, Gemma (``model.layers[i].mlp.down_proj``), GPT-2
(``transformer.h[i].mlp.c_proj``) and any model that follows one of those shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelLayout", "UnsupportedModelError", "find_layout", "linear_shape", "module_dtype"]

_FFN_OUT_NAMES = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h", "fc_out")


class UnsupportedModelError(ValueError):
    """The model's decoder blocks or FFN output projection could not be found."""


@dataclass
class ModelLayout:
    """Where the steering sites of a model are.

    ``blocks[l]`` is decoder layer l (its output is the residual stream, site ``resid``);
    ``ffn_out[l]`` is the last projection of its feed-forward sub-layer (site ``ffn``).
    """

    model_type: str
    hidden_size: int
    blocks: list[nn.Module]
    ffn_out: list[nn.Module]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def linear(self, layer: int, module: str) -> nn.Module:
        """The linear called ``module`` inside block ``layer`` (e.g. ``q_proj`` or ``self_attn.q_proj``)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range (model has {self.num_layers})")
        block = self.blocks[layer]
        found = [m for name, m in block.named_modules() if name == module or name.endswith("." + module)]
        if len(found) != 1 or linear_shape(found[0]) is None:
            what = "is ambiguous" if len(found) > 1 else "is not a linear layer"
            raise ValueError(f"module {module!r} in layer {layer} {what}")
        return found[0]

    def linear_shapes(self) -> dict[tuple[int, str], tuple[int, int]]:
        """{(layer, short name): (d_in, d_out)} for every linear in every block."""
        out: dict[tuple[int, str], tuple[int, int]] = {}
        for layer, block in enumerate(self.blocks):
            for name, m in block.named_modules():
                shape = linear_shape(m)
                if shape is not None and name:
                    out[(layer, name.rsplit(".", 1)[-1])] = shape
                    out[(layer, name)] = shape
        return out


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer (nn.Linear, bitsandbytes linears, GPT-2 Conv1D), else None."""
    if isinstance(module, nn.Linear):  # bitsandbytes Linear4bit/Linear8bitLt subclass nn.Linear
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _find_blocks(model: nn.Module, num_layers: int | None) -> nn.ModuleList | None:
    best: nn.ModuleList | None = None
    for _, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if num_layers is not None and len(m) != num_layers:
            continue
        if all(hasattr(b, "mlp") for b in m) and (best is None or len(m) > len(best)):
            best = m
    return best


def _ffn_out(block: nn.Module) -> nn.Module | None:
    mlp = block.mlp
    for name in _FFN_OUT_NAMES:
        m = getattr(mlp, name, None)
        if m is not None and linear_shape(m) is not None:
            return m
    return None


def find_layout(model: nn.Module) -> ModelLayout:
    """Locate decoder blocks and FFN output projections; raise :class:`UnsupportedModelError` otherwise."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    num_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    name = type(model).__name__
    blocks = _find_blocks(model, num_layers)
    if blocks is None or hidden is None:
        raise UnsupportedModelError(f"unsupported model {name}: no list of decoder blocks with an .mlp found")
    ffn = [_ffn_out(b) for b in blocks]
    if any(f is None for f in ffn):
        raise UnsupportedModelError(
            f"unsupported model {name}: FFN output projection not found "
            f"(looked for mlp.{{{', '.join(_FFN_OUT_NAMES)}}})"
        )
    return ModelLayout(
        model_type=str(getattr(cfg, "model_type", "unknown")),
        hidden_size=int(hidden),
        blocks=list(blocks),
        ffn_out=ffn,
    )  # type: ignore[arg-type]


def module_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of a (possibly quantized) model: its first floating-point parameter's dtype."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
