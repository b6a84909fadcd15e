"""Checkpoints that restore a training loop bitwise.

A checkpoint holds the step reached, the module's trainable tensors, the optimizer's and the
scheduler's states, Python's and torch's RNG states and the evaluation history. It is written with
``torch.save`` to a temporary file and moved into place (a crash never leaves a half-written one), and
read back with ``weights_only=True`` (never unpickling arbitrary objects). The data order of the loop
is a function of the seed and the step (:mod:`training.loop`), so nothing else is needed to continue.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["capture", "load_checkpoint", "restore", "save_checkpoint"]


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in names}


def capture(step: int, module: nn.Module, optimizer, scheduler, history: list[dict[str, float]]) -> dict:
    """The state of a loop after ``step`` optimizer steps (``module`` unwrapped from accelerate)."""
    return {
        "step": step,
        "module": _trainable_state(module),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "py_rng": random.getstate(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }


def restore(state: dict[str, Any], module: nn.Module, optimizer, scheduler, history: list) -> int:
    """Load a :func:`capture`\\ d state into the loop's objects (``history`` in place); returns the step."""
    module.load_state_dict(state["module"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["py_rng"])
    torch.set_rng_state(state["torch_rng"])
    history[:] = state.get("history", [])
    return int(state["step"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain containers only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
