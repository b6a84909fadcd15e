"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``) as ``lora`` artifacts.

PEFT adds ``scaling · B(A x)`` to a targeted linear's output with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``); a ``lora`` artifact adds ``w · (alpha / r) · B(A x)``. Its
A [r, d_in] and B [d_out, r] are PEFT's ``lora_A.weight`` and ``lora_B.weight`` as they are; rsLoRA is
expressed exactly by ``alpha = lora_alpha · sqrt(r)``.

Anything the artifact cannot express is refused with a message naming it: another PEFT method, DoRA,
biases (``bias``, ``lora_bias``), per-module ranks or alphas (``rank_pattern``, ``alpha_pattern``), whole
modules saved beside the adapter (``modules_to_save``, trainable tokens), LoRA on embeddings or on
parameters, layer replication, activated LoRA, initialisations that change the base weights (PiSSA,
OLoRA, CorDA, LoftQ, LoRA-GA), and weights on modules that are not linears of a decoder block of the
model. Only safetensors weights are read (``adapter_model.bin`` is a pickle: never loaded).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .arch import find_layout, linear_shape
from .artifact import MAX_ARTIFACT_BYTES, Artifact, ArtifactError

__all__ = ["import_peft", "peft_lora_tensors"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_MAX_CONFIG_BYTES = 1 << 20
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_(A|B)\.weight$")
# settings that change the forward pass in ways a lora artifact cannot express: refused when truthy
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "rank_pattern": "rank_pattern gives modules their own ranks",
    "alpha_pattern": "alpha_pattern gives modules their own alphas",
    "modules_to_save": "modules_to_save stores whole modules beside the adapter",
    "trainable_token_indices": "trainable_token_indices stores embedding rows beside the adapter",
    "target_parameters": "target_parameters puts LoRA on parameters, not on linears",
    "layer_replication": "layer_replication duplicates decoder layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools the inputs of its adapters",
    "use_bdlora": "block-diagonal LoRA shares blocks between adapters",
    "arrow_config": "Arrow routes between several adapters",
    "megatron_config": "Megatron parallel linears",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} not found (a PEFT adapter directory holds {CONFIG_FILE})")
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ArtifactError(f"{path} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return cfg


def _check_config(cfg: dict[str, Any]) -> tuple[int, float]:
    """(r, the artifact's lora_alpha) of a PEFT LoRA config; ``ArtifactError`` naming what is unsupported."""
    if cfg.get("peft_type") != "LORA":
        raise ArtifactError(
            f"peft_type {cfg.get('peft_type')!r} is not supported: only LORA adapters convert"
        )
    problems = [why for key, why in _UNSUPPORTED.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} trains biases of the base model")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} changes the base model's weights")
    if problems:
        raise ArtifactError("cannot express this adapter as a lora artifact: " + "; ".join(problems))
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ArtifactError(f"adapter_config r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ArtifactError(f"adapter_config lora_alpha must be a positive number, got {alpha!r}")
    return r, float(alpha) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)


def _block_prefixes(model: nn.Module) -> dict[str, int]:
    """{qualified name of decoder block l: l}."""
    layout = find_layout(model)
    index = {id(block): layer for layer, block in enumerate(layout.blocks)}
    return {name: index[id(m)] for name, m in model.named_modules() if id(m) in index}


def peft_lora_tensors(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A saved PEFT LoRA state dict (``base_model.model.<module>.lora_A.weight`` ...) under SPEC §4 names
    (``layers.{l}.{module}.lora_A`` [r, d_in], ``.lora_B`` [d_out, r]) for ``model`` (which may live on
    the meta device: only its structure is read). ``ArtifactError`` names any tensor it cannot place."""
    blocks = _block_prefixes(model)
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            raise ArtifactError(f"adapter tensor {key!r} is not a LoRA A/B weight of a linear")
        path, ab = m.group(1), m.group(2)
        block = next((b for b in blocks if path.startswith(b + ".")), None)
        if block is None:
            raise ArtifactError(
                f"adapter tensor {key!r}: {path!r} is not inside a decoder block of the model"
            )
        target = modules.get(path)
        shape = linear_shape(target) if target is not None else None
        if shape is None:
            raise ArtifactError(f"adapter tensor {key!r}: {path!r} is not a linear layer of the model")
        want = (tensor.shape[0], shape[0]) if ab == "A" else (shape[1], tensor.shape[-1])
        if tensor.dim() != 2 or tuple(tensor.shape) != want:
            raise ArtifactError(
                f"adapter tensor {key!r} has shape {list(tensor.shape)}, expected {list(want)}"
            )
        dtype = (
            tensor.dtype if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        )
        out[f"layers.{blocks[block]}.{path.rsplit('.', 1)[-1]}.lora_{ab}"] = tensor.detach().to("cpu", dtype)
    if not out:
        raise ArtifactError("the adapter holds no LoRA weights")
    return out


def import_peft(
    adapter_dir: str | os.PathLike[str], model: nn.Module, *, max_bytes: int = MAX_ARTIFACT_BYTES
) -> Artifact:
    """The ``lora`` artifact of the PEFT LoRA adapter in ``adapter_dir`` for ``model`` (its structure is
    all that is read: a model on the meta device will do)."""
    folder = Path(adapter_dir)
    cfg = _read_config(folder / CONFIG_FILE)
    r, alpha = _check_config(cfg)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (
            " (adapter_model.bin is a pickle and is never loaded)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise ArtifactError(f"{weights} not found{pickled}")
    if weights.stat().st_size > max_bytes:
        raise ArtifactError(f"{weights} is larger than {max_bytes} bytes")
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # safetensors' own parse errors
        raise ArtifactError(f"{weights} is not a valid safetensors file: {e}") from None
    tensors = peft_lora_tensors(state, model)
    ranks = {n: t.shape[0] for n, t in tensors.items() if n.endswith("lora_A")}
    if any(rank != r for rank in ranks.values()):
        bad = sorted(n for n, rank in ranks.items() if rank != r)
        raise ArtifactError(f"adapter_config r={r} but {bad[0]} has rank {ranks[bad[0]]}")
    keys = ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules")
    source = json.dumps({"peft": {k: cfg.get(k) for k in keys}}, sort_keys=True, default=str)
    return Artifact.for_model(
        find_layout(model), "lora", tensors, "peft-import", lora_alpha=alpha, extra={"training": source}
    )
